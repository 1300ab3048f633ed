"""The memory tier: each rank keeps a snapshot of its training state in node-local shared
memory (tmpfs, ``/dev/shm``), so a restarted worker resumes from the step its predecessor
reached instead of the last durable checkpoint, without reading the disk.

Layout, one directory per run and rank (it outlives the worker process, not the node)::

    /dev/shm/ftckpt-<key>/rank<R>/
        slot0.data  slot0.json     two slots, written in turn: a kill in the middle of a
        slot1.data  slot1.json     copy damages the slot being written, never the other

A slot's ``.json`` header is its commit, written last (tmp file + rename): step, world size,
where each tensor lies in ``.data``, and the crc32 of ``.data``. Before a slot is rewritten
its header is removed, so a slot with a header is always complete. ``<key>`` names the run
(TorchElastic's run id) and the durable root, so two jobs never read each other's
snapshots; the header also records the id in the root's ``memory-tier-id`` file (made once,
by the first job on the root), so a root deleted and made again (a fresh start) never
resumes from an older job's memory.

A snapshot is taken without any collective. Tensors are copied raw; everything else (step
counters, RNG states, the data cursor) is a small ``torch.save`` blob read back with
``weights_only=True`` and the same allow-list as disk checkpoints: loading never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import zlib
from typing import Any, Iterable

import torch

from .safe_load import UnsafeCheckpointError

log = logging.getLogger("checkpoint")

FORMAT = 1
_ALIGN = 64
_TENSOR = "__ftckpt_shm_tensor__"  # marks where a tensor was in the pickled skeleton


class _Unpickler(pickle.Unpickler):
    """Plain pickle (a tenth of torch.save's time for the RNG states), read back allowing only
    the globals a disk checkpoint's non-tensor items may hold."""

    def __init__(self, stream, allowed):
        super().__init__(stream)
        self.allowed = {(getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "")): obj for obj in allowed}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name)) or self.allowed.get((module.replace("numpy.core", "numpy._core"), name))
        if found is None:
            raise UnsafeCheckpointError(f"refers to {module}.{name}, which loading does not allow (forged or from an "
                                        "unknown writer; a type of your own: CheckpointManager(safe_globals=[...]))")
        return found


class MemoryTierError(RuntimeError):
    """A snapshot cannot be taken (shared memory too small or not writable)."""


def run_key(root: str, run_id: str) -> str:
    return hashlib.sha1(f"{os.path.abspath(root)}\0{run_id}".encode()).hexdigest()[:16]


ROOT_ID_NAME = "memory-tier-id"
OWNER_NAME = "owner.json"  # in a run's directory: {"root", "run_id"}


_PLAIN = {int, float, bool, str, bytes, type(None)}


