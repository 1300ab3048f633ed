"""Data sets and the world-size-independent data cursor.

Every data set is small enough to sit in memory as two tensors, so a "loader" is just
indexing; what matters for fault tolerance is *which* indices each step uses:

    epoch e uses the permutation randperm(N, seed + e)
    the cursor is (epoch, position): how far into that permutation the job got
    each step takes the next ``batch`` indices; rank r of W takes the r-th even slice

The cursor says nothing about ranks, so after a restart at another world size the job goes
on from the same global position: no sample of the epoch is skipped or seen twice.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from .config import ConfigError, TrainConfig


@dataclass
class Split:
    images: torch.Tensor  # float32 [N, 1, H, W], normalized
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


def load_dataset(cfg: TrainConfig) -> tuple[Split, Split]:
    """(train, test) for ``cfg.dataset``."""
    if cfg.dataset == "digits":
        return _digits()
    if cfg.dataset == "mnist":
        return _mnist(cfg.data_dir)
    return _synthetic(cfg.synthetic_size, cfg.synthetic_image, cfg.seed)


def _split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float) -> tuple[Split, Split]:
    # A fixed split (seed 0), the same for every run and every --seed.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Split(images[train], labels[train]), Split(images[test], labels[test])


def _digits() -> tuple[Split, Split]:
    """1,797 real 8x8 handwritten digits, the file ``sklearn.datasets.load_digits`` reads.

    Read straight from scikit-learn's package data: importing scikit-learn takes most of a
    second per worker, which every restart would pay again."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("--dataset digits needs scikit-learn installed (pip install scikit-learn)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 64 pixel values (0..16), then the label
    images = torch.from_numpy(table[:, :64]).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.from_numpy(table[:, 64]).to(torch.int64)
    return _split((images - 0.5) / 0.5, labels, test_fraction=0.2)


def _mnist(data_dir: str) -> tuple[Split, Split]:
    from torchvision.datasets import MNIST

    def load(train: bool):
        try:
            return MNIST(data_dir, train=train, download=True)
        except Exception as e:  # no network, or a broken file: say where the files must go
            raise ConfigError(
                f"MNIST is not in {os.path.join(data_dir, 'MNIST', 'raw')} and could not be downloaded "
                f"({type(e).__name__}: {e}); put train/t10k -images-idx3-ubyte and -labels-idx1-ubyte "
                "files there or use --dataset digits") from None

    splits = []
    for train in (True, False):
        ds = load(train)
        images = ds.data.to(torch.float32).unsqueeze(1) / 255.0
        splits.append(Split((images - 0.1307) / 0.3081, ds.targets.to(torch.int64)))
    return splits[0], splits[1]


def _synthetic(n: int, side: int, seed: int) -> tuple[Split, Split]:
    """Random images labelled by a fixed random linear "teacher": learnable, any size."""
    g = torch.Generator().manual_seed(seed + 1_000_003)
    total = n + max(n // 4, 1)
    images = torch.randn(total, 1, side, side, generator=g)
    teacher = torch.randn(side * side, 10, generator=g)
    labels = (images.flatten(1) @ teacher).argmax(1)
    train, test = slice(0, n), slice(n, total)
    return Split(images[train], labels[train]), Split(images[test], labels[test])


class DataCursor:
    """Where the job is in its data: (epoch, position in that epoch's permutation).

    Stateful (``state_dict``/``load_state_dict``), so the checkpoint carries it.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self, rank: int, world_size: int) -> tuple[torch.Tensor, int]:
        """This rank's indices for the next step and the global batch size, then advance."""
        perm = self._permutation()
        n = min(self.batch_size, self.num_samples - self.position)
        batch = perm[self.position:self.position + n]
        mine = batch[rank * n // world_size:(rank + 1) * n // world_size]
        self.position += n
        if self.position == self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
        return mine, n

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_samples": self.num_samples, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "batch_size"):
            if state[key] != getattr(self, key):
                raise ConfigError(
                    f"the checkpoint was made with {key}={state[key]}, this run has {getattr(self, key)}; "
                    "resume with the same --seed/--dataset/--batch-size or use a fresh --ckpt-dir")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
