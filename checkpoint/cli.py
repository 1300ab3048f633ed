"""``ftckpt``: look at, check, export, prune and compare checkpoints (local or fsspec roots).

    ftckpt ls ROOT [--json]                      step, state, world size, size, age, metrics
    ftckpt verify ROOT [STEP] [--hash]           exit 0 when every (or that) checkpoint verifies
    ftckpt inspect ROOT STEP                     keys, shapes, dtypes and bytes, by prefix
    ftckpt export ROOT STEP -o model.pt|model.safetensors [--only model]
    ftckpt prune ROOT --keep-last K [--keep-every M] [--dry-run]
    ftckpt diff ROOT_A STEP_A ROOT_B STEP_B      which tensors differ, and by how much
    ftckpt --safe-globals pkg.mod.Type,... CMD   also trust your own types, as the job's safe_globals= did

Reading never runs code from a checkpoint: ``.metadata`` and non-tensor items go through the
same allow-list as loading (``checkpoint.safe_load``). A problem is one line on stderr and a
non-zero exit: 1 for a checkpoint that fails (verify, diff), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

from .errors import CheckpointError, one_line
from .manifest import MANIFEST_NAME, Manifest, list_steps, step_dir_name, verify
from .storage import Storage


class UsageError(Exception):
    """Bad input: exit 2 with one line."""


def _storage(root: str, options: str) -> Storage:
    if not root:
        raise UsageError("the checkpoint root is empty: give a directory or an fsspec URL")
    try:
        opts = json.loads(options) if options else {}
    except ValueError as e:
        raise UsageError(f"--storage-options is not valid JSON ({e})") from None
    if not isinstance(opts, dict):
        raise UsageError("--storage-options must be a JSON object ({...})")
    storage = Storage(root, opts)
    if not storage.exists(storage.root):
        raise UsageError(f"{storage.url}: no such checkpoint root")
    if storage.is_local and not os.path.isdir(storage.root):
        raise UsageError(f"{storage.url}: not a directory (give the checkpoint root, the folder of the step-* folders)")
    return storage


# Loading's allow-list for non-tensor items, plus the types named by --safe-globals (the
# ``safe_globals`` the job's CheckpointManager was given); set once by ``main``.
_allowed: list | None = None


def _safe_globals(names: str) -> list:
    """``pkg.module.Name,...`` -> the objects, imported by their names (the user names the
    code to trust, as with ``CheckpointManager(safe_globals=...)``; a file never does)."""
    import importlib

    from .safe_load import default_item_globals

    found = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        module_name, _, attr = name.rpartition(".")
        if not module_name:
            raise UsageError(f"--safe-globals: {name} is not a dotted name (pkg.module.Name)")
        try:
            found.append(getattr(importlib.import_module(module_name), attr))
        except Exception as e:
            raise UsageError(f"--safe-globals: cannot import {name} ({one_line(e)}); give pkg.module.Name, "
                             "importable here (check PYTHONPATH)") from None
    return [*default_item_globals(), *found]


def _key() -> bytes | None:
    """Keyed mode's key, from the environment as the training job takes it."""
    key = os.environ.get("FTLAUNCH_CKPT_KEY")
    return key.encode() if key else None


def _status(storage: Storage, step: int, mode: str) -> tuple[str, Manifest | None, str | None]:
    """(committed | uncommitted | corrupt | unchecked | refused, the record when readable, why
    not committed), by the rule loading follows (``manifest.verify``: sizes or hashes, the
    record of this step, non-tensor items through the allow-list, the signature with a key;
    with hashes, every tensor's record as loading reads it: ``refused`` when loading would
    refuse one).
    ``unchecked``: signed, and ``FTLAUNCH_CKPT_KEY`` is not set, so it cannot be trusted."""
    dirname = step_dir_name(step)
    if not storage.exists(storage.join(dirname, MANIFEST_NAME)):
        return "uncommitted", None, "no commit record (a save in flight, or one that died)"
    key = _key()
    manifest, reason = verify(storage, dirname, mode, _allowed, key=key)
    if manifest is not None and manifest.step != step:
        return "corrupt", None, f"its record says step {manifest.step} (copied or forged)"
    if manifest is not None and manifest.signature and key is None:
        return "unchecked", manifest, "signed, and FTLAUNCH_CKPT_KEY is not set: its signature is not checked"
    if manifest is not None and mode == "hash":  # every byte: the tensors' own pickles too, as loading reads them
        from .reader import refused_tensor_record

        try:
            refused = refused_tensor_record(storage, dirname)
        except OSError as e:
            return "corrupt", None, f"cannot read it ({one_line(e)})"
        if refused is not None:
            return "refused", manifest, refused
    if manifest is not None:
        return "committed", manifest, None
    return "corrupt", None, reason  # its record's figures are not to be believed


