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
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
