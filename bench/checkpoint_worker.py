"""One rank of the checkpoint benchmark (started by ``bench/checkpoint_bench.py`` under torchrun).

Every arm saves the same live DDP model + AdamW state. Per arm, with training idle between
saves: the stall (how long the training thread is blocked by one save), the time until the
checkpoint is durable (and, for ours, committed), and the load time from a cold page cache.
Then training throughput with a save every N steps, against the same steps without saves.

Arms: A torch.save on rank 0; B DCP save; C DCP async_save (thread, as shipped); D ours
sync; E ours async; M ours, the memory tier's snapshot (into --memory-dir, node-local shared
memory: "durable" there means its header, the slot's commit, is written; its load reads it
back into the live objects). Results go to --out as JSON (rank 0).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import mmap
import os
import random
import shutil
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointManager, Observer, direct_io
from checkpoint.memory import MemorySnapshots
from checkpoint.retention import finish_deletions
from checkpoint.safe_load import default_item_globals
from checkpoint.storage import fsync_dir
from checkpoint.state import TrainingState

ARMS = {"A": "torch.save, rank 0", "B": "DCP save (sync)", "C": "DCP async_save",
        "D": "ours, sync", "E": "ours, async", "M": "ours, memory tier snapshot"}


def build(state_mb: float, seed: int = 0):
    """An MLP whose weights + AdamW moments take about ``state_mb`` MB (3 x 4 bytes/param)."""
    width = 2048 if state_mb >= 100 else 512
    layers = max(1, round(state_mb * 1e6 / 12 / (width * (width + 1))))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return model, width


def forget_optimizer_state(opt) -> None:
    """As in a restarted worker, which has the model's weights but no optimizer state yet:
    drop it and hand its pages back to the kernel (glibc would otherwise reuse them warm),
    so that the load pays for fresh memory as a new process does."""
    opt.state.clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the load may reuse warm memory
        pass


def rank_memcpy_seconds(nbytes: int, device: torch.device) -> tuple[float, float]:
    """Every rank copies ``nbytes`` at the same time (they share the memory bandwidth, as
    their snapshots do): the slowest rank's time into a reused buffer, and into fresh
    memory that the kernel must first hand out (what a new process's load must do)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    warm = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    warm.copy_(src)
    warm_s, fresh_s = [], []
    for _ in range(3):
        dist.barrier()
        started = time.monotonic()
        warm.copy_(src)
        warm_s.append(wall_max(time.monotonic() - started))
        dist.barrier()
        started = time.monotonic()
        fresh = torch.empty(nbytes, dtype=torch.uint8)  # one large block: glibc maps it fresh each time
        fresh.copy_(src)
        fresh_s.append(wall_max(time.monotonic() - started))
        del fresh
    return min(warm_s), min(fresh_s)


def wall_max(seconds: float) -> float:
    """The slowest rank's time: a save or load is done when every rank is done."""
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def evict(directory: str) -> None:
    """Drop the directory's files from the page cache (clean pages only), so a load reads
    from the disk like one after a restart on another machine would."""
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except FileNotFoundError:  # an old checkpoint that retention is deleting
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def cold_read_seconds(paths: list[str], buffer: torch.Tensor) -> float:
    """One process reading ``paths`` whole, 16 MiB at a time into a reused buffer (torch
    memory: huge pages where the kernel allows, as the live tensors a load fills)."""
    view = memoryview(buffer.numpy())
    started = time.monotonic()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.monotonic() - started


def fsynced_write_seconds(path: str, nbytes: int, chunk) -> float:
    """One process writing ``nbytes`` (``chunk`` after ``chunk``) into the new file ``path``
    and fsyncing it: a save's bound on the disk of its own moment."""
    started = time.monotonic()
    with open(path, "wb", buffering=0) as f:
        for offset in range(0, nbytes, len(chunk)):
            f.write(chunk[:min(len(chunk), nbytes - offset)])
        os.fsync(f.fileno())
    return time.monotonic() - started


def direct_write_seconds(path: str, nbytes: int, chunk: mmap.mmap) -> float:
    """One process writing ``nbytes`` into the new file ``path`` with O_DIRECT, ``chunk`` (a
    page-aligned buffer) after ``chunk``, the end padded to 4 KiB and truncated back, then
    fsyncing it: what ours' O_DIRECT writer could reach at best. NaN where ours does not
    write with O_DIRECT, or it is refused."""
    if not direct_io.ENABLED or direct_io._file_system_type(os.path.dirname(path)) not in direct_io.DIRECT_FILE_SYSTEMS:
        return math.nan
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
    except (OSError, AttributeError):
        return math.nan
    started = time.monotonic()
    try:
        with memoryview(chunk) as view:
            for offset in range(0, nbytes, len(chunk)):
                n = min(len(chunk), nbytes - offset)
                if os.pwrite(fd, view[:-(-n // 4096) * 4096], offset) < n:
                    return math.nan  # a short write: no bound
        os.ftruncate(fd, nbytes)
        os.fsync(fd)
    except OSError:
        return math.nan
    finally:
        os.close(fd)
    return time.monotonic() - started


def dir_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


class Arm:
    """save(step) returns when the caller may train again; durable() blocks until that save
    is durable (committed for ours) and returns the monotonic time it became so."""

    def __init__(self, name: str, root: str, ddp: DDP, opt, group, memory_dir: str = "/dev/shm"):
        self.name, self.root, self.ddp, self.opt, self.group = name, root, ddp, opt, group
        self.rank = dist.get_rank()
        self.done_at = 0.0
        self.future = None
        self.last = None
        self.ckpt = None
        if name == "M":
            self.training = TrainingState(ddp, opt)
            self.snapshots = MemorySnapshots(memory_dir, root, f"bench-{os.getpid()}", self.rank, dist.get_world_size(),
                                             "bench", default_item_globals())
            self.nbytes = 0
        if name in "DE":
            arm = self

            class CommitTime(Observer):
                def committed(self, _manifest) -> None:
                    arm._committed(None)

            self.ckpt = CheckpointManager(root, model=ddp, optimizer=opt, keep_last=2, observer=CommitTime(),
                                          async_mode="thread" if name == "E" else "off")

    def _committed(self, _manifest) -> None:
        self.done_at = time.monotonic()

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")

    def files(self) -> list[str]:
        """The files of the last save, which a load reads."""
        if self.name == "A":
            return [self.path(self.last) + ".pt"]
        directory = self.path(self.last)
        return [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in sorted(fs)]

    def save(self, step: int) -> None:
        self.last = step
        if self.name == "A":
            if self.rank == 0:
                state = {"model": self.ddp.module.state_dict(), "optim": self.opt.state_dict()}
                os.makedirs(self.root, exist_ok=True)
                with open(self.path(step) + ".pt", "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
            dist.barrier()
            self.done_at = time.monotonic()
        elif self.name in "BC":
            model_sd, optim_sd = get_state_dict(self.ddp, self.opt)
            state = {"model": model_sd, "optim": optim_sd}
            if self.name == "B":
                dcp.save(state, checkpoint_id=self.path(step))
                self.done_at = time.monotonic()
            else:
                if self.future is not None:
                    self.future.result()
                self.future = dcp.async_save(state, checkpoint_id=self.path(step), process_group=self.group)
                self.future.add_done_callback(lambda _f: self._committed(None))
        elif self.name == "M":
            self.nbytes = self.snapshots.snapshot(step, self.training.state_dict(self.rank, dcp=False))
            self.done_at = time.monotonic()
        else:
            self.ckpt.save(step)

    def durable(self) -> float:
        if self.future is not None:
            self.future.result()
            self.future = None
        if self.ckpt is not None:
            self.ckpt.wait()
        return self.done_at

    def load(self) -> None:
        if self.name == "A":
            state = torch.load(self.path(self.last) + ".pt", map_location=next(self.ddp.parameters()).device,
                               weights_only=True)
            self.ddp.module.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optim"])
        elif self.name in "BC":
            model_sd, optim_sd = get_state_dict(self.ddp, self.opt)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=self.path(self.last))
            set_state_dict(self.ddp, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        elif self.name == "M":  # what MemoryTier.resume does, less its agreement between ranks
            self.training.apply(self.snapshots.read(self.last, views=("model",)), self.rank, dcp=False)
        else:
            assert self.ckpt.load().step == self.last

    def close(self) -> None:
        self.durable()
        if self.ckpt is not None:
            self.ckpt.close()
        if self.name == "M":
            self.snapshots.remove()


def in_turn(arms: dict, round_: int) -> list:
    """The arms' items in this round's order: shuffled, the same on every rank (seeded by
    the round), so that no arm always follows the same one."""
    items = list(arms.items())
    return random.Random(round_).sample(items, len(items))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--state-mb", type=float, required=True)
    p.add_argument("--ckpt-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--saves", type=int, default=7)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--loads", type=int, default=3)
    p.add_argument("--save-every", type=int, default=0, help="0: pick N so that arm B costs >= 25%%")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--memory-dir", default="/dev/shm")
    args = p.parse_args()

    cuda = args.device == "cuda"
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = dist.new_group(backend="gloo")  # DCP async_save's collectives, apart from DDP's
    model, width = build(args.state_mb)
    model.to(device)
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)

    def train_step() -> None:
        x = torch.randn(args.batch, width, generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        ddp(x).pow(2).mean().backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    def timed_steps(n: int) -> float:
        dist.barrier()
        started = time.monotonic()
        for _ in range(n):
            train_step()
        return wall_max(time.monotonic() - started)

    def timed_interval(arm: Arm, step: int, n: int) -> float:
        """One save interval in steady state: the save, N training steps (an async write runs
        under them), then whatever of the write is still left (the next save would wait
        for it: at most one save is in flight)."""
        dist.barrier()
        started = time.monotonic()
        arm.save(step)
        for _ in range(n):
            train_step()
        arm.durable()
        return wall_max(time.monotonic() - started)

    for _ in range(2):
        train_step()  # AdamW state exists from the first step on
    step_seconds = timed_steps(5) / 5
    param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    state_bytes = param_bytes + sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                                    if torch.is_tensor(v))

    warm_s, fresh_s = rank_memcpy_seconds(state_bytes, device)
    results: dict = {"state_bytes": state_bytes, "width": width, "step_seconds": step_seconds, "device": args.device,
                     "world_size": dist.get_world_size(), "arms": {}, "param_bytes": param_bytes,
                     "ranks_memcpy_Bps": state_bytes / warm_s, "ranks_fresh_memcpy_Bps": state_bytes / fresh_s}
    arms: dict[str, Arm] = {}
    for name in ARMS:
        root = os.path.join(args.ckpt_root, name)
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
        dist.barrier()
        arms[name] = Arm(name, root, ddp, opt, group, args.memory_dir)
        results["arms"][name] = {"label": ARMS[name], "stalls_s": [], "durables_s": [], "background_cpu_s": [],
                                 "writes_s": [], "direct_writes_s": [], "memcpys_s": [], "memcpys_with_after_s": [],
                                 "memcpy_Bps": []}

    # Saves, round-robin over the arms (the disk's speed drifts; no arm gets a quiet minute
    # the others did not): each is timed with training idle until it is durable. The order
    # changes every round: an arm pays for what the one before it left behind (measured:
    # whichever of D or E came right after C's async_save took 0.07-0.09 s longer at 101 MB,
    # with the disk idle), and in a fixed order D always came after C.
    write_chunk = torch.empty(16 << 20, dtype=torch.uint8).random_().numpy()

    direct_chunk = mmap.mmap(-1, 16 << 20 if rank == 0 else mmap.PAGESIZE)  # rank 0 writes
    if rank == 0:
        direct_chunk.write(write_chunk.tobytes())

    def direct_write_bound(arm: Arm) -> float:
        """As write_bound, with O_DIRECT, after the save's second buffered write (for the
        report: ours writes that way where it can)."""
        seconds = 0.0
        if rank == 0:
            path = os.path.join(args.ckpt_root, "write-bound-direct.bin")
            seconds = direct_write_seconds(path, dir_bytes(arm.path(arm.last)), direct_chunk)
            if os.path.exists(path):
                os.unlink(path)
                fsync_dir(args.ckpt_root)
        dist.barrier()
        return seconds

    def write_bound(arm: Arm) -> float:
        """Ours' durable time's bound on the disk of the same moment (its write speed swings
        3x within seconds here, and is slowest for the first write after an idle spell):
        one process's fsync'd write of as many bytes as the arm's last checkpoint, into a
        new file (a checkpoint's are new). Untimed around it: retention's deletions finish
        first (their discards would slow the write), and the file is dropped from the page
        cache, deleted and its deletion made durable (its discard then does not fall on the
        next save). Rank 0's seconds (0 elsewhere)."""
        seconds = 0.0
        if rank == 0:
            finish_deletions()
            path = os.path.join(args.ckpt_root, "write-bound.bin")
            seconds = fsynced_write_seconds(path, dir_bytes(arm.path(arm.last)), write_chunk)
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            os.unlink(path)
            fsync_dir(args.ckpt_root)
        dist.barrier()
        return seconds

    # E's stall's bound at its own moment (the memory bandwidth here swings 2x from one copy
    # to the next): as many bytes as E stages per rank under DDP (its share), at most 256 MiB.
    copy_src = torch.empty(min(256 << 20, -(-state_bytes // dist.get_world_size())), dtype=torch.uint8,
                           device=device).random_()
    copy_dst = torch.empty(copy_src.numel(), dtype=torch.uint8, pin_memory=device.type == "cuda")
    copy_dst.copy_(copy_src)

    def memcpy_seconds_per_byte() -> float:
        """This rank's seconds per byte of a copy into a reused buffer, every rank copying at
        once (after a barrier)."""
        dist.barrier()
        started = time.monotonic()
        copy_dst.copy_(copy_src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.monotonic() - started) / copy_src.numel()

    for i in range(args.saves + 1):  # the first round warms up (buffers, plans)
        for name, arm in in_turn(arms, i):
            r = results["arms"][name]
            train_step()
            # Ours' saves against a write right before and one right after (their mean): the
            # first warms the disk up for the save, the save for the second. E's stall against
            # the faster of two memcpys right before it: the memory bandwidth here flips between
            # two levels (per rank 10-11 and 17-19 GB/s, each held for 0.2-2 s, with nothing
            # else running), so only a copy of the stall's own moment bounds it; one once the
            # save is durable is kept for the report.
            before = write_bound(arm) if i > 0 and name in "DE" else 0.0
            copy_before = (min(memcpy_seconds_per_byte(), memcpy_seconds_per_byte())
                           if i > 0 and name == "E" else 0.0)
            dist.barrier()
            started = time.monotonic()
            arm.save(100 + i)
            stall = wall_max(time.monotonic() - started)
            durable = wall_max(arm.durable() - started)
            if i > 0 and name == "E":
                if rank == 0:
                    finish_deletions()  # retention's deletion thread would slow the copy after
                staged = arm.ckpt.stats.staging_bytes
                r["memcpy_Bps"].append(1 / wall_max(copy_before))  # the slowest rank's
                r["memcpys_s"].append(wall_max(staged * copy_before))
                after = memcpy_seconds_per_byte()  # for the report only
                r["memcpys_with_after_s"].append(wall_max(staged * min(copy_before, after)))
            if i > 0 and name in "DE":
                r["writes_s"].append((before + write_bound(arm)) / 2)
                r["direct_writes_s"].append(direct_write_bound(arm))
            if i == 0:
                r["first_stall_s"] = stall
                continue
            r["stalls_s"].append(stall)
            r["durables_s"].append(durable)
            if name == "E":
                r["background_cpu_s"].append(wall_max(arm.ckpt.stats.last_background_cpu_seconds))

    copy_src = copy_dst = None  # their memory back for the loads and the training rounds
    for name in arms:
        results["arms"][name]["loads_s"] = []
        results["arms"][name]["reads_s"] = []
    read_buffer = torch.empty(16 << 20, dtype=torch.uint8)

    def read_bound(arm: Arm) -> None:
        """The load's bound, on the same files within seconds of it (the disk's speed drifts
        from minute to minute here): one process's cold read of them."""
        if rank == 0 and arm.name != "M":
            evict(arm.root)
            results["arms"][arm.name]["reads_s"].append(cold_read_seconds(arm.files(), read_buffer))

    for i in range(args.loads):  # round-robin too, each from a cold page cache
        for name, arm in in_turn(arms, i):
            dist.barrier()
            if i % 2 == 0:  # read before the load, then after it: neither gains from the other's order
                read_bound(arm)
            if rank == 0 and name != "M":  # M's load reads shared memory (RAM): nothing to evict
                evict(arm.root)
            if name == "M":
                forget_optimizer_state(opt)
            dist.barrier()
            started = time.monotonic()
            arm.load()
            results["arms"][name]["loads_s"].append(wall_max(time.monotonic() - started))
            if i % 2 == 1:
                read_bound(arm)
    for name, arm in arms.items():
        r = results["arms"][name]
        r["load_s"] = statistics.median(r["loads_s"])
        if r["reads_s"]:
            # Load i and read i ran back to back (the disk's speed swings by 2x from one
            # minute to the next here): the load's cost is the median of their ratios, each
            # against the disk of its own moment. The median and the fastest read are kept too.
            r["read_s"], r["fastest_read_s"] = statistics.median(r["reads_s"]), min(r["reads_s"])
            r["load_vs_read"] = statistics.median(load / read for load, read in zip(r["loads_s"], r["reads_s"]))
        r["bytes"] = (arm.nbytes * dist.get_world_size() if name == "M" else os.path.getsize(arm.path(arm.last) + ".pt")
                      if name == "A" else dir_bytes(arm.path(arm.last)))
        r["staging_bytes"] = arm.ckpt.stats.staging_bytes if name == "E" else 0
        r["stall_s"], r["durable_s"] = statistics.median(r["stalls_s"]), statistics.median(r["durables_s"])
        if r["writes_s"]:
            # Save i and write i ran back to back: durable MB/s over the write's MB/s (same
            # bytes) is the write's time over the save's, the median of those ratios.
            r["durable_vs_write"] = statistics.median(w / d for w, d in zip(r["writes_s"], r["durables_s"]))
            direct = [w / d for w, d in zip(r["direct_writes_s"], r["durables_s"]) if not math.isnan(w)]
            if direct:
                r["durable_vs_direct_write"] = statistics.median(direct)
        r["direct_writes_s"] = [w for w in r["direct_writes_s"] if not math.isnan(w)]  # JSON has no NaN
        if r["memcpys_s"] and min(r["memcpys_s"]) > 0:  # save i against its copies: the median of the ratios
            r["stall_vs_memcpy"] = statistics.median(st / m for st, m in zip(r["stalls_s"], r["memcpys_s"]))
            # Against each rank's faster of those and a copy once the save was durable (the
            # twelfth session's bound), for the report: it mixes the stall's moment with another.
            r["stall_vs_memcpy_with_after"] = statistics.median(
                st / m for st, m in zip(r["stalls_s"], r["memcpys_with_after_s"]))
        r["background_cpu_s"] = statistics.median(r["background_cpu_s"]) if r["background_cpu_s"] else 0.0
        if rank == 0:
            print(f"[bench] arm {name} ({ARMS[name]}): stall {r['stall_s']:.3f} s, durable {r['durable_s']:.3f} s, "
                  f"load {r['load_s']:.3f} s, {r['bytes'] / 1e6:.0f} MB", flush=True)

    # Throughput: N such that B's stall is >= 25% of N steps, unless given. This machine's
    # speed drifts by several percent from minute to minute, so the arms take turns interval
    # by interval (N steps without a save, then one save interval of each arm, repeated), and
    # an arm's overhead compares medians over the rounds.
    b_stall = results["arms"]["B"]["stall_s"]
    every = args.save_every or max(1, int(b_stall / (0.25 * step_seconds)))
    results["save_every"], results["rounds"] = every, args.rounds
    # The memory tier snapshots at its own, automatic interval: the smallest within 5% of a
    # step (memory_tier.MemoryTier._tune), from the stall measured above.
    memory_every = max(1, math.ceil(results["arms"]["M"]["stall_s"] / (0.05 * step_seconds)))
    results["memory_every"] = memory_every
    results["train_none_s"] = []
    for name in arms:
        results["arms"][name]["train_s"] = []
    for round_ in range(args.rounds):
        results["train_none_s"].append(timed_steps(every))
        for name, arm in arms.items():
            results["arms"][name]["train_s"].append(timed_interval(arm, 1000 + round_,
                                                                   memory_every if name == "M" else every))
        if rank == 0:
            print(f"[bench] round {round_ + 1}/{args.rounds}: {every} steps: none {results['train_none_s'][-1]:.2f} s, "
                  + ", ".join(f"{n} {results['arms'][n]['train_s'][-1]:.2f} s" for n in arms), flush=True)
    none = statistics.median(results["train_none_s"])
    for name in arms:
        steps = memory_every if name == "M" else every
        results["arms"][name]["overhead"] = statistics.median(results["arms"][name]["train_s"]) / (none * steps / every) - 1
    for arm in arms.values():
        arm.close()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        shutil.rmtree(args.ckpt_root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
