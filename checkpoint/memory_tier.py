"""How the manager uses the memory tier (``memory.py`` holds the slots): a snapshot per
``memory_every`` steps, and on load, the newest step every rank holds, unless the durable tier
is newer. Everything here is collective-free except one ``all_gather`` at start-up (does the
shared memory fit?) and one at load (which steps do the ranks hold?)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid

import torch

from . import _dist
from .config import CheckpointConfig
from .errors import CheckpointError, one_line
from .manifest import Manifest, is_committed, list_steps
from .memory import ROOT_ID_NAME, MemorySnapshots, MemoryTierError, decode
from .state import TrainingState, check_compatible, flatten_tensors, rng_key
from .storage import Storage

log = logging.getLogger("checkpoint")

TUNE_AFTER, WARMUP = 20, 4  # "auto" times this many snapshots, the first few not counted


class MemoryTierUnavailable(CheckpointError):
    """Shared memory is missing, unusable or too small for two slots per rank (every rank
    raises it alike, at start-up)."""


class MemoryTier:
    def __init__(self, config: CheckpointConfig, storage: Storage, training: TrainingState, rank: int,
                 world_size: int, group, safe_globals: list):
        self.storage, self.training, self.rank, self.group = storage, training, rank, group
        self.off = False
        self.last_step: int | None = None  # the newest step this process put in the tier
        # A fixed interval, or None while "auto" is still measuring (a snapshot every step until then).
        self.interval: int | None = None if config.memory_every == "auto" else config.memory_every
        self.overhead = config.memory_overhead
        self._costs: list[float] = []  # auto: seconds per snapshot, and per step without it
        self._steps: list[float] = []
        self._last_call: tuple[float, float] | None = None  # (when the last call began, its snapshot's cost)
        root_id = _dist.on_rank0(rank, self._root_id, f"cannot read or write {ROOT_ID_NAME} in {storage.url}", group)
        # This node's ranks: TorchElastic numbers a node's ranks in a row.
        local_rank, ranks_on_node = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self.first_on_node = local_rank == 0
        self.node_ranks = range(rank - local_rank, rank - local_rank + ranks_on_node)
        replicated = _replicated(training)
        node_copy = (self.node_ranks[0], ("model", "optim")) \
            if replicated and ranks_on_node > 1 and "LOCAL_RANK" in os.environ else None
        self.snapshots = MemorySnapshots(config.memory_dir, storage.url, os.environ.get("TORCHELASTIC_RUN_ID", ""),
                                         rank, world_size, root_id, safe_globals, node_copy, replicated)
        # The objects' own state dicts (DCP's get_state_dict would run the optimizer once to make
        # its state, which changes an Adam's step count); before the first step, count two
        # moments per parameter for the optimizer state that will appear.
        state = training.state_dict(rank, dcp=False)
        state_bytes = sum(t.numel() * t.element_size() for t in _tensors(state))
        if training.optimizer is not None and not training.optimizer.state:
            state_bytes += 2 * sum(t.numel() * t.element_size() for t in _tensors(state.get("model", {})))
        # One rank per node removes what earlier runs on this root left behind; only where the
        # root's lease (local roots) guarantees that no other run on it is alive.
        if storage.is_local and self.first_on_node:
            for path in self.snapshots.remove_stale():
                log.info("removed the memory snapshots an earlier run on this root left in %s", path)
        error = check_space(self.snapshots, state_bytes, 1 if node_copy else ranks_on_node)
        errors = [e for e in _dist.all_gather(error, group, usual=None) if e]
        if errors:  # every rank fails alike, before training
            raise MemoryTierUnavailable(errors[0])

    def _root_id(self) -> str:
        """The root's id for the memory tier: made once, so a root made again gets another."""
        path = self.storage.join(ROOT_ID_NAME)
        if not self.storage.exists(path):
            self.storage.write_atomic(path, uuid.uuid4().hex.encode())
        return self.storage.read_bytes(path).decode().strip()

    def maybe_snapshot(self, step: int) -> None:
        """Called every step, on every rank: snapshot when due. Under "auto", every step for the
        first ``TUNE_AFTER`` calls, timing each; then one ``all_gather`` of the timings sets
        the interval, the same on every rank (their snapshots must hold the same steps)."""
        if self.interval is not None:
            if step % self.interval == 0:
                self.snapshot(step)
            return
        began = time.perf_counter()
        if self._last_call is not None:
            self._steps.append(began - self._last_call[0] - self._last_call[1])
        self.snapshot(step)
        cost = time.perf_counter() - began
        self._last_call = (began, cost)
        self._costs.append(cost)
        if len(self._costs) == TUNE_AFTER:
            self.interval = self._tune()

    def _tune(self) -> int:
        """The smallest interval at which snapshots take at most ``overhead`` of the time,
        from every rank's median timings (the first few calls map and fault the slots in)."""
        def median(xs):
            xs = sorted(xs[WARMUP:])
            return xs[len(xs) // 2]

        timings = _dist.all_gather((median(self._costs), median(self._steps)), self.group)
        cost, step = max(c for c, _ in timings), max(min(s for _, s in timings), 1e-9)
        interval = max(1, math.ceil(cost / (self.overhead * step)))
        if self.rank == 0:
            log.info("memory tier: a snapshot takes %.2f ms, a step %.2f ms: one snapshot every %d step(s) keeps "
                     "them under %.0f%% of the time (--memory-every N to choose)", cost * 1e3, step * 1e3,
                     interval, self.overhead * 100)
        return interval

    def snapshot(self, step: int) -> None:
        """Copy this rank's state into its older slot (no collective). When that fails (the
        shared memory filled up since start-up), this rank's tier goes off with one line and
        training goes on: holding no snapshot, the rank makes the next restart load from disk."""
        if self.off:
            return
        try:
            self.snapshots.snapshot(step, self.training.state_dict(self.rank, dcp=False))
            self.last_step = step
        except MemoryTierError as e:
            log.error("%s; the memory tier is off on rank %d from now on (training goes on; a restart loads "
                      "the durable checkpoint)", e, self.rank)
            self.snapshots.keep_only(None)
            self.off = True

    def resume(self, started: float) -> tuple[Manifest | None, int | None]:
        """Load the newest snapshot every rank holds into the live objects, if it is not older
        than the newest durable commit: (a record of it, the newest durable step). Else
        (None, ...) after one line saying why, and the caller loads from disk."""
        newest = _dist.on_rank0(self.rank, self._newest_committed, f"cannot list {self.storage.url}", self.group)
        candidates, why = agree(self.snapshots, lambda x: _dist.all_gather(x, self.group), newest)
        if self.rank == 0 and candidates and why:
            log.warning("some memory snapshots are not usable: %s", why)
        if not candidates:  # the group changed (a node lost or joined, ranks renumbered)?
            resumed = self._resume_regrouped(newest, started)
            if resumed is not None:
                return resumed, newest
        for step in candidates:  # the same list on every rank: the same collectives
            error, state = None, None
            try:
                state = self.snapshots.read(step, views=("model",))  # load_state_dict copies the weights
                saved = {k: v for k, v in flatten_tensors(state).items() if k.startswith("model.")}
                check_compatible({"model": self.training.state_dict(self.rank, dcp=False)["model"]}, saved,
                                 self.snapshots.dir)  # the optimizer's own load_state_dict checks the rest
            except Exception as e:
                error = f"rank {self.rank}: {one_line(e)}"
            errors = [e for e in _dist.all_gather(error, self.group, usual=None) if e]
            if not errors:
                self.training.apply(state, self.rank, dcp=False)
                self.snapshots.keep_only(step)
                self.last_step = step
                log.info("resumed from the memory snapshot of step %d in %.3f s (no disk read); newest durable "
                         "checkpoint: step %s", step, time.monotonic() - started, newest)
                record = Manifest(step=step, world_size=self.snapshots.world_size, files={},
                                  metadata={"source": "memory"})
                return record, newest
            why = f"the memory snapshot of step {step} cannot be used: {errors[0]}"
            if self.rank == 0:
                log.warning("%s", why)
        if self.rank == 0 and (newest is not None or "hold none" not in why):
            log.warning("not resuming from memory: %s; loading the newest durable checkpoint", why)
        self.snapshots.keep_only(None)
        if self.first_on_node:  # ranks the group no longer has: their space
            self.snapshots.remove_other_ranks(range(self.snapshots.world_size))
        return None, newest

    def _resume_regrouped(self, newest: int | None, started: float) -> Manifest | None:
        """Resume from snapshots that the ranks hold under other numbers or another world
        size. After a node was lost, the survivors' nodes still hold the replicated state
        (weights, optimizer, scheduler, step counters, data cursor: the same on every rank)
        and the RNG states of the ranks they ran; a node that joined holds nothing, and gets
        the replicated state from the lowest rank that holds it (one broadcast). Rank i
        restores the RNG state of the earlier rank i wherever the group holds it (as a disk
        resume would), else keeps its own stream, like a rank that did not exist before.
        None: no such step (the caller says why in one line) or none could be read."""
        world_size = self.snapshots.world_size
        gather = lambda x: _dist.all_gather(x, self.group)  # noqa: E731
        gathered = gather((self.snapshots.node_inventory(), (self.node_ranks[0], len(self.node_ranks))))
        inventories, node_ranks = [inv for inv, _ in gathered], [ranks for _, ranks in gathered]
        for step, old_size, holders in regroup_candidates(inventories, node_ranks, world_size, newest):
            held_rngs: dict[int, int] = {}  # old rank i -> the lowest rank whose node holds its slot
            for j, inventory in enumerate(inventories):
                for r, w, s, _ in inventory:
                    if (w, s) == (old_size, step) and r < min(old_size, world_size):
                        held_rngs.setdefault(r, j)
            error, header, data, rngs = None, None, None, {}
            try:
                for i in (i for i, j in held_rngs.items() if j == self.rank):
                    rngs[i] = self.snapshots.of_rank(i, old_size).read(step, only=("rng",))["rng"][rng_key(i)]
                if self.rank in holders:
                    source = min((r for r, w, s, full in inventories[self.rank] if (w, s, full) == (old_size, step, True)),
                                 key=lambda r: (r != self.rank, r))
                    header, data = self.snapshots.of_rank(source, old_size).raw(step)
            except Exception as e:
                error = f"rank {self.rank}: {one_line(e)}"
            gathered = gather((error, rngs))
            errors = [e for e, _ in gathered if e]
            if not errors and len(holders) < world_size:  # a node that joined: one broadcast
                received = self._broadcast_slot(min(holders), header, data)
                if self.rank not in holders:
                    header, data = received
            state = None
            if not errors:
                try:
                    state = decode(header, data, self.snapshots.allowed_globals, views=("model",))
                    saved = {k: v for k, v in flatten_tensors(state).items() if k.startswith("model.")}
                    check_compatible({"model": self.training.state_dict(self.rank, dcp=False)["model"]}, saved,
                                     self.snapshots.dir)
                except Exception as e:
                    error = f"rank {self.rank}: {one_line(e)}"
                errors = [e for e in gather(error) if e]
            if errors:
                if self.rank == 0:
                    log.warning("the memory snapshots of step %d (world size %d) cannot be used: %s", step, old_size,
                                errors[0])
                continue
            held = {i: rng for _, part in gathered for i, rng in part.items()}
            state.pop("rng", None)
            if self.rank in held:
                state["rng"] = {rng_key(self.rank): held[self.rank]}
            self.training.apply(state, self.rank, dcp=False)
            self.snapshots.keep_only(None)  # this rank's slots of the old numbering
            if self.first_on_node:  # ranks the group no longer has
                self.snapshots.remove_other_ranks(range(world_size))
            if self.rank == 0:
                fresh = [i for i in range(min(old_size, world_size)) if i not in held]
                sent = [r for r in range(world_size) if r not in holders]
                log.info("resumed from the memory snapshots of step %d taken at world size %d, now %d, in %.3f s (no "
                         "disk read)%s%s; newest durable checkpoint: step %s", step, old_size, world_size,
                         time.monotonic() - started,
                         f"; rank(s) {sent} got the state from rank {min(holders)} over the network" if sent else "",
                         f"; rank(s) {fresh} start a fresh RNG stream (their predecessors' states were on a lost node)"
                         if fresh else "", newest)
            return Manifest(step=step, world_size=old_size, files={}, metadata={"source": "memory"})
        return None

    def _broadcast_slot(self, source: int, header: dict | None, data: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        """Rank ``source``'s slot (header and bytes) on every rank, over the manager's gloo
        group (host memory to host memory; every rank takes part, so the other holders
        receive a copy they do not use: a subgroup would cost a collective of its own)."""
        box = [header]
        torch.distributed.broadcast_object_list(box, src=source, group=self.group)
        header = box[0]
        buffer = data[:header["size"]] if self.rank == source else torch.empty(header["size"], dtype=torch.uint8)
        torch.distributed.broadcast(buffer, src=source, group=self.group)
        return header, buffer

    def _newest_committed(self) -> int | None:
        return max((s for s in list_steps(self.storage) if is_committed(self.storage, s)), default=None)

    def close(self) -> None:
        """The job is done (or stopped with its state committed): free the shared memory; on
        the node's first rank also that of ranks the group no longer has (a node that was lost
        and whose machine shares this one's /dev/shm, as on loopback)."""
        self.snapshots.remove()
        if self.first_on_node:  # the others remove their own
            self.snapshots.remove_other_ranks(self.node_ranks)


def _replicated(training: TrainingState) -> bool:
    """Whether the weights and the optimizer state are the same on every rank: under DDP with
    a plain optimizer. Then the node's first rank keeps the node's one copy of them, and
    after the group changed one rank's slot may serve another. Not for one process, a
    sharded optimizer or model."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(training.model, DistributedDataParallel) and \
        not isinstance(training.optimizer, ZeroRedundancyOptimizer)


def check_space(snapshots: MemorySnapshots, state_bytes: int, ranks_on_node: int) -> str | None:
        """Why two slots of ``state_bytes`` for each of ``ranks_on_node`` ranks will not fit,
        or None (the node's other ranks, holding one copy between them, need little)."""
        slot = state_bytes + 2**20  # and the pickled non-tensor part
        need = 2 * slot * ranks_on_node
        try:  # the rank's directory is made by its first snapshot, with the run's owner.json
            os.makedirs(snapshots.base_dir, exist_ok=True)
            # The run's slots already there get reused, or removed once the group resumed
            # (those of ranks that had other numbers before it changed too).
            held = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(snapshots.run_dir)
                       for n in names if n.endswith(".data"))
            free = shutil.disk_usage(snapshots.base_dir).free + held
        except OSError as e:
            return f"the memory tier cannot use {snapshots.dir}: {e.strerror or e}; give another --memory-dir " \
                   "(memory_dir=), or turn it off (--memory-every 0)"
        if free < need:
            return (f"the memory tier needs 2 slots x {slot / 2**20:.1f} MiB per rank x {ranks_on_node} rank(s) on this "
                    f"node = {need / 2**20:.0f} MiB in {os.path.dirname(snapshots.run_dir)}, which has {free / 2**20:.0f} MiB "
                    f"free: give the container more shared memory (docker run --shm-size={int(need * 1.25 / 2**20) + 64}m), "
                    "another --memory-dir, or turn it off (--memory-every 0)")
        return None


def agree(snapshots: MemorySnapshots, all_gather, newest_durable: int | None) -> tuple[list[int], str]:
    """The steps every rank holds a complete snapshot of, newest first and none older than the
    newest durable commit, with the problems the ranks found (one text); or ([], why none).
    ``all_gather`` is the group's; every rank gets the same answer."""
    mine = snapshots.complete()
    good = sorted(step for step, (_, problem) in mine.items() if problem is None)
    bad = {step: problem for step, (_, problem) in mine.items() if problem}
    gathered = all_gather((good, bad))
    problems = "; ".join(f"rank {r}: step {s}: {p}" for r, (_, b) in enumerate(gathered) for s, p in sorted(b.items()))
    common = sorted(set(gathered[0][0]).intersection(*(set(g) for g, _ in gathered[1:])), reverse=True)
    candidates = [step for step in common if newest_durable is None or step >= newest_durable]
    if candidates:
        return candidates, problems
    if common:
        return [], f"the newest durable checkpoint (step {newest_durable}) is newer than the memory snapshot (step {common[0]})"
    empty = [str(r) for r, (g, b) in enumerate(gathered) if not g and not b]
    return [], problems or (f"rank(s) {', '.join(empty)} hold none" if empty else "the ranks hold no step in common")


def regroup_candidates(inventories: list[list[tuple[int, int, int, bool]]], node_ranks: list[tuple[int, int]],
                       world_size: int, newest_durable: int | None) -> list[tuple[int, int, list[int]]]:
    """(step, world size it was taken at, the ranks whose node holds a slot of it with the
    replicated state in full), from every rank's ``MemorySnapshots.node_inventory`` and its
    node's ranks (first, count): newest first, none older than the newest durable commit, and
    only where the group did change since: another world size, a node holding nothing of the
    run (it joined), or a node holding slots of ranks it does not run now (renumbered). A
    group that did not change and holds no step in common (a rank's tier went off) loads
    from disk, as before: a regroup would lose that rank's RNG state."""
    joined = any(not inventory for inventory in inventories)
    holders: dict[tuple[int, int], list[int]] = {}
    for rank, inventory in enumerate(inventories):
        for step, size in sorted({(s, w) for _, w, s, full in inventory if full}):
            holders.setdefault((step, size), []).append(rank)

    def changed(step: int, size: int) -> bool:
        return size != world_size or joined or any(
            not first <= r < first + count for inventory, (first, count) in zip(inventories, node_ranks)
            for r, w, s, _ in inventory if (w, s) == (size, step))

    usable = [(step, size, ranks) for (step, size), ranks in holders.items()
              if (newest_durable is None or step >= newest_durable) and changed(step, size)]
    return sorted(usable, key=lambda c: (c[0], len(c[2])), reverse=True)  # one step at two sizes: more holders first


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for v in values for t in _tensors(v)]
