"""The command line in real processes: help, bad input, single-process resume, MNIST files,
and the README's own example script."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import struct
import sys

import numpy as np
import pytest

from procs import REPO, assert_training_state_equal, latest_committed, load_checkpoint, run, torchrun_cmd, train_cmd
from trainer.config import TrainConfig

QUICK = ["--max-steps", "6", "--save-every-steps", "3", "--log-every", "3"]


def test_help_documents_every_flag():
    result = run(train_cmd("--help"), timeout=60)
    assert result.returncode == 0
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in result.output


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be > 0, got 0"),
    (["--dataset", "cifar"], "--dataset 'cifar' is not one of digits, mnist, synthetic"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--inject", "explode:rank=0:step=1"], "unknown kind 'explode'"),
    (["--inject", "kill:rank=0"], "needs both rank=R and step=N"),
    (["--verify", "md5"], "--verify must be size or hash"),
])
def test_bad_values_get_one_clear_line(tmp_path, args, message):
    result = run(train_cmd("--ckpt-dir", str(tmp_path / "c"), *args), timeout=60)
    assert result.returncode == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_unwritable_ckpt_dir_fails_before_training(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    result = run(train_cmd("--ckpt-dir", str(tmp_path / "a-file" / "ckpt"), *QUICK), timeout=60)
    assert result.returncode == 2
    assert "is not writable" in result.output and "a-file/ckpt" in result.output
    assert "Traceback" not in result.output and "step 3/" not in result.output


def test_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    ckpt = str(tmp_path / "c")
    assert run(train_cmd("--ckpt-dir", ckpt, *QUICK), timeout=120).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "c" / "step-00000006").iterdir()}
    result = run(train_cmd("--ckpt-dir", ckpt, *QUICK, "--width", "8"), timeout=120)
    assert result.returncode == 2
    assert re.search(r"shape mismatch: model\.classifier\.weight \(checkpoint \[10, 128\], this run \[10, 64\]\)",
                     result.output), result.output
    assert "Traceback" not in result.output
    # Nothing committed was touched.
    assert {p.name: p.read_bytes() for p in (tmp_path / "c" / "step-00000006").iterdir()} == before


@pytest.mark.parametrize("memory, resumes", [("0", "resumed from step 4 (committed checkpoint"),
                                            ("auto", "resumed from step 5 (memory snapshot")])
def test_single_process_resume_is_exact(tmp_path, memory, resumes):
    """A plain ``python train.py`` that fails at step 6 and is run again: from the commit of
    step 4, or (the default) from the memory snapshot of step 5, which outlived the process."""
    args = ("--max-steps", "12", "--save-every-steps", "4", "--memory-every", memory,
            "--memory-dir", str(tmp_path / "shm"))
    straight = tmp_path / "straight"
    assert run(train_cmd("--ckpt-dir", str(straight), *args), timeout=120).returncode == 0
    split = tmp_path / "split"
    first = run(train_cmd("--ckpt-dir", str(split), *args, "--inject", "raise:rank=0:step=6"), timeout=120)
    assert first.returncode != 0 and "injected fault at step 6" in first.output
    second = run(train_cmd("--ckpt-dir", str(split), *args, "--inject", "raise:rank=0:step=6"), timeout=120)
    assert second.returncode == 0, second.tail()
    assert resumes in second.output, second.tail()
    assert_training_state_equal(load_checkpoint(split / "step-00000012", tmp_path),
                                load_checkpoint(straight / "step-00000012", tmp_path))
    assert not (tmp_path / "shm").exists() or not any((tmp_path / "shm").iterdir()), "shared memory left behind"


def write_idx_images(path, images):
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 0x803, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path, labels):
    path.write_bytes(struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes())


def test_mnist_loader_reads_idx_files(tmp_path):
    """A small MNIST in the real file format: bright rows encode the label, so it is learnable."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 320), ("t10k", 80)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label:2 * label + 3, :] = 255
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    result = run(train_cmd("--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--ckpt-dir",
                           str(tmp_path / "c"), "--epochs", "6", "--batch-size", "32", "--lr", "0.02"), timeout=180)
    assert result.returncode == 0, result.tail()
    accuracy = float(re.search(r"final test accuracy ([\d.]+)", result.output).group(1))
    assert accuracy >= 0.9, result.tail()
    assert latest_committed(tmp_path / "c").step == 60  # 320 / 32 * 6


