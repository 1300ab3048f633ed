"""Prints, as one JSON line, what a script can see of how it was started."""
import json
import os
import resource
import sys

umask = os.umask(0)
os.umask(umask)
print("PROBE " + json.dumps({
    "argv": sys.argv, "path": sys.path, "cwd": os.getcwd(), "name": __name__,
    "affinity": sorted(os.sched_getaffinity(0)), "umask": umask,
    "rlimits": {n: resource.getrlimit(getattr(resource, n)) for n in dir(resource) if n.startswith("RLIMIT_")},
    "env": {k: v for k, v in os.environ.items() if k != "FTLAUNCH_WORKER_ID"},
    "unbuffered": not sys.stdout.line_buffering and sys.stdout.write_through,
}), flush=True)
