"""Training configuration: one dataclass, one docstring per field, validated on creation.

The command line is generated from the dataclass, so ``--help`` documents every field and a
flag cannot exist without a field (or the other way round).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

DATASETS = ("digits", "mnist", "synthetic")


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which flag and why."""


@dataclass
class TrainConfig:
    ckpt_dir: str = field(default="runs/default", metadata={
        "help": "where checkpoints go: a directory or an fsspec URL (memory://...). Resumes from the newest committed checkpoint found there."})
    dataset: str = field(default="digits", metadata={
        "help": "digits (sklearn's handwritten digits, no download), mnist (torchvision, see --data-dir) or synthetic"})
    data_dir: str = field(default="data", metadata={
        "help": "mnist only: folder holding MNIST/raw/*-ubyte files; downloaded there where the network allows"})
    synthetic_size: int = field(default=4096, metadata={"help": "synthetic only: number of training samples"})
    synthetic_image: int = field(default=28, metadata={"help": "synthetic only: image side in pixels"})
    width: int = field(default=16, metadata={
        "help": "channels of the first conv layer (the second has twice as many); sets model size"})
    epochs: int = field(default=8, metadata={"help": "passes over the training split"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps in total (0: run all --epochs)"})
    batch_size: int = field(default=64, metadata={
        "help": "GLOBAL batch per step, split across workers, so a world size change keeps steps/epoch and the LR schedule"})
    lr: float = field(default=0.05, metadata={"help": "peak learning rate (SGD with momentum 0.9, cosine decay)"})
    seed: int = field(default=0, metadata={"help": "seed for model init, data order and every RNG"})
    save_every_steps: int = field(default=20, metadata={"help": "commit a checkpoint every N steps (0: off)"})
    save_every_seconds: float = field(default=0.0, metadata={
        "help": "also commit a checkpoint when T seconds passed since the last (rank 0's clock; 0: off)"})
    keep_last: int = field(default=3, metadata={"help": "committed checkpoints to keep (0: keep all)"})
    verify: str = field(default="hash", metadata={"help": "how a checkpoint is checked before loading: size or hash (crc32)"})
    allow_fresh_start: bool = field(default=False, metadata={
        "help": "start from scratch even when --ckpt-dir holds committed checkpoints of which none verifies "
                "(by default that is refused, naming them)"})
    async_save: str = field(default="thread", metadata={
        "help": "off: training waits for each save to commit; thread: training waits only while the state "
                "is copied, a background thread writes and commits it"})
    if_busy: str = field(default="wait", metadata={
        "help": "when a save is due while the previous one is still being written: wait for it, or skip "
                "this save (logged)"})
    io_threads: int = field(default=1, metadata={"help": "files each rank writes in parallel per checkpoint"})
    log_every: int = field(default=20, metadata={"help": "print a progress line every N steps"})
    inject: list[str] = field(default_factory=list, metadata={
        "help": "fault to inject, repeatable: KIND:rank=R:step=N, KIND one of kill, kill-before-commit, "
                "kill-while-writing, kill-load, hang, raise (fires once per run; see launcher/faults.py)"})
    run_dir: str = field(default="", metadata={
        "help": "folder for run-local files (fault markers, sample traces); default: --ckpt-dir when it is local"})
    trace_samples: bool = field(default=False, metadata={
        "help": "write every sample index each rank trains on to RUN_DIR/samples/ (for exactness tests)"})

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset {self.dataset!r} is not one of {', '.join(DATASETS)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "width": self.width,
                    "log_every": self.log_every, "synthetic_size": self.synthetic_size,
                    "io_threads": self.io_threads}
        non_negative = {"max_steps": self.max_steps, "save_every_steps": self.save_every_steps,
                        "save_every_seconds": self.save_every_seconds, "keep_last": self.keep_last}
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.synthetic_image < 4:
            raise ConfigError(f"--synthetic-image must be >= 4 pixels, got {self.synthetic_image}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.verify not in ("size", "hash"):
            raise ConfigError(f"--verify must be size or hash, got {self.verify!r}")
        if self.async_save not in ("off", "thread"):
            raise ConfigError(f"--async-save must be off or thread, got {self.async_save!r}")
        if self.if_busy not in ("wait", "skip"):
            raise ConfigError(f"--if-busy must be wait or skip, got {self.if_busy!r}")
        if not self.ckpt_dir:
            raise ConfigError("--ckpt-dir is empty; give a directory or an fsspec URL")
        if not self.run_dir:
            if "://" in self.ckpt_dir and not self.ckpt_dir.startswith("file://"):
                if self.inject or self.trace_samples:
                    raise ConfigError("--inject/--trace-samples with a remote --ckpt-dir need a local --run-dir")
            else:
                self.run_dir = self.ckpt_dir.removeprefix("file://")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the flag and what is wrong
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="train.py", description=(
        "Train the seed's CNN with DDP and fault-tolerant checkpoints. "
        "Run as `python train.py` (one process) or `torchrun --standalone --nproc-per-node=N train.py`."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=help_text)
        elif f.type == "list[str]":
            parser.add_argument(flag, action="append", default=[], metavar="SPEC", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))