def _age(created: float) -> str:
    seconds = max(0.0, time.time() - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def cmd_ls(args) -> int:
    storage = _storage(args.root, args.storage_options)
    rows = []
    for step in list_steps(storage):
        state, manifest, reason = _status(storage, step, "hash" if args.hash else "size")
        metrics = {k: v for k, v in (manifest.metadata if manifest else {}).items() if isinstance(v, (int, float))
                   and not isinstance(v, bool) and k not in ("width", "seed")}
        rows.append({"step": step, "state": state, "world_size": manifest.world_size if manifest else None,
                     "bytes": manifest.total_bytes if manifest else None,
                     "created_unix": manifest.created_unix if manifest else None,
                     "metrics": metrics, "problem": reason})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"{storage.url}: no checkpoints")
        return 0
    print(f"{'step':>10}  {'state':<11}  {'world':>5}  {'size':>10}  {'age':>6}  metrics")
    for r in rows:
        size = f"{r['bytes'] / 2**20:.2f} MiB" if r["bytes"] is not None else "-"
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items()))
        print(f"{r['step']:>10}  {r['state']:<11}  {r['world_size'] or '-':>5}  {size:>10}  "
              f"{_age(r['created_unix']) if r['created_unix'] else '-':>6}  {r['problem'] or metrics}")
    return 0


def cmd_verify(args) -> int:
    storage = _storage(args.root, args.storage_options)
    steps = [args.step] if args.step is not None else list_steps(storage)
    if args.step is not None and args.step not in list_steps(storage):
        raise UsageError(f"{storage.url}: no checkpoint of step {args.step}")
    if not steps:
        print(f"{storage.url}: no checkpoints to verify", file=sys.stderr)
        return 1
    bad = committed = 0
    for step in steps:
        state, _, reason = _status(storage, step, "hash" if args.hash else "size")
        if state == "uncommitted":  # not a failure: a live job's save in flight looks the same
            print(f"step {step}: uncommitted: {reason}", file=sys.stderr)
            continue
        committed += 1
        if state != "committed":
            bad += 1
            print(f"step {step}: {state}: {reason}", file=sys.stderr)
    checked = (("every byte (SHA-256 and the signature)" if _key() else "every byte (crc32)")
               + ", every tensor's record as loading reads it") if args.hash else "sizes (--hash: every byte)"
    print(f"{committed - bad} of {committed} committed checkpoint(s) verify ({checked})")
    return 1 if bad else 0


def _committed(storage: Storage, step: int, mode: str = "hash") -> Manifest:
    """The record of ``step``, checked every byte (what is exported or compared must be what
    was committed); raises when it is not committed and sound."""
    if step not in list_steps(storage):
        raise UsageError(f"{storage.url}: no checkpoint of step {step}")
    state, manifest, reason = _status(storage, step, mode)
    if state != "committed":
        raise CheckpointError(f"{storage.url_of(step_dir_name(step))}: {state}: {reason}")
    return manifest


def _metadata(storage: Storage, step: int, mode: str = "hash"):
    from .reader import reader_for

    manifest = _committed(storage, step, mode)
    return manifest, reader_for(storage, step_dir_name(step)).read_metadata()


def cmd_inspect(args) -> int:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    storage = _storage(args.root, args.storage_options)
    _, metadata = _metadata(storage, args.step, "size")
    groups: dict[str, list] = defaultdict(list)
    for fqn, item in sorted(metadata.state_dict_metadata.items()):
        groups[fqn.split(".", 1)[0]].append((fqn, item))
    total = 0
    for prefix, items in groups.items():
        tensor_bytes = sum(_nbytes(i) for _, i in items if isinstance(i, TensorStorageMetadata))
        total += tensor_bytes
        print(f"{prefix}.  ({len(items)} items, {tensor_bytes / 2**20:.2f} MiB of tensors)")
        for fqn, item in items:
            if isinstance(item, TensorStorageMetadata):
                dtype = str(item.properties.dtype).removeprefix("torch.")
                print(f"  {fqn:<60} {dtype:<9} {str(list(item.size)):<20} {_nbytes(item):>12,} B")
            else:
                print(f"  {fqn:<60} (non-tensor item)")
    print(f"total: {total / 2**20:.2f} MiB of tensors in {sum(len(i) for i in groups.values())} items")
    return 0


