"""The memory tier: each rank keeps a snapshot of its training state in node-local shared
memory (tmpfs, ``/dev/shm``), so a restarted worker resumes from the step its predecessor
reached instead of the last durable checkpoint, without reading the disk.

Layout, one directory per run and rank (it outlives the worker process, not the node)::

    /dev/shm/ftckpt-<key>/rank<R>/
        slot0.data  slot0.json     two slots, written in turn: a kill in the middle of a
        slot1.data  slot1.json     copy damages the slot being written, never the other

A slot's ``.json`` header is its commit, written last (tmp file + rename): step, world size
and where each tensor lies in ``.data``. Before a slot is rewritten its header is removed, so a
slot with a header is always complete: the only way to tear a slot's data is to kill its
writer in the middle of the copy, and then the slot has no header. There is no checksum of the
data: taking one cost more than the copy itself (zlib's crc32 runs at a fifth of memcpy's
speed here), and what it would catch besides a torn copy, a bit flip in RAM, is ECC's job and
would hit the live training state just the same. The durable tier, which outlives the node,
keeps its crc32s.

``<key>`` names the run (TorchElastic's run id) and the durable root, so two jobs never read
each other's snapshots; the header also records the id in the root's ``memory-tier-id`` file
(made once, by the first job on the root), so a root deleted and made again (a fresh start)
never resumes from an older job's memory.

A snapshot is taken without any collective. The layout of its data (``memory_format.py``):
tensors copied raw, everything else (step counters, RNG states, the data cursor) a small
pickle read back with the same allow-list as disk checkpoints: loading never runs code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from typing import Any, Iterable

import torch

from .memory_format import Unpickler, join, layout_of, split, tensor_indices
from .safe_load import UnsafeCheckpointError
from .staging import copy_all

log = logging.getLogger("checkpoint")

FORMAT = 2  # 1 had a crc32 of the data


class MemoryTierError(RuntimeError):
    """A snapshot cannot be taken (shared memory too small or not writable)."""


def run_key(root: str, run_id: str) -> str:
    return hashlib.sha1(f"{os.path.abspath(root)}\0{run_id}".encode()).hexdigest()[:16]


ROOT_ID_NAME = "memory-tier-id"
OWNER_NAME = "owner.json"  # in a run's directory: {"root", "run_id"}


class MemorySnapshots:
    """This rank's two snapshot slots."""

    def __init__(self, base_dir: str, root: str, run_id: str, rank: int, world_size: int, root_id: str,
                 allowed_globals: Iterable = (), node_copy: tuple[int, tuple[str, ...]] | None = None,
                 replicated: bool = False):
        """``node_copy``: (the rank, on this node, whose slots hold the state every rank holds
        alike, those top-level keys). Under DDP the weights and the optimizer state are the
        same on every rank, so one copy per node is enough: the other ranks snapshot only
        what is theirs (RNG, data cursor) and read the rest from that rank's slot of the same
        step. None: this rank's slots hold all of its state. ``replicated``: whether that
        state (weights, optimizer, ...) is the same on every rank (DDP), so that after the
        group changed a slot of one rank may serve another (``node_inventory``)."""
        self.replicated = replicated
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
        self._node_copy: MemorySnapshots | None = None  # the slots this rank reads its replicated state from
        self._replicated: tuple[str, ...] = ()
        if node_copy is not None and node_copy[0] != rank:
            self._replicated = node_copy[1]
            self._node_copy = MemorySnapshots(base_dir, root, run_id, node_copy[0], world_size, root_id, allowed_globals)

    def _path(self, slot: int, ext: str) -> str:
        return os.path.join(self.dir, f"slot{slot}.{ext}")

    # -- taking one ------------------------------------------------------------------------
    def snapshot(self, step: int, state: dict) -> int:
        """Write ``state`` (this rank's ``TrainingState.state_dict``) as ``step`` into the
        older slot; returns the bytes written. Raises ``MemoryTierError`` when it cannot."""
        if self._replicated:  # the node's copy holds them
            state = {key: value for key, value in state.items() if key not in self._replicated}
        tensors: list[torch.Tensor] = []
        blob = pickle.dumps(split(state, tensors), protocol=4)  # 5 pickles numpy arrays through _frombuffer
        key = tuple((t.dtype, tuple(t.shape), t.device) for t in tensors)
        if self._layout is None or self._layout[0] != key:  # the same every step, in practice
            self._layout = (key, *layout_of(tensors))
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
            if views:  # streaming stores: nothing reads the slot until a restore
                copy_all(views, [t for t in tensors if t.numel()])
            data[offset:size].copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))

            # The slot's commit, last: its header.
            header = json.dumps({"format": FORMAT, "step": step, "rank": self.rank, "world_size": self.world_size,
                                 "root_id": self.root_id, "size": size, "skeleton": [offset, len(blob)],
                                 "node_copy": self._node_copy.rank if self._node_copy is not None else None,
                                 "replicated": self.replicated})
            tmp = self._path(slot, "json.tmp")
            with open(tmp, "w") as f:
                f.write(header[:-1] + ', "tensors": ' + layout_json + "}")
            os.replace(tmp, self._path(slot, "json"))
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
        if self._node_copy is not None:
            theirs = self._node_copy.complete()
            for step, (slot, problem) in found.items():
                if problem is None and step not in theirs:
                    found[step] = (slot, f"rank {self._node_copy.rank}'s copy of the replicated state lacks it")
                elif problem is None and theirs[step][1]:
                    found[step] = (slot, f"rank {self._node_copy.rank}'s copy of the replicated state: {theirs[step][1]}")
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
            self._skeleton(self._map(slot, h["size"]), h)  # small: refuse a forged one here, so an older slot can serve
        except UnsafeCheckpointError as e:
            return str(e)
        except Exception as e:  # a malformed header or pickle: any error, never a crash before the gather
            return f"unreadable: {type(e).__name__}: {e}"
        return None

    def _skeleton(self, data: torch.Tensor, h: dict) -> Any:
        return _skeleton(data, h, self.allowed_globals)

    def read(self, step: int, views: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> dict:
        """The state of ``step``: its tensors copied out of shared memory, except those under
        the top-level keys in ``views``, which point into it (for a consumer that copies them
        itself, as ``load_state_dict`` does a model's: one copy instead of two). A view is
        valid until this slot is written again, two snapshots later. ``only``: just those
        top-level keys (and only their tensors are copied)."""
        header, data = self.raw(step)
        state = decode(header, data, self.allowed_globals, views, only)
        if self._node_copy is not None and (only is None or set(only) & set(self._replicated)):
            replicated = self._node_copy.read(step, views, only)
            state.update({key: replicated[key] for key in self._replicated if key in replicated})
        return state

    def raw(self, step: int) -> tuple[dict, torch.Tensor]:
        """The header of ``step``'s slot and its bytes (a view into shared memory), for
        ``decode`` here or on another node (a node that joins gets them over the network)."""
        slot, problem = self.complete().get(step, (None, "no such step"))
        if problem:
            raise MemoryTierError(f"memory snapshot of step {step} in {self.dir}: {problem}")
        with open(self._path(slot, "json")) as f:
            header = json.load(f)
        return header, self._map(slot, header["size"])

    # -- after the group changed -------------------------------------------------------------
    def node_inventory(self) -> list[tuple[int, int, int, bool]]:
        """Every complete slot in this node's directory of the run, whichever rank and world
        size took it: (its rank, world size, step, whether it holds state that is the same on
        every rank, in full: not left to another rank's slot, not one rank's own shard)."""
        found = []
        try:
            names = os.listdir(self.run_dir)
        except OSError:
            return found
        for name in names:
            if not (name.startswith("rank") and name[4:].isdigit()):
                continue
            rank = int(name[4:])
            for slot, h in self.of_rank(rank, -1)._headers().items():
                world_size, step = h.get("world_size"), h.get("step")
                if isinstance(world_size, int) and isinstance(step, int) \
                        and self.of_rank(rank, world_size)._problem(slot, h) is None:
                    found.append((rank, world_size, step, h.get("replicated") is True and h.get("node_copy") is None))
        return sorted(found)

    def of_rank(self, rank: int, world_size: int) -> "MemorySnapshots":
        """The slots another rank of this node took at ``world_size``, to read."""
        return MemorySnapshots(self.base_dir, self.root, self.run_id, rank, world_size, self.root_id,
                               self.allowed_globals)

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
        was killed, or the node lost power mid-run). Call it only while holding the root's
        lease (no other run on it is alive); this run's commits make them older than the
        durable tier anyway.
        Returns the directories removed."""
        removed = []
        try:
            names = os.listdir(self.base_dir)
        except OSError:
            return removed  # no such directory, or not readable: check_space says so in one line
        for name in names:
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
        self._mapped.clear()  # the next snapshot maps its slot afresh (the file may have been replaced)
        self._views.clear()
        if self._node_copy is not None:  # read once, at a resume: let go of its mappings
            self._node_copy._mapped.clear()
            self._node_copy._views.clear()

    def remove(self) -> None:
        """This rank's slots; the run's directory too once no rank has any left."""
        self._mapped.clear()
        if self._node_copy is not None:
            self._node_copy._mapped.clear()
        self._views.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
        self._remove_run_dir_if_unused()

    def remove_other_ranks(self, keep: Iterable[int]) -> None:
        """The slots of every rank of the run on this node but those in ``keep`` (the ranks
        this node runs now): left by ranks that had other numbers before the group changed,
        or by a lost node whose machine shares this /dev/shm (as on loopback)."""
        keep = set(keep)
        try:
            names = os.listdir(self.run_dir)
        except OSError:
            return
        for name in names:
            if name.startswith("rank") and name[4:].isdigit() and int(name[4:]) not in keep:
                shutil.rmtree(os.path.join(self.run_dir, name), ignore_errors=True)
        self._remove_run_dir_if_unused()

    def _remove_run_dir_if_unused(self) -> None:
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


def _skeleton(data: torch.Tensor, h: dict, allowed_globals) -> Any:
    start, length = h["skeleton"]
    return Unpickler(io.BytesIO(bytes(data[start:start + length].numpy())), allowed_globals).load()


def decode(header: dict, data: torch.Tensor, allowed_globals, views: tuple[str, ...] = (),
           only: tuple[str, ...] | None = None) -> dict:
    """A slot's state from its header and bytes (``MemorySnapshots.read`` says what ``views``
    and ``only`` do). The non-tensor part goes through the allow-list unpickler."""
    skeleton = _skeleton(data, header, allowed_globals)
    wanted = None
    if only is not None:
        skeleton = {key: value for key, value in skeleton.items() if key in only}
        wanted = set(tensor_indices(skeleton))
    shared = {i for key in views if isinstance(skeleton, dict) and isinstance(skeleton.get(key), dict)
              for name, value in skeleton[key].items() if not str(name).endswith("_extra_state")
              for i in tensor_indices(value)}  # a module's extra state may be kept as given: a copy
    tensors = []
    for i, (dtype, shape, off, nbytes, device) in enumerate(header["tensors"]):
        if wanted is not None and i not in wanted:
            tensors.append(None)
            continue
        kind = getattr(torch, dtype)
        tensor = data[off:off + nbytes].view(kind).view(shape) if nbytes else torch.empty(shape, dtype=kind)
        if i in shared:
            pass  # load_state_dict copies it, to the parameter's device
        elif device != "cpu":  # back to this process's GPU (the writer may have been another rank's)
            tensor = tensor.to(_this_device(device), copy=True)
        else:  # fresh memory: faulting it in costs more than the copy here
            tensor = tensor.clone()
        tensors.append(tensor)
    return join(skeleton, tensors)


def _this_device(device: str) -> torch.device:
    """A CUDA tensor goes to this process's current GPU: a slot read by another rank of the
    node (one copy per node) was written from the writer's GPU."""
    kind = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if kind.type == "cuda" else kind