def test_mnist_missing_files_say_where_to_put_them(tmp_path):
    result = run(train_cmd("--dataset", "mnist", "--data-dir", str(tmp_path / "nothing"), "--ckpt-dir",
                           str(tmp_path / "c"), *QUICK), timeout=120, env_extra={"no_proxy": "", "https_proxy": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert "MNIST is not in" in result.output and "MNIST/raw" in result.output
    assert "Traceback" not in result.output


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use the checkpoint library in your own script", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_resumes_exactly(tmp_path):
    code = readme_example()
    assert len(code.strip().splitlines()) <= 13
    (tmp_path / "example.py").write_text(code)
    # The same script, killed with SIGKILL right after its 550th optimizer step.
    (tmp_path / "killed.py").write_text(
        "import os, signal, torch\n"
        "real_step, calls = torch.optim.SGD.step, [0]\n"
        "def step(self, *a, **k):\n"
        "    out = real_step(self, *a, **k); calls[0] += 1\n"
        "    if calls[0] == 550: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return out\n"
        "torch.optim.SGD.step = step\n"
        "exec(open('example.py').read())\n")
    straight = tmp_path / "straight"
    straight.mkdir()
    (straight / "example.py").write_text(code)
    assert run([sys.executable, "example.py"], timeout=120, cwd=straight).returncode == 0

    killed = run([sys.executable, "killed.py"], timeout=120, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert latest_committed(tmp_path / "runs" / "my-job").step == 500
    resumed = run([sys.executable, "example.py"], timeout=120, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.tail()
    assert_training_state_equal(load_checkpoint(tmp_path / "runs/my-job/step-00001000", tmp_path),
                                load_checkpoint(straight / "runs/my-job/step-00001000", tmp_path))


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 480 KiB filesystem (tmpfs) that fills up after a few checkpoints."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=480k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_gives_clear_error_and_keeps_committed(tiny_disk, tmp_path):
    ckpt = tiny_disk / "ckpt"
    result = run(torchrun_cmd(2, "--ckpt-dir", str(ckpt), "--max-steps", "40", "--save-every-steps", "2",
                              "--keep-last", "0", "--run-dir", str(tmp_path)), timeout=180)
    assert result.returncode != 0, result.tail()
    # Both ranks stop with the same one-line error: neither is left waiting for the other.
    error_lines = [l for l in result.output.splitlines() if l.startswith("train.py: error:")]
    assert len(error_lines) == 2 and error_lines[0] == error_lines[1], result.tail()
    assert "No space left on device" in error_lines[0], result.tail()
    assert "the previous committed checkpoint stays" in error_lines[0]
    from checkpoint import Storage, verify
    from checkpoint.manifest import is_committed, list_steps, step_dir_name
    committed = [s for s in list_steps(Storage(ckpt)) if is_committed(Storage(ckpt), s)]
    assert committed, "nothing was committed before the disk filled up"
    for step in committed:  # every commit still verifies byte for byte
        manifest, reason = verify(Storage(ckpt), step_dir_name(step), "hash")
        assert manifest is not None, reason


def test_resume_with_another_schedule_is_refused(tmp_path):
    ckpt = str(tmp_path / "c")
    assert run(train_cmd("--ckpt-dir", ckpt, *QUICK), timeout=120).returncode == 0
    result = run(train_cmd("--ckpt-dir", ckpt, "--max-steps", "12"), timeout=120)
    assert result.returncode == 2
    assert "the checkpoint belongs to a run of 6 steps at --lr 0.05, this run is 12 steps" in result.output
    assert "Traceback" not in result.output
