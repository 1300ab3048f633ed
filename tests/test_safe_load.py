"""Loading never runs code from a checkpoint file, however well the file is forged.

Someone who can write the checkpoint directory can also rewrite the commit record's sizes and
crc32s, so a forged file always passes the checksums: these tests do exactly that, with a
payload that would create a marker file if it ever ran."""

from __future__ import annotations

import io
import json
import logging
import pickle
import zlib

import pytest
import torch

from checkpoint import CheckpointError
from procs import Payload, forge_metadata, rerecord
from test_commit_protocol import loaded_step, make_job, save_steps, train_step


def forge_item(step_dir, marker, fqn="counter.value") -> None:
    """Point one non-tensor item of a real checkpoint at a torch.save of the payload,
    appended to its shard; the metadata stays made of DCP's own classes only."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata = pickle.loads((step_dir / ".metadata").read_bytes())
    index = next(key for key in metadata.storage_data if key.fqn == fqn)  # a tensor's has its chunk's offset
    info = metadata.storage_data[index]
    shard = step_dir / info.relative_path
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    data = shard.read_bytes()
    metadata.storage_data[index] = _StorageInfo(info.relative_path, len(data), len(buf.getvalue()))
    rerecord(step_dir, info.relative_path, data + buf.getvalue())
    rerecord(step_dir, ".metadata", pickle.dumps(metadata))


def forge_tensor(step_dir, marker) -> None:
    """Point a tensor of a real checkpoint at a torch.save of the payload: discovery checks
    only the small items' pickles, so this one is met by the load (DCP's path, torch.load)."""
    forge_item(step_dir, marker, fqn="model.0.weight")


@pytest.mark.parametrize("forge", [forge_metadata, forge_item, forge_tensor], ids=["metadata", "non-tensor-item", "tensor"])
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
    assert "weights_only=False" not in warning and "Weights only load failed" not in warning, warning
    assert (root / "step-00000020").exists()  # skipped, not judged: discovery's rule for what it cannot load


def forge_tensor_directory(step_dir, marker) -> None:
    """A tensor's record whose front holds its own clean pickle (what the direct reader
    parses) while the zip directory at its end points at a second ``data.pkl``, the payload
    (what ``torch.load``, DCP's path for GPU or resharded targets, reads)."""
    import struct

    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata = pickle.loads((step_dir / ".metadata").read_bytes())
    index = next(key for key in metadata.storage_data if key.fqn == "model.0.weight")
    info = metadata.storage_data[index]
    shard = step_dir / info.relative_path
    data = shard.read_bytes()
    record = bytearray(data[info.offset:info.offset + info.length])
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    evil = torch._C.PyTorchFileReader(io.BytesIO(buf.getvalue())).get_record("data.pkl")
    directory = record.rfind(b"PK\x05\x06")
    zip64 = record.rfind(b"PK\x06\x06")
    start = struct.unpack_from("<Q", record, zip64 + 48)[0] if zip64 != -1 else struct.unpack_from("<I", record, directory + 16)[0]
    name = next(bytes(record[p + 46:p + 46 + struct.unpack_from("<H", record, p + 28)[0]])
                for p in range(start, len(record)) if record[p:p + 4] == b"PK\x01\x02"
                and record[p + 46:p + 46 + struct.unpack_from("<H", record, p + 28)[0]].endswith(b"/data.pkl"))
    crc = zlib.crc32(evil)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(evil), len(evil), len(name), 0) + name + evil
    central = bytearray(record[start:])
    p = 0
    while central[p:p + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", central, p + 28)
        if bytes(central[p + 46:p + 46 + name_len]) == name:
            struct.pack_into("<III", central, p + 16, crc, len(evil), len(evil))
            struct.pack_into("<I", central, p + 42, start)  # the new entry sits where the directory was
        p += 46 + name_len + extra_len + comment_len
    for signature, at, form in ((b"PK\x06\x06", 48, "<Q"), (b"PK\x06\x07", 8, "<Q"), (b"PK\x05\x06", 16, "<I")):
        found = central.find(signature, p)
        if found != -1:
            struct.pack_into(form, central, found + at, struct.unpack_from(form, central, found + at)[0] + len(local))
    forged = bytes(record[:start]) + local + bytes(central)
    metadata.storage_data[index] = _StorageInfo(info.relative_path, len(data), len(forged))
    rerecord(step_dir, info.relative_path, data + forged)
    rerecord(step_dir, ".metadata", pickle.dumps(metadata))


@pytest.mark.parametrize("forge", [forge_tensor, forge_tensor_directory], ids=["pickle", "zip-directory"])
def test_ftckpt_verify_hash_reads_every_tensor_record_as_loading_does(tmp_path, forge):
    """A forged tensor record passes the checksums (rewritten to match) and discovery (which
    reads no tensor record): ``ftckpt verify --hash`` reads each record as either way of
    loading it would (the direct reader from its front, ``torch.load`` from its zip directory)
    and names the refused one; nothing runs."""
    import sys

    from procs import run

    root, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    save_steps(root, [10, 20])
    forge(root / "step-00000020", marker)
    if forge is forge_tensor_directory:  # the forgery works: torch.load refuses it, the front is clean
        from torch.distributed.checkpoint import FileSystemReader

        from checkpoint.reader import _HEAD_BYTES, _saved_layout, _tensor_records
        info = next(v for k, v in FileSystemReader(str(root / "step-00000020")).read_metadata().storage_data.items()
                    if k.fqn == "model.0.weight")
        record = (root / "step-00000020" / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
        assert _saved_layout(_tensor_records(record[:_HEAD_BYTES])[0]["data.pkl"]) is not None
        with pytest.raises(pickle.UnpicklingError):
            torch.load(io.BytesIO(record), weights_only=True)
    result = run([sys.executable, "-m", "checkpoint.cli", "verify", str(root), "--hash"], timeout=120)
    assert result.returncode == 1, result.output
    refused = next(line for line in result.output.splitlines() if line.startswith("step 20: refused: "))
    assert "model.0.weight" in refused and "system" in refused and "weights_only=False" not in refused, refused
    assert "1 of 2 committed checkpoint(s) verify" in result.output, result.output
    assert not marker.exists(), "verifying ran code from the checkpoint"


@pytest.mark.parametrize("damage", ["transforms", "no-location"])
def test_item_that_load_could_not_read_is_refused_at_discovery(tmp_path, caplog, damage):
    """Metadata of DCP's own classes that loading would fail on (an item stored through a
    transform this library never writes, or with no location): refused when the checkpoint
    is verified, so the job falls back instead of failing the same load on every restart."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    root = tmp_path / "ckpt"
    save_steps(root, [10, 20])
    step_dir = root / "step-00000020"
    metadata = pickle.loads((step_dir / ".metadata").read_bytes())
    index = MetadataIndex("counter.value")
    info = metadata.storage_data.pop(index)
    if damage == "transforms":
        metadata.storage_data[index] = _StorageInfo(info.relative_path, info.offset, info.length, ["zstd"])
    rerecord(step_dir, ".metadata", pickle.dumps(metadata))
    with caplog.at_level(logging.WARNING):
        step, _ = loaded_step(root, verify="size")
    assert step == 10
    warning = next(r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING and "step-00000020" in r.getMessage())
    assert "counter.value" in warning and ("transforms ['zstd']" in warning or "no location" in warning), warning


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


KEY = "a-secret-only-this-job-holds-0123"


def test_keyed_mode_refuses_what_the_key_did_not_sign(tmp_path, caplog):
    """With hmac_key, a checkpoint someone rewrote (files and record alike, as the forger
    above does) fails: its record's signature no longer matches; an unsigned one too."""
    root = tmp_path / "ckpt"
    snaps = save_steps(root, [10, 20, 30], hmac_key=KEY)
    record = json.loads((root / "step-00000010" / "manifest.json").read_text())
    assert record["signature"] and all(f["sha256"] for f in record["files"].values())
    assert loaded_step(root, hmac_key=KEY)[0] == 30
    # A same-size replacement of a shard with its record's size and crc32 made to match.
    shard = sorted((root / "step-00000030").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rerecord(root / "step-00000030", shard.name, bytes(data))
    # And a record re-signed with another key.
    step20 = json.loads((root / "step-00000020" / "manifest.json").read_text())
    step20["signature"] = "0" * 64
    (root / "step-00000020" / "manifest.json").write_text(json.dumps(step20))
    with caplog.at_level(logging.WARNING):
        step, model = loaded_step(root, hmac_key=KEY, verify="size")
    assert step == 10
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "step-00000030/manifest.json: signature does not match" in warnings
    assert "step-00000020/manifest.json: signature does not match" in warnings
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snaps[10].items())
    # Unsigned checkpoints are refused under a key (and the other way round they load).
    plain = tmp_path / "plain"
    save_steps(plain, [5])
    with pytest.raises(CheckpointError, match="not signed with this job's key"):
        loaded_step(plain, hmac_key=KEY)


def test_keyed_mode_hash_check_uses_sha256(tmp_path):
    """A forger who keeps the record (and so its signature) but replaces a file with one of
    the same size and crc32 is caught by the SHA-256 the signed record lists."""
    root = tmp_path / "ckpt"
    save_steps(root, [10, 20], hmac_key=KEY)
    shard = sorted((root / "step-00000020").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    original_crc = zlib.crc32(bytes(data))
    data[100] ^= 0x01
    data[-4:] = _crc_fixup(bytes(data[:-4]), original_crc)
    assert zlib.crc32(bytes(data)) == original_crc and len(data) == shard.stat().st_size
    shard.write_bytes(bytes(data))
    assert loaded_step(root, verify="hash")[0] == 20  # crc32 alone is fooled (unkeyed)
    assert loaded_step(root, hmac_key=KEY, verify="hash")[0] == 10


def _crc_fixup(prefix: bytes, target: int) -> bytes:
    """4 bytes that, appended to ``prefix``, give crc32 ``target`` (crc32 is linear: this is
    why it is no defence against a forger)."""
    # Work backwards through the reflected CRC-32 register.
    poly, table = 0xEDB88320, []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    top = {t >> 24: i for i, t in enumerate(table)}
    reg = target ^ 0xFFFFFFFF
    indices = []
    for _ in range(4):
        i = top[reg >> 24]
        indices.append(i)
        reg = ((reg ^ table[i]) << 8) & 0xFFFFFFFF
    start = zlib.crc32(prefix) ^ 0xFFFFFFFF
    out = bytearray()
    for i in reversed(indices):
        b = (start ^ i) & 0xFF
        out.append(b)
        start = (start >> 8) ^ table[i]
    return bytes(out)


def test_plain_items_take_the_c_unpickler_and_nothing_else_does(tmp_path):
    """Plain Python items load through the C unpickler with no globals at all (the fast
    path) and give what ``torch.load(weights_only=True)`` gives; an item with any global (a
    numpy array, a forged callable) goes to ``torch.load`` and its allow-list."""
    import numpy as np

    from checkpoint.safe_load import _NOT_PLAIN, UnsafeCheckpointError, _plain_item, default_item_globals, load_item

    def saved(value) -> bytes:
        buf = io.BytesIO()
        torch.save(value, buf)
        return buf.getvalue()

    plain = [0.001, True, None, (0.9, 0.999), [0, 1, 2], {"lr": 1e-3, "params": [0]}, "adamw",
             2**200, list(range(100))]
    for value in plain:
        data = saved(value)
        assert _plain_item(io.BytesIO(data)) == value
        assert load_item(data, [], "item") == value == torch.load(io.BytesIO(data), weights_only=True)
    python_rng = (3, tuple(range(625)), None)  # plain, but too large for the fast path's opcode scan
    assert _plain_item(io.BytesIO(saved(python_rng))) is _NOT_PLAIN
    assert load_item(saved(python_rng), [], "item") == python_rng
    array = np.arange(5, dtype=np.uint32)
    data = saved(("MT19937", array, 0))
    assert _plain_item(io.BytesIO(data)) is _NOT_PLAIN
    kind, loaded, pos = load_item(data, default_item_globals(), "rng")
    assert kind == "MT19937" and pos == 0 and np.array_equal(loaded, array)
    assert _plain_item(io.BytesIO(saved(torch.ones(2)))) is _NOT_PLAIN
    marker = tmp_path / "MARKER"
    forged = saved(Payload(marker))
    assert _plain_item(io.BytesIO(forged)) is _NOT_PLAIN
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_item(forged, default_item_globals(), "forged")
    assert not marker.exists()


def _torch_save_with_pickle(pickled: bytes) -> bytes:
    """A ``torch.save`` archive whose ``data.pkl`` is ``pickled`` (what a forger writes)."""
    import zipfile

    buf = io.BytesIO()
    torch.save(0, buf)
    src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info.filename, pickled if info.filename.endswith("/data.pkl") else src.read(info.filename))
    return out.getvalue()


def test_c_unpicklers_refuse_a_cached_copyreg_extension_and_a_huge_memo_index(tmp_path):
    """The C unpicklers (plain items, tensor layouts, ``.metadata``) refuse globals through
    ``find_class``, which an extension code already in copyreg's cache bypasses (some library
    in the process registered one and unpickled it once); and a 13-byte pickle with memo index
    2**26 would make them allocate a 1 GiB memo table. Neither runs or allocates."""
    import copyreg
    import resource
    import struct

    from checkpoint.reader import _saved_layout
    from checkpoint.safe_load import (_NOT_PLAIN, UnsafeCheckpointError, _plain_item, default_item_globals,
                                      load_item, read_metadata)

    marker = tmp_path / "PWNED"
    command = f"touch {marker}".encode()
    forged = b"\x80\x02\x82\xf0X" + struct.pack("<I", len(command)) + command + b"\x85R."  # EXT1 240 (cmd) REDUCE
    copyreg.add_extension("os", "system", 240)
    try:
        assert pickle.loads(b"\x80\x02\x82\xf0.") is __import__("os").system  # now in copyreg's cache
        item = _torch_save_with_pickle(forged)
        assert _plain_item(io.BytesIO(item)) is _NOT_PLAIN
        with pytest.raises(UnsafeCheckpointError):
            load_item(item, default_item_globals(), "forged")
        assert _saved_layout(forged) is None
        with pytest.raises(UnsafeCheckpointError, match="extension code"):
            read_metadata(io.BytesIO(forged))
    finally:
        copyreg.remove_extension("os", "system", 240)
    assert not marker.exists(), "an unpickler ran code from a copyreg extension"

    huge_memo = b"\x80\x02Nr" + struct.pack("<I", 2**26) + b"."  # None, LONG_BINPUT 2**26
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert _plain_item(io.BytesIO(_torch_save_with_pickle(huge_memo))) is _NOT_PLAIN
    assert _saved_layout(huge_memo) is None
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 << 10, f"peak memory grew by {grown_kib >> 10} MiB"


def test_a_checkpoint_that_failed_while_loading_is_saved_again(tmp_path):
    """Verifying reads no tensor record, so a step whose record failed the load still looks
    committed: the job that fell back over it must write that step again when it gets there,
    not keep the forged one as its last checkpoint; the old one is quarantined, not deleted
    (the refusal may be this environment's)."""
    root, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    save_steps(root, [10, 20])
    forge_tensor(root / "step-00000020", marker)
    mgr, model, opt, sched, counter = make_job(root, seed=123)
    assert mgr.load().step == 10
    train_step(model, opt, sched, counter)
    result = mgr.save(20)
    assert result.outcome == "committed", result
    assert [p.name.split(".")[0] for p in (root / "quarantine").iterdir()] == ["step-00000020"]  # kept, not deleted
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.close()
    step, loaded = loaded_step(root)
    assert step == 20 and not marker.exists()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("case, items", [("same keys", 8), ("another rank's RNG", 8), ("another key", 8),
                                         ("torch 2.3 layout", 7), ("torch 2.3 layout, RNG only", 7)])
def test_the_planner_plans_whole_tensors_as_dcp_does(tmp_path, case, items):
    """SafeLoadPlanner plans plain tensors saved whole itself (DCP's planning of them cost
    7-13 ms of a 403 MB load): its read items must be DCP's own, item for item, whether the
    checkpoint holds just this state, another rank's RNG state too, another key, or torch
    2.3's key layout (where DCP's planning must run, as it looks for that layout; in the last
    case the layouts differ only under this rank's own RNG state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import _version
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from checkpoint.safe_load import SafeLoadPlanner, default_item_globals

    def state():
        torch.manual_seed(0)
        rng = {"torch": torch.arange(5)}
        optim = {"state": {"w": {"step": torch.tensor(3.0)}}}
        if case == "torch 2.3 layout, RNG only":
            rng["extra"] = {"k": 1}  # no tensor inside: one item in that layout, one per key in today's
        else:
            optim["param_groups"] = [{"lr": 0.1, "params": ["w"]}]
        return {"model": {"w": torch.nn.Parameter(torch.randn(5, 3)), "b": torch.randn(3), "scalar": torch.tensor(2.0),
                          "empty": torch.zeros(0, 4), "half": torch.randn(4, 2).half()},
                "optim": optim, "rng": {"rank_0": rng}}

    saved = state()
    if case == "another rank's RNG":
        saved["rng"]["rank_1"] = {"torch": torch.arange(5)}
    if case == "another key":
        saved["scheduler"] = {"x": torch.ones(2)}
    _version._derived_version = "2_3" if case.startswith("torch 2.3 layout") else None  # lists not flattened
    try:
        dcp.save(saved, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    finally:
        _version._derived_version = None
    metadata = dcp.FileSystemReader(str(tmp_path)).read_metadata()

    class DcpPlanning(SafeLoadPlanner):
        create_local_plan = DefaultLoadPlanner.create_local_plan

    plans = []
    for planner in (SafeLoadPlanner(default_item_globals(), "x"), DcpPlanning(default_item_globals(), "x")):
        planner.set_up_planner(state(), metadata, True)
        plans.append(planner.create_local_plan().items)
    assert plans[0] == plans[1]
    assert len(plans[0]) == items
