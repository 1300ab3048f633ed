"""``ftckpt`` on checkpoints that real training runs wrote: ls, verify, inspect, export, prune
and diff, damaged checkpoints, and bad input (one line, exit 2). The S3 root: tests/test_s3.py."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from checkpoint.safe_load import read_metadata
from procs import load_checkpoint, run, train_cmd

ARGS = ["--max-steps", "30", "--save-every-steps", "10", "--keep-last", "0", "--width", "8",
        "--memory-every", "0", "--async-save", "off"]


def ftckpt(*args: str, timeout: float = 120):
    return run([sys.executable, "-m", "checkpoint.cli", *args], timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Steps 10, 20 and 30 of a real run (module-wide; tests copy it before damaging it)."""
    root = tmp_path_factory.mktemp("ftckpt") / "ckpt"
    result = run(train_cmd("--ckpt-dir", str(root), *ARGS), timeout=240)
    assert result.returncode == 0, result.tail()
    return root


@pytest.fixture
def copy(trained, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(trained, root)
    return root


def test_ls_lists_steps_states_and_metrics(copy):
    (copy / "step-00000020" / "__0_0.distcp").write_bytes(b"cut")  # truncated
    (copy / "step-00000030" / "manifest.json").unlink()  # never committed
    result = ftckpt("ls", str(copy), "--json")
    assert result.returncode == 0, result.tail()
    rows = {row["step"]: row for row in json.loads(result.output)}
    assert {s: r["state"] for s, r in rows.items()} == {10: "committed", 20: "corrupt", 30: "uncommitted"}
    assert rows[10]["world_size"] == 1 and rows[10]["bytes"] > 0 and "train_loss" in rows[10]["metrics"]
    assert "__0_0.distcp: 3 bytes" in rows[20]["problem"]
    table = ftckpt("ls", str(copy)).output.splitlines()
    assert table[0].split() == ["step", "state", "world", "size", "age", "metrics"]
    assert table[1].split()[:3] == ["10", "committed", "1"] and "train_loss=" in table[1]


def test_verify_exit_status_and_one_line_per_problem(copy):
    assert ftckpt("verify", str(copy), "--hash").returncode == 0
    with open(copy / "step-00000010" / ".metadata", "rb") as f:
        where = next(info for index, info in read_metadata(f).storage_data.items()
                     if index.fqn == "model.classifier.weight")
    shard = copy / "step-00000010" / where.relative_path
    data = bytearray(shard.read_bytes())
    data[where.offset + where.length // 2] ^= 0xFF  # a bit of a weight flipped: same size
    shard.write_bytes(bytes(data))
    assert ftckpt("verify", str(copy)).returncode == 0  # sizes only: it passes
    result = ftckpt("verify", str(copy), "--hash")
    assert result.returncode == 1
    problems = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert len(problems) == 1 and problems[0].startswith("step 10: corrupt: ") and "crc32" in problems[0], result.output
    assert "2 of 3 committed checkpoint(s) verify" in result.output
    assert ftckpt("verify", str(copy), "20", "--hash").returncode == 0


def test_inspect_groups_keys_by_prefix(trained):
    result = ftckpt("inspect", str(trained), "30")
    assert result.returncode == 0, result.tail()
    groups = [line.split()[0] for line in result.output.splitlines() if not line.startswith((" ", "total"))]
    assert {"model.", "optim.", "progress.", "data."} <= set(groups), groups
    assert any(line.split()[:3] == ["model.classifier.bias", "float32", "[10]"] for line in result.output.splitlines())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_writes_the_model_bit_equal(trained, tmp_path, suffix):
    out = tmp_path / f"model{suffix}"
    result = ftckpt("export", str(trained), "30", "-o", str(out), "--only", "model")
    assert result.returncode == 0, result.tail()
    if suffix == ".pt":
        exported = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file
        exported = load_file(out)
    expected = load_checkpoint(trained / "step-00000030", tmp_path)["model"]
    assert set(exported) == set(expected)
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key


def test_diff_is_the_exact_resume_oracle(trained):
    same = ftckpt("diff", str(trained), "30", str(trained), "30")
    assert same.returncode == 0 and "0 differ" in same.output, same.output
    other = ftckpt("diff", str(trained), "20", str(trained), "30")
    assert other.returncode == 1
    lines = other.output.splitlines()
    assert any(line.startswith("model.classifier.weight: max abs difference ") for line in lines)
    assert "progress.step: 20 vs 30" in lines, other.output  # the items too, not only the tensors


def test_prune_follows_retention_and_dry_run_touches_nothing(copy):
    dry = ftckpt("prune", str(copy), "--keep-last", "1", "--dry-run")
    assert dry.returncode == 0 and "would remove" in dry.output
    assert sorted(p.name for p in copy.glob("step-*")) == ["step-00000010", "step-00000020", "step-00000030"]
    done = ftckpt("prune", str(copy), "--keep-last", "1", "--keep-every", "20")
    assert done.returncode == 0, done.output
    assert sorted(p.name for p in copy.glob("step-*")) == ["step-00000020", "step-00000030"]


@pytest.mark.parametrize("args, message", [
    (["ls", "/no/such/root"], "/no/such/root: no such checkpoint root"),
    (["inspect", "{root}", "99"], "no checkpoint of step 99"),
    (["verify", "{root}", "99"], "no checkpoint of step 99"),
    (["export", "{root}", "30", "-o", "model.bin"], "give a .pt, .pth or .safetensors file name"),
    (["export", "{root}", "30", "-o", "{tmp}/m.pt", "--only", "nothing"], "no tensors under 'nothing.'"),
    (["prune", "{root}", "--keep-last", "0"], "--keep-last must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, args, message):
    result = ftckpt(*[a.format(root=trained, tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output, result.output


def test_a_damaged_checkpoint_is_exit_1_not_a_traceback(copy, tmp_path):
    (copy / "step-00000030" / "__0_0.distcp").write_bytes(b"cut")
    result = ftckpt("export", str(copy), "30", "-o", str(tmp_path / "m.pt"))
    assert result.returncode == 1
    assert result.output.startswith("ftckpt: error: ") and "step-00000030" in result.output, result.output
    assert "Traceback" not in result.output



def test_any_flipped_byte_in_a_non_tensor_item_is_refused_not_a_crash(trained):
    """A flipped bit inside a pickled item (not a tensor) may break the unpickler in any way (a
    bad UTF-8 string, a cut stream, a wrong opcode): each single flip either loads or is
    refused with ``UnsafeCheckpointError``, which discovery turns into a skipped checkpoint."""
    from checkpoint.safe_load import UnsafeCheckpointError, default_item_globals, load_item

    step = trained / "step-00000030"
    with open(step / ".metadata", "rb") as f:
        items = [(index.fqn, info) for index, info in read_metadata(f).storage_data.items()
                 if not index.fqn.startswith(("model.", "optim.state."))]
    escaped = []
    for fqn, where in items:
        raw = (step / where.relative_path).read_bytes()[where.offset:where.offset + where.length]
        for at in range(len(raw)):
            damaged = bytearray(raw)
            damaged[at] ^= 0x80
            try:
                load_item(bytes(damaged), default_item_globals(), fqn)
            except UnsafeCheckpointError:
                pass
            except Exception as e:
                escaped.append(f"{fqn} byte {at}: {type(e).__name__}")
    assert not escaped, escaped[:5]


def test_a_copied_step_directory_is_corrupt_and_prune_keeps_what_loading_accepts(copy):
    shutil.copytree(copy / "step-00000010", copy / "step-00000050")  # its record says step 10
    rows = {r["step"]: r for r in json.loads(ftckpt("ls", str(copy), "--json").output)}
    assert rows[50]["state"] == "corrupt" and "record says step 10" in rows[50]["problem"]
    done = ftckpt("prune", str(copy), "--keep-last", "1")
    assert done.returncode == 0, done.output
    assert sorted(p.name for p in copy.glob("step-*")) == ["step-00000030", "step-00000050"]  # 30 stays


def test_keyed_checkpoints_are_checked_with_the_key_and_never_trusted_without(tmp_path):
    root = tmp_path / "keyed"
    key = {"FTLAUNCH_CKPT_KEY": "k" * 32}
    made = run(train_cmd("--ckpt-dir", str(root), *ARGS), timeout=240, env_extra=key)
    assert made.returncode == 0, made.tail()
    assert run([sys.executable, "-m", "checkpoint.cli", "verify", str(root), "--hash"], timeout=120,
               env_extra=key).returncode == 0
    unkeyed = ftckpt("verify", str(root))
    assert unkeyed.returncode == 1 and "signed, and FTLAUNCH_CKPT_KEY is not set" in unkeyed.output
    assert ftckpt("prune", str(root), "--keep-last", "1").returncode == 2  # refuses to judge them
    record = root / "step-00000030" / "manifest.json"
    forged = json.loads(record.read_text())
    forged["metadata"]["train_loss"] = 0.0001  # a better-looking loss, signature left as it was
    record.write_text(json.dumps(forged))
    checked = run([sys.executable, "-m", "checkpoint.cli", "verify", str(root)], timeout=120, env_extra=key)
    assert checked.returncode == 1 and "step 30: corrupt:" in checked.output and "signature" in checked.output


def test_safe_globals_trusts_the_types_the_job_trusted(tmp_path):
    """A job that saved a type of its own (``safe_globals=[Fraction]``): ftckpt refuses it as
    loading would, until told to trust it; a name it cannot import is bad input."""
    from fractions import Fraction

    from checkpoint import CheckpointManager

    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root, model=torch.nn.Linear(2, 2), safe_globals=[Fraction])
    mgr.training.extra["ratio"] = {"lr_scale": Fraction(1, 3)}
    mgr.save(1)
    mgr.close()
    refused = ftckpt("verify", str(root))
    assert refused.returncode == 1 and "Fraction" in refused.output, refused.output
    trusted = ftckpt("--safe-globals", "fractions.Fraction", "verify", str(root))
    assert trusted.returncode == 0, trusted.output
    diff = ftckpt("--safe-globals", "fractions.Fraction", "diff", str(root), "1", str(root), "1")
    assert diff.returncode == 0, diff.output
    for bad in ("fractions.NoSuch", "no_such_module.Thing", "Fraction"):
        result = ftckpt("--safe-globals", bad, "ls", str(root))
        assert result.returncode == 2 and result.output.strip().count("\n") == 0, result.output
        assert "--safe-globals" in result.output, result.output


def test_ls_into_a_closed_pipe_is_not_an_error(copy):
    for step in range(100, 3100):  # more rows than a pipe buffer holds: the reader is gone before the end
        (copy / f"step-{step:08d}").mkdir()
    result = run(["bash", "-c", f"{sys.executable} -m checkpoint.cli ls {copy} | head -1; exit ${{PIPESTATUS[0]}}"],
                 timeout=120)
    assert result.returncode == 0 and result.output.split() == ["step", "state", "world", "size", "age", "metrics"]
