"""Loading never runs code from a checkpoint file, however well the file is forged.

Someone who can write the checkpoint directory can also rewrite the commit record's sizes and
crc32s, so a forged file always passes the checksums: these tests do exactly that, with a
payload that would create a marker file if it ever ran."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import zlib

import pytest
import torch

from checkpoint import CheckpointError
from test_commit_protocol import loaded_step, make_job, save_steps


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def rerecord(step_dir, name, data: bytes) -> None:
    """Write ``data`` as ``name`` and make the commit record agree (what a forger does)."""
    (step_dir / name).write_bytes(data)
    record = json.loads((step_dir / "manifest.json").read_text())
    record["files"][name] = {"size": len(data), "crc32": f"{zlib.crc32(data) & 0xffffffff:08x}"}
    (step_dir / "manifest.json").write_text(json.dumps(record))


def forge_metadata(step_dir, marker) -> None:
    rerecord(step_dir, ".metadata", pickle.dumps(Payload(marker)))


def forge_item(step_dir, marker, fqn="counter.value") -> None:
    """Point one non-tensor item of a real checkpoint at a torch.save of the payload,
    appended to its shard; the metadata stays made of DCP's own classes only."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata = pickle.loads((step_dir / ".metadata").read_bytes())
    index = MetadataIndex(fqn)
    info = metadata.storage_data[index]
    shard = step_dir / info.relative_path
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    data = shard.read_bytes()
    metadata.storage_data[index] = _StorageInfo(info.relative_path, len(data), len(buf.getvalue()))
    rerecord(step_dir, info.relative_path, data + buf.getvalue())
    rerecord(step_dir, ".metadata", pickle.dumps(metadata))


@pytest.mark.parametrize("forge", [forge_metadata, forge_item], ids=["metadata", "non-tensor-item"])
@pytest.mark.parametrize("verify", ["size", "hash"])
def test_forged_checkpoint_never_runs_and_falls_back(tmp_path, caplog, forge, verify):
    root, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    save_steps(root, [10, 20])
    forge(root / "step-00000020", marker)
    with caplog.at_level(logging.WARNING):
        step, _ = loaded_step(root, verify=verify)
    assert not marker.exists(), "loading ran code from the checkpoint"
    assert step == 10
    warning = next(r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING and "step-00000020" in r.getMessage())
    assert "system" in warning and "not loaded" in warning, warning


def test_forged_only_checkpoint_refuses_a_silent_fresh_start(tmp_path):
    root, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    save_steps(root, [10])
    forge_metadata(root / "step-00000010", marker)
    with pytest.raises(CheckpointError, match=r"holds committed checkpoints but none verifies: step-00000010 "
                                              r"\(.*\.metadata: refers to (posix|os)\.system.*allow_fresh_start"):
        loaded_step(root)
    assert loaded_step(root, allow_fresh_start=True)[0] is None
    assert not marker.exists()


def test_a_type_of_your_own_is_refused_then_allowed(tmp_path):
    """A user's own type in a non-tensor item: refused by default with a line that says how
    to allow it, loaded once allowed."""
    root = tmp_path / "ckpt"
    mgr = make_job(root)[0]
    mgr.training.extra["box"] = {"when": Box(3)}
    mgr.save(1)
    with pytest.raises(CheckpointError, match=r"holds committed checkpoints but none verifies.*Box"):
        make_job(root)[0].load()
    fresh = make_job(root, safe_globals=[Box])[0]
    fresh.training.extra["box"] = {"when": Box(0)}
    assert fresh.load().step == 1 and fresh.training.extra["box"]["when"].n == 3


class Box:
    def __init__(self, n):
        self.n = n
