"""A worker that always fails at start: the crash loop ftlaunch must stop."""
import sys

sys.exit("dies_at_start: failing on purpose")
