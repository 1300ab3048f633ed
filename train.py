"""Thin root entry: `python train.py ...` or `torchrun --standalone --nproc-per-node=2 train.py ...`."""

import sys

from trainer.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