def _nbytes(item) -> int:
    import math

    return math.prod(item.size) * item.properties.dtype.itemsize


def read_state(storage: Storage, step: int, items: bool = False) -> dict[str, Any]:
    """Every tensor of a committed, verified checkpoint by its DCP key (``model.fc.weight``),
    on the CPU; with ``items``, the non-tensor items too (through loading's allow-list)."""
    import math

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .reader import reader_for
    from .safe_load import SafeLoadPlanner, default_item_globals

    manifest, metadata = _metadata(storage, step)
    where = storage.url_of(step_dir_name(step))
    tensors = {fqn: item for fqn, item in metadata.state_dict_metadata.items()
               if isinstance(item, TensorStorageMetadata)}
    claimed = sum(_nbytes(item) for item in tensors.values())
    if claimed > manifest.total_bytes:  # a forged index would have us allocate it
        raise CheckpointError(f"{where}: its index claims {claimed:,} bytes of tensors, its files hold "
                              f"{manifest.total_bytes:,} (damaged or forged)")
    for fqn, item in tensors.items():  # every element must come from the files, none from the heap
        if sum(math.prod(chunk.sizes) for chunk in item.chunks) != math.prod(item.size):
            raise CheckpointError(f"{where}: tensor {fqn}'s stored chunks do not cover its shape "
                                  f"{list(item.size)} (damaged or forged)")
    state: dict[str, Any] = {fqn: torch.zeros(tuple(item.size), dtype=item.properties.dtype)
                             for fqn, item in tensors.items()}
    if items:
        state.update({fqn: None for fqn in metadata.state_dict_metadata if fqn not in tensors})
    dcp.load(state, storage_reader=reader_for(storage, step_dir_name(step)),
             planner=SafeLoadPlanner(_allowed or default_item_globals(), where), no_dist=True)
    return state


def cmd_export(args) -> int:
    import torch

    out = args.output
    if not out.endswith((".pt", ".pth", ".safetensors")):
        raise UsageError(f"-o {out}: give a .pt, .pth or .safetensors file name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UsageError(f"-o {out}: the folder {parent} does not exist")
    storage = _storage(args.root, args.storage_options)
    tensors = read_state(storage, args.step)
    if args.only:
        prefix = args.only.rstrip(".") + "."
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not tensors:
            raise UsageError(f"--only {args.only}: no tensors under {prefix!r} (see ftckpt inspect)")
    if out.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            raise UsageError("safetensors is not installed: pip install safetensors (or export to .pt)") from None
        save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata={"step": str(args.step)})
    else:
        torch.save(tensors, out)
    print(f"wrote {out}: {len(tensors)} tensors, {sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20:.2f}"
          f" MiB, from step {args.step} of {storage.url}")
    return 0


def cmd_prune(args) -> int:
    from .retention import stale_uncommitted, steps_to_delete

    if args.keep_last < 1:
        raise UsageError("--keep-last must be >= 1 (prune never deletes every checkpoint)")
    if args.keep_every < 0:
        raise UsageError("--keep-every must be >= 0")
    storage = _storage(args.root, args.storage_options)
    verified, uncommitted = [], []
    for step in list_steps(storage):  # what loading would accept counts, checked every byte, as retention does
        state, _, reason = _status(storage, step, "hash")
        if state == "unchecked":
            raise UsageError(f"step {step}: {reason}; set it to prune (an unsigned forgery must not push out "
                             "the signed checkpoints)")
        (verified if state == "committed" else uncommitted if state == "uncommitted" else []).append(step)
        if state in ("corrupt", "refused"):
            print(f"step {step}: {state} ({reason}); left alone", file=sys.stderr)
    if not verified:
        print(f"{storage.url}: no committed checkpoint; nothing pruned")
        return 0
    newest = max(verified)
    doomed = sorted(steps_to_delete(verified, newest, args.keep_last, args.keep_every)
                    | stale_uncommitted(uncommitted, newest))
    for step in doomed:
        path = storage.join(step_dir_name(step))
        if args.dry_run:
            print(f"would remove {storage.url_of(step_dir_name(step))}")
            continue
        record = storage.join(step_dir_name(step), MANIFEST_NAME)
        if storage.exists(record):
            storage.fs.rm(record)  # uncommit first, as retention does: a half-deleted dir is never loaded
        storage.remove_tree(path)
        print(f"removed {storage.url_of(step_dir_name(step))}")
    kept = sorted(set(verified) - set(doomed))
    print(f"{'would keep' if args.dry_run else 'kept'} {len(kept)} committed checkpoint(s): "
          f"{', '.join(map(str, kept))}")
    return 0


