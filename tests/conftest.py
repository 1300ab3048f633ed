"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest

from procs import latest_committed, load_checkpoint, run, torchrun_cmd

# 23 steps per epoch on digits with batch 64: 50 steps cross an epoch boundary.
# --width 48 makes model+optimizer tensors dominate the checkpoint, for the dedup check.
REFERENCE_ARGS = ["--max-steps", "50", "--save-every-steps", "10", "--keep-last", "0", "--width", "48",
                  "--log-every", "10"]
REFERENCE_TIMEOUT = 240


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """Run A: two workers, uninterrupted; its final checkpoint is the exact-resume oracle."""
    ckpt = tmp_path_factory.mktemp("reference")
    result = run(torchrun_cmd(2, "--ckpt-dir", str(ckpt), *REFERENCE_ARGS), timeout=REFERENCE_TIMEOUT)
    assert result.returncode == 0, result.tail()
    assert "starting from scratch" in result.output
    manifest = latest_committed(ckpt)
    assert manifest.step == 50
    return ckpt, load_checkpoint(ckpt / "step-00000050", tmp_path_factory.mktemp("reference-pt"))
