"""Command-line entry: parse flags, train, and turn expected failures into one readable line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from checkpoint import CheckpointError

    from .config import ConfigError, parse_config
    from .loop import train

    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ConfigError, CheckpointError) as e:
        # One write of the whole line: ranks share the pipe, and print() writes the text and
        # the newline separately (another rank's line could land in between).
        sys.stderr.write(f"train.py: error: {e}\n")
        sys.stderr.flush()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