def cmd_diff(args) -> int:
    import torch

    from .state import rng_as_captured

    a = read_state(_storage(args.root_a, args.storage_options), args.step_a, items=True)
    b = read_state(_storage(args.root_b, args.storage_options), args.step_b, items=True)
    differ = 0
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if key.startswith("rng."):  # python's and numpy's: tensors since 2026-11, tuples before
            x, y = rng_as_captured(key, x), rng_as_captured(key, y)
        if key not in b or key not in a:
            print(f"{key}: only in {'A' if key in a else 'B'}")
        elif isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            print(f"{key}: a tensor in one, not in the other")
        elif not isinstance(x, torch.Tensor):  # step counters, the data cursor, RNG states, hyperparameters
            if _same_item(x, y):
                continue
            print(f"{key}: {_short(x)} vs {_short(y)}")
        elif x.shape != y.shape or x.dtype != y.dtype:
            print(f"{key}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
        elif not _equal(x, y):  # same shape and dtype
            print(f"{key}: max abs difference {(x.double() - y.double()).abs().max().item():.6g}")
        else:
            continue
        differ += 1
    print(f"{len(set(a) | set(b)) - differ} item(s) equal (tensors bitwise), {differ} differ")
    return 1 if differ else 0


def _same_item(x, y) -> bool:
    """Equal all the way down: RNG states are tuples holding arrays, which ``==`` refuses."""
    import numpy as np
    import torch

    if type(x) is not type(y):
        return False
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_same_item(a, b) for a, b in zip(x, y))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same_item(x[k], y[k]) for k in x)
    if isinstance(x, np.ndarray):
        return x.dtype == y.dtype and np.array_equal(x, y)
    if isinstance(x, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and _equal(x, y)
    try:
        return bool(x == y)
    except Exception:  # incomparable: different
        return False


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _equal(x, y) -> bool:
    """Bitwise, as the exact-resume oracle means it (NaN equals the same NaN)."""
    import torch

    return torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ftckpt", description=__doc__.split("\n")[0])
    p.add_argument("--storage-options", default="", help="fsspec options for a remote root, as JSON")
    p.add_argument("--safe-globals", default="", metavar="pkg.mod.Name,...",
                   help="your own types that non-tensor items hold (the job's safe_globals=), trusted as loading does")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ls = sub.add_parser("ls", help="the checkpoints under ROOT")
    ls.add_argument("root")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--hash", action="store_true", help="check every byte, not only sizes, for the state column")
    v = sub.add_parser("verify", help="exit 0 when every checkpoint (or STEP) verifies")
    v.add_argument("root")
    v.add_argument("step", type=int, nargs="?")
    v.add_argument("--hash", action="store_true", help="check every byte (crc32; with FTLAUNCH_CKPT_KEY set, "
                   "as keyed jobs save: SHA-256, and every record's signature whatever the mode) and read every "
                   "tensor's record as loading does")
    i = sub.add_parser("inspect", help="keys, shapes, dtypes and bytes of one checkpoint")
    i.add_argument("root")
    i.add_argument("step", type=int)
    e = sub.add_parser("export", help="one checkpoint's tensors as a single .pt or .safetensors file")
    e.add_argument("root")
    e.add_argument("step", type=int)
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--only", default="", help="just the tensors under this prefix, without it (e.g. model)")
    pr = sub.add_parser("prune", help="delete all but the newest committed checkpoints (retention's rules)")
    pr.add_argument("root")
    pr.add_argument("--keep-last", type=int, required=True)
    pr.add_argument("--keep-every", type=int, default=0)
    pr.add_argument("--dry-run", action="store_true")
    d = sub.add_parser("diff", help="which tensors and items of two checkpoints differ (exit 1 when any does)")
    d.add_argument("root_a")
    d.add_argument("step_a", type=int)
    d.add_argument("root_b")
    d.add_argument("step_b", type=int)
    return p


COMMANDS = {"ls": cmd_ls, "verify": cmd_verify, "inspect": cmd_inspect, "export": cmd_export, "prune": cmd_prune,
            "diff": cmd_diff}


def main(argv: list[str] | None = None) -> int:
    global _allowed
    args = build_parser().parse_args(argv)
    try:
        _allowed = _safe_globals(args.safe_globals)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # ftckpt ls | head: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as e:
        print(f"ftckpt: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # a damaged checkpoint: its own one line
        print(f"ftckpt: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unreadable file, an unreachable store, a refused write...
        print(f"ftckpt: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
