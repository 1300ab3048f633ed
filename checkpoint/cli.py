"""``ftckpt``: look at, check, export, prune and compare checkpoints (local or fsspec roots).

    ftckpt ls ROOT [--json]                      step, state, world size, size, age, metrics
    ftckpt verify ROOT [STEP] [--hash]           exit 0 when every (or that) checkpoint verifies
    ftckpt inspect ROOT STEP                     keys, shapes, dtypes and bytes, by prefix
    ftckpt export ROOT STEP -o model.pt|model.safetensors [--only model]
    ftckpt prune ROOT --keep-last K [--keep-every M] [--dry-run]
    ftckpt diff ROOT_A STEP_A ROOT_B STEP_B      which tensors differ, and by how much

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
    try:
        opts = json.loads(options) if options else {}
    except ValueError as e:
        raise UsageError(f"--storage-options is not valid JSON ({e})") from None
    storage = Storage(root, opts)
    if not storage.exists(storage.root):
        raise UsageError(f"{storage.url}: no such checkpoint root")
    return storage


def _status(storage: Storage, step: int, mode: str) -> tuple[str, Manifest | None, str | None]:
    """(committed | uncommitted | corrupt, the record when readable, why not committed)."""
    dirname = step_dir_name(step)
    if not storage.exists(storage.join(dirname, MANIFEST_NAME)):
        return "uncommitted", None, "no commit record"
    manifest, reason = verify(storage, dirname, mode)
    if manifest is not None:
        return "committed", manifest, None
    try:
        record = Manifest.from_json(storage.read_bytes(storage.join(dirname, MANIFEST_NAME)))
    except (OSError, ValueError):
        record = None
    return "corrupt", record, reason


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
              f"{_age(r['created_unix']) if r['created_unix'] else '-':>6}  {metrics or r['problem'] or ''}")
    return 0


def cmd_verify(args) -> int:
    storage = _storage(args.root, args.storage_options)
    steps = [args.step] if args.step is not None else list_steps(storage)
    if args.step is not None and args.step not in list_steps(storage):
        raise UsageError(f"{storage.url}: no checkpoint of step {args.step}")
    bad = 0
    for step in steps:
        state, _, reason = _status(storage, step, "hash" if args.hash else "size")
        if state != "committed":
            bad += 1
            print(f"step {step}: {state}: {reason}", file=sys.stderr)
    checked = "every byte (crc32/SHA-256)" if args.hash else "sizes (--hash: every byte)"
    print(f"{len(steps) - bad} of {len(steps)} checkpoint(s) verify ({checked})")
    return 1 if bad else 0


def _committed(storage: Storage, step: int) -> Manifest:
    if step not in list_steps(storage):
        raise UsageError(f"{storage.url}: no checkpoint of step {step}")
    state, manifest, reason = _status(storage, step, "size")
    if state != "committed":
        raise CheckpointError(f"{storage.url_of(step_dir_name(step))}: {state}: {reason}")
    return manifest


def _metadata(storage: Storage, step: int):
    from .reader import reader_for

    _committed(storage, step)
    return reader_for(storage, step_dir_name(step)).read_metadata()


def cmd_inspect(args) -> int:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    storage = _storage(args.root, args.storage_options)
    metadata = _metadata(storage, args.step)
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


def read_tensors(storage: Storage, step: int) -> dict[str, Any]:
    """Every tensor of a committed checkpoint, by its DCP key (``model.fc.weight``), on the CPU."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .reader import reader_for
    from .safe_load import SafeLoadPlanner, default_item_globals

    metadata = _metadata(storage, step)
    state = {fqn: torch.empty(tuple(item.size), dtype=item.properties.dtype)
             for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}
    where = storage.url_of(step_dir_name(step))
    dcp.load(state, storage_reader=reader_for(storage, step_dir_name(step)),
             planner=SafeLoadPlanner(default_item_globals(), where), no_dist=True)
    return state


def cmd_export(args) -> int:
    import torch

    out = args.output
    if not out.endswith((".pt", ".pth", ".safetensors")):
        raise UsageError(f"-o {out}: give a .pt, .pth or .safetensors file name")
    storage = _storage(args.root, args.storage_options)
    tensors = read_tensors(storage, args.step)
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
    storage = _storage(args.root, args.storage_options)
    verified, uncommitted = [], []
    for step in list_steps(storage):
        state, _, reason = _status(storage, step, "size")
        (verified if state == "committed" else uncommitted if state == "uncommitted" else []).append(step)
        if state == "corrupt":
            print(f"step {step}: corrupt ({reason}); left alone", file=sys.stderr)
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
    a = read_tensors(_storage(args.root_a, args.storage_options), args.step_a)
    b = read_tensors(_storage(args.root_b, args.storage_options), args.step_b)
    differ = 0
    for key in sorted(set(a) | set(b)):
        if key not in b or key not in a:
            print(f"{key}: only in {'A' if key in a else 'B'}")
        elif a[key].shape != b[key].shape or a[key].dtype != b[key].dtype:
            print(f"{key}: {a[key].dtype} {list(a[key].shape)} vs {b[key].dtype} {list(b[key].shape)}")
        elif not _equal(a[key], b[key]):  # same shape and dtype
            print(f"{key}: max abs difference {(a[key].double() - b[key].double()).abs().max().item():.6g}")
        else:
            continue
        differ += 1
    same = len(set(a) | set(b)) - differ
    print(f"{same} tensor(s) bitwise equal, {differ} differ")
    return 1 if differ else 0


def _equal(x, y) -> bool:
    """Bitwise, as the exact-resume oracle means it (NaN equals the same NaN)."""
    import torch

    return torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftckpt", description=__doc__.split("\n")[0])
    p.add_argument("--storage-options", default="", help="fsspec options for a remote root, as JSON")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="the checkpoints under ROOT")
    ls.add_argument("root")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--hash", action="store_true", help="check every byte, not only sizes, for the state column")
    v = sub.add_parser("verify", help="exit 0 when every checkpoint (or STEP) verifies")
    v.add_argument("root")
    v.add_argument("step", type=int, nargs="?")
    v.add_argument("--hash", action="store_true", help="check every byte (crc32; SHA-256 in keyed mode)")
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
    d = sub.add_parser("diff", help="which tensors of two checkpoints differ (exit 1 when any does)")
    d.add_argument("root_a")
    d.add_argument("step_a", type=int)
    d.add_argument("root_b")
    d.add_argument("step_b", type=int)
    return p


COMMANDS = {"ls": cmd_ls, "verify": cmd_verify, "inspect": cmd_inspect, "export": cmd_export, "prune": cmd_prune,
            "diff": cmd_diff}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"ftckpt: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, OSError, ValueError) as e:  # a damaged checkpoint, an unreadable file
        print(f"ftckpt: error: {one_line(e)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # ftckpt ls | head
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