def _split(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The state with every tensor replaced by a marker holding its index in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return (_TENSOR, len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if all(map(_PLAIN.__contains__, map(type, obj))):  # Python's RNG state: 625 ints, at C speed
            return obj
        return type(obj)(_split(v, tensors) for v in obj)
    return obj


def _join(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == _TENSOR:
        return tensors[obj[1]]
    if isinstance(obj, dict):
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_join(v, tensors) for v in obj)
    return obj


def _layout_of(tensors: list[torch.Tensor]) -> tuple[list, str, int]:
    """Where each tensor goes in a slot: [dtype, shape, offset, bytes, device] each, that as
    JSON, and where the pickled rest starts."""
    layout, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        layout.append([str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes, str(t.device)])
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return layout, json.dumps(layout), offset


class MemorySnapshots:
    """This rank's two snapshot slots."""

    def __init__(self, base_dir: str, root: str, run_id: str, rank: int, world_size: int, root_id: str,
                 allowed_globals: Iterable = ()):
        self.base_dir, self.root, self.run_id = base_dir, os.path.abspath(root), run_id
        self.run_dir = os.path.join(base_dir, f"ftckpt-{run_key(root, run_id)}")
        self.dir = os.path.join(self.run_dir, f"rank{rank}")
        self.root_id = root_id
        self.allowed_globals = list(allowed_globals)  # what the non-tensor part may hold
        self.rank, self.world_size = rank, world_size
        self._next_slot: int | None = None
        self._owner_written = False
        self._mapped: dict[int, tuple[int, torch.Tensor]] = {}  # slot -> (capacity, uint8 view of its file)
        self._layout: tuple | None = None  # (tensor dtypes and shapes, layout, its JSON, where the pickle starts)
        self._views: dict[int, list[torch.Tensor]] = {}  # slot -> a view per tensor, into the mapping

    def _path(self, slot: int, ext: str) -> str:
        return os.path.join(self.dir, f"slot{slot}.{ext}")

    # -- taking one ------------------------------------------------------------------------
    def snapshot(self, step: int, state: dict) -> int:
        """Write ``state`` (this rank's ``TrainingState.state_dict``) as ``step`` into the
        older slot; returns the bytes written. Raises ``MemoryTierError`` when it cannot."""
        tensors: list[torch.Tensor] = []
        blob = pickle.dumps(_split(state, tensors), protocol=4)  # 5 pickles numpy arrays through _frombuffer
        key = tuple((t.dtype, tuple(t.shape), t.device) for t in tensors)
        if self._layout is None or self._layout[0] != key:  # the same every step, in practice
            self._layout = (key, *_layout_of(tensors))
            self._views.clear()
        _, layout, layout_json, offset = self._layout
        size = offset + len(blob)
        slot = self._choose_slot()
        try:
            if not self._owner_written:
                self._write_owner()
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            self._remove(self._path(slot, "json"))  # uncommit the slot before overwriting it
            data = self._map(slot, size, grow=True)
            views = self._views.get(slot)
            if views is None:
                views = self._views[slot] = [data[off:off + n].view(getattr(torch, dtype)).view(shape)
                                             for dtype, shape, off, n, _ in layout if n]
            torch._foreach_copy_(views, [t.detach() for t in tensors if t.numel()])  # one call, not one per tensor
            data[offset:size].copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
            header = json.dumps({"format": FORMAT, "step": step, "rank": self.rank, "world_size": self.world_size,
                                 "root_id": self.root_id, "size": size, "skeleton": [offset, len(blob)],
                                 "crc32": zlib.crc32(layout_json.encode(), zlib.crc32(data.numpy()))})
            tmp = self._path(slot, "json.tmp")
            with open(tmp, "w") as f:
                f.write(header[:-1] + ', "tensors": ' + layout_json + "}")
            os.replace(tmp, self._path(slot, "json"))  # the slot's commit
        except OSError as e:
            free = shutil.disk_usage(os.path.dirname(self.run_dir)).free if os.path.isdir(os.path.dirname(self.run_dir)) else 0
            raise MemoryTierError(
                f"cannot write a memory snapshot of step {step} to {self.dir}: {e.strerror or e}. It needs "
                f"2 x {size / 2**20:.1f} MiB per rank ({free / 2**20:.0f} MiB free there); give the container more "
                "shared memory (docker run --shm-size=...), another --memory-dir, or --memory-every 0") from None
        self._next_slot = 1 - slot
        return size

    def _choose_slot(self) -> int:
        if self._next_slot is None:  # this process's first snapshot: keep the newest slot intact
            steps = {slot: h.get("step") if isinstance(h.get("step"), int) else -1 for slot, h in self._headers().items()}
            free = [slot for slot in (0, 1) if slot not in steps]
            self._next_slot = free[0] if free else min(steps, key=lambda slot: steps[slot])
        return self._next_slot

    def _map(self, slot: int, size: int, grow: bool = False) -> torch.Tensor:
        """The first ``size`` bytes of the slot's file, mapped once and kept: the pickled part's
        length varies from step to step, so writing grows the file with room to spare (a new
        mapping per snapshot would page-fault the whole slot in again)."""
        mapped = self._mapped.get(slot)
        if mapped is None or mapped[0] < size:
            path = self._path(slot, "data")
            if grow:
                capacity = -(-(size + size // 8 + 2**16) // 4096) * 4096
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:  # reserve the pages now: a full tmpfs would answer a write through the mapping with SIGBUS
                    os.posix_fallocate(fd, 0, capacity)
                finally:
                    os.close(fd)
            else:
                capacity = os.path.getsize(path)
                if capacity < size:
                    raise OSError(f"{path} holds {capacity} bytes, its header says {size}")
            view = torch.from_file(path, shared=True, size=capacity, dtype=torch.uint8) if capacity \
                else torch.empty(0, dtype=torch.uint8)
            self._mapped[slot] = mapped = (capacity, view)
            self._views.pop(slot, None)  # they point into the old mapping
        return mapped[1][:size]

    # -- finding and reading -----------------------------------------------------------------
    def _headers(self) -> dict[int, dict]:
        out = {}
        for slot in (0, 1):
            try:
                with open(self._path(slot, "json")) as f:
                    header = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(header, dict):  # anything else is no header (every caller reads fields)
                out[slot] = header
        return out

    def complete(self) -> dict[int, tuple[int, str | None]]:
        """{step: (slot, None)} for every slot that holds a complete snapshot of this run at
        this world size, or {step: (slot, why not)} for one that does not."""
        found: dict[int, tuple[int, str | None]] = {}
        for slot, h in self._headers().items():
            step = h.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                continue
            problem = self._problem(slot, h)
            if step not in found or found[step][1] is not None:  # the same step twice: a good slot wins
                found[step] = (slot, problem)
        return found

    def _problem(self, slot: int, h: dict) -> str | None:
        if h.get("format") != FORMAT or h.get("rank") != self.rank:
            return "unknown format"
        if h.get("world_size") != self.world_size:
            return f"taken at world size {h.get('world_size')}, now {self.world_size}"
        if h.get("root_id") != self.root_id:
            return "taken for another checkpoint root (deleted and made again?)"
        try:
            if os.path.getsize(self._path(slot, "data")) < h["size"]:
                return "data shorter than its header says"
            data = self._map(slot, h["size"])
            if zlib.crc32(json.dumps(h["tensors"]).encode(), zlib.crc32(data.numpy())) != h["crc32"]:
                return "data does not match its crc32"
            self._skeleton(data, h)  # small: refuse a forged one here, so an older slot can serve
        except UnsafeCheckpointError as e:
            return str(e)
        except Exception as e:  # a malformed header or pickle: any error, never a crash before the gather
            return f"unreadable: {type(e).__name__}: {e}"
        return None

    def _skeleton(self, data: torch.Tensor, h: dict) -> Any:
        start, length = h["skeleton"]
        return _Unpickler(io.BytesIO(bytes(data[start:start + length].numpy())), self.allowed_globals).load()

    def read(self, step: int) -> dict:
        """The state of ``step`` (its tensors copied out of shared memory)."""
        slot, problem = self.complete()[step]
        if problem:
            raise MemoryTierError(f"memory snapshot of step {step} in {self.dir}: {problem}")
        with open(self._path(slot, "json")) as f:
            h = json.load(f)
        data = self._map(slot, h["size"])
        tensors = []
        for dtype, shape, off, nbytes, device in h["tensors"]:
            kind = getattr(torch, dtype)
            tensor = data[off:off + nbytes].view(kind).view(shape).clone() if nbytes else torch.empty(shape, dtype=kind)
            tensors.append(tensor.to(device))  # a CUDA tensor of the extra state goes back to its device
        return _join(self._skeleton(data, h), tensors)

    # -- cleaning up -------------------------------------------------------------------------
    def _write_owner(self) -> None:
        """Which root and run the directory belongs to, for ``remove_stale``."""
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.run_dir, f"{OWNER_NAME}.{self.rank}.tmp")
        with open(tmp, "w") as f:
            json.dump({"root": self.root, "run_id": self.run_id}, f)
        os.replace(tmp, os.path.join(self.run_dir, OWNER_NAME))
        self._owner_written = True

    def remove_stale(self) -> list[str]:
        """Remove the snapshots that earlier runs on the same root left behind (their launcher
        was killed, or the node lost power mid-run): a run holds the root's lease, so no other
        run on it is alive, and this one's commits make them older than the durable tier.
        Returns the directories removed."""
        removed = []
        for name in os.listdir(self.base_dir) if os.path.isdir(self.base_dir) else ():
            path = os.path.join(self.base_dir, name)
            if not name.startswith("ftckpt-") or path == self.run_dir:
                continue
            try:
                with open(os.path.join(path, OWNER_NAME)) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(owner, dict) and owner.get("root") == self.root:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def keep_only(self, step: int | None) -> None:
        """Uncommit every slot but the one holding ``step``: after a resume, an older slot is
        useless and a newer one is stale (the group went back to ``step``)."""
        for slot, h in self._headers().items():
            if h.get("step") != step:
                self._remove(self._path(slot, "json"))
        self._next_slot = None

    def remove(self) -> None:
        """This rank's slots; the run's directory too once no rank has any left."""
        self._mapped.clear()
        self._views.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            if not any(name.startswith("rank") for name in os.listdir(self.run_dir)):
                shutil.rmtree(self.run_dir, ignore_errors=True)  # and its owner.json
        except OSError:
            pass

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
