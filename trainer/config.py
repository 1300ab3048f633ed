"""Training configuration: one dataclass, one docstring per field, validated on creation.

The command line is generated from the dataclass, so ``--help`` documents every field and a
flag cannot exist without a field (or the other way round).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field

from checkpoint.config import CheckpointConfig
from launcher import faults

DATASETS = ("digits", "mnist", "synthetic")


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which flag and why."""


def _checkpoint_help(name: str) -> dict:
    return CheckpointConfig.__dataclass_fields__[name].metadata


@dataclass
class TrainConfig(CheckpointConfig):
    """The trainer's options. The checkpoint options (schedule, retention, verification, async
    saves) are ``CheckpointConfig``'s fields, inherited with their help and validation; only
    three defaults differ here (a library takes no shared memory unasked; the trainer does)."""

    save_every_steps: int = field(default=20, metadata=_checkpoint_help("save_every_steps"))
    async_mode: str = field(default="thread", metadata=_checkpoint_help("async_mode"))
    memory_every: int | str = field(default="auto", metadata=_checkpoint_help("memory_every"))
    ckpt_dir: str = field(default="runs/default", metadata={
        "help": "where checkpoints go: a directory or an fsspec URL (s3://bucket/prefix, memory://...; S3's endpoint "
                "and credentials from the standard AWS variables, e.g. AWS_ENDPOINT_URL). Resumes from the newest "
                "committed checkpoint found there."})
    storage_options: str = field(default="", metadata={
        "help": "fsspec storage options for a remote --ckpt-dir, as JSON, e.g. '{\"endpoint_url\": \"http://...\"}'"})
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
    log_every: int = field(default=20, metadata={"help": "print a progress line every N steps"})
    inject: list[str] = field(default_factory=list, metadata={
        "help": "fault to inject, repeatable: KIND:rank=R:step=N, KIND one of " + ", ".join(faults.KINDS)
                + " (fires once per run; see launcher/faults.py)"})
    run_dir: str = field(default="", metadata={
        "help": "folder for run-local files (fault markers, sample traces); default: --ckpt-dir when it is local"})
    trace_samples: bool = field(default=False, metadata={
        "help": "write every sample index each rank trains on to RUN_DIR/samples/ (for exactness tests)"})

    def __post_init__(self):
        super().__post_init__()  # the checkpoint fields
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset {self.dataset!r} is not one of {', '.join(DATASETS)}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "width": self.width,
                    "log_every": self.log_every, "synthetic_size": self.synthetic_size}
        non_negative = {"max_steps": self.max_steps}
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
        if not self.ckpt_dir:
            raise ConfigError("--ckpt-dir is empty; give a directory or an fsspec URL")
        self.storage_options_dict()  # checked now, not when the first save happens
        if not self.run_dir:
            if "://" in self.ckpt_dir and not self.ckpt_dir.startswith("file://"):
                if self.inject or self.trace_samples:
                    raise ConfigError("--inject/--trace-samples with a remote --ckpt-dir need a local --run-dir")
            else:
                self.run_dir = self.ckpt_dir.removeprefix("file://")

    def storage_options_dict(self) -> dict:
        if not self.storage_options:
            return {}
        try:
            options = json.loads(self.storage_options)
        except ValueError as e:
            raise ConfigError(f"--storage-options is not valid JSON ({e})") from None  # the value may hold keys
        if not isinstance(options, dict):
            raise ConfigError(f"--storage-options must be a JSON object ({{...}}), got a {type(options).__name__}")
        return options

    def _invalid(self, name: str, rule: str):
        raise ConfigError(f"{flag_of(name)} {rule}, got {getattr(self, name)!r}")


# Flags whose name is not the field's (kept for the scripts and docs that use them).
FLAG_NAMES = {"async_mode": "--async-save"}


def flag_of(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the flag and what is wrong
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="train.py", description=(
        "Train the seed's CNN with DDP and fault-tolerant checkpoints. "
        "Run as `python train.py` (one process) or `torchrun --standalone --nproc-per-node=N train.py`."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    checkpoint_flags = parser.add_argument_group("checkpoints (checkpoint.CheckpointConfig's fields)")
    for f in sorted(dataclasses.fields(TrainConfig), key=lambda f: f.name in CheckpointConfig.__dataclass_fields__):
        group = checkpoint_flags if f.name in CheckpointConfig.__dataclass_fields__ else parser
        flags = dict.fromkeys([flag_of(f.name), "--" + f.name.replace("_", "-")])  # the field's name works too
        help_text = f.metadata["help"]
        if f.type == "bool":
            group.add_argument(*flags, dest=f.name, action="store_true", help=help_text)
        elif f.type == "list[str]":
            group.add_argument(*flags, dest=f.name, action="append", default=[], metavar="SPEC", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str, "int | str": str}[f.type]  # int | str: the config checks
            group.add_argument(*flags, dest=f.name, type=kind, default=f.default, metavar=f.name.upper(),
                                help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))
