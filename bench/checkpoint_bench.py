"""Checkpoint stall, durability, load and training overhead: ours against torch.save and DCP.

    make bench                                   # ~400 MB of model + AdamW state, 2 ranks
    python bench/checkpoint_bench.py --state-mb 100 --out runs/bench
    python bench/checkpoint_bench.py --sizes 100,400,1600   # how each cost grows with the bytes

One run measures the machine (memcpy, fsync'd write and cold read bandwidth in the
checkpoint directory, worker start time), then starts 2 ranks under torchrun that measure
every arm on the same live state (bench/checkpoint_worker.py), then measures the disk again
(its speed swings here, by 3x within seconds). Each of ours' saves is compared with one
process's fsync'd write of as many bytes right before and after it, E's stall with the faster
of two memcpys (every rank at once) right before it, and each load with one
process's cold read of that arm's own files right before or after it: the medians of those
ratios (the calibration's mean write bound is shown too). Prints a Markdown table and
which targets hold; writes checkpoint-bench.json, .md and .png to --out. With --sizes, does
that at each size and then fits how each arm's stall, durable time and load grow with the
bytes (bench/size_sweep.py: checkpoint-sweep.md, .json and a log-log .png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from size_sweep import (calibrated_stall, direct_write_ratios, disk_runs, durable_vs_write, load_vs_read,
                        memcpy_speeds, memory_needed, read_bound, stall_vs_memcpy, stall_with_after, sweep_report,
                        write_speeds)

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK = 16 << 20


def memcpy_bandwidth(nbytes: int, device: str) -> float:
    """Host memcpy into a reused buffer; on CUDA, device -> pinned host (what staging does)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device == "cuda")

    def copy():
        dst.copy_(src, non_blocking=True)
        if device == "cuda":
            torch.cuda.synchronize()

    copy()  # first touch of the pages is not what a reused buffer pays
    best = min(_timed(copy) for _ in range(3))
    return nbytes / best


def write_read_bandwidth(directory: str, nbytes: int) -> tuple[float, float, bool]:
    """dd conv=fsync-style: write ``nbytes`` in 16 MiB chunks, fsync once; then read it back
    after dropping it from the page cache. Returns (write B/s, read B/s, cache dropped)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "bandwidth-probe.bin")
    size = min(CHUNK, nbytes)
    count = max(1, nbytes // size)
    chunk = torch.empty(size, dtype=torch.uint8).random_().numpy()
    writes = []
    for _ in range(2):
        started = time.monotonic()
        with open(path, "wb", buffering=0) as f:
            for _ in range(count):
                f.write(chunk)
            os.fsync(f.fileno())
        writes.append(time.monotonic() - started)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    buf = bytearray(size)
    cold = _timed(lambda: _read_all(path, buf))
    hot = _timed(lambda: _read_all(path, buf))
    os.unlink(path)
    written = count * size
    return written / min(writes), written / cold, cold > 1.5 * hot


def _read_all(path: str, buf: bytearray) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def worker_start_seconds() -> float:
    code = "import torch, torch.distributed.checkpoint, torch.nn.parallel"
    return _timed(lambda: subprocess.run([sys.executable, "-c", code], check=True))


def table(res: dict) -> tuple[str, list[str]]:
    cal, arms = res["calibration"], res["arms"]
    E = arms["E"]
    rows = ["| arm | stall per save (s) | durable+committed (s) | durable MB/s | load (s) | one process's cold read of its "
            "files (s) | load / the read next to it | "
            f"training overhead, a save every {res['save_every']} steps (M: {res['memory_every']}) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        a["durable_MBps"] = a["bytes"] / a["durable_s"] / 1e6
        read = "- | -" if name == "M" else f"{read_bound(a, cal):.3f} | {load_vs_read(a, cal):.2f}x"
        rows.append(f"| {name}: {a['label']} | {a['stall_s']:.3f} | {a['durable_s']:.3f} | "
                    f"{a['durable_MBps']:.0f} | {a['load_s']:.3f} | {read} | {100 * a['overhead']:+.1f}% |")
    B, D = arms["B"], arms["D"]
    staged = E["staging_bytes"] or res["state_bytes"]
    memcpy_bound = staged / cal["memcpy_Bps"]
    M = arms["M"]
    state_bound = res["state_bytes"] / cal["memcpy_Bps"]
    ranks_bound = res["state_bytes"] / res["ranks_memcpy_Bps"]  # every rank copying at once
    # A new process's load: the weights into the live model, the optimizer state into memory
    # the kernel must first hand out (the bench's M load drops that state first, to match).
    fresh_bound = (res["param_bytes"] / res["ranks_memcpy_Bps"]
                   + (res["state_bytes"] - res["param_bytes"]) / res["ranks_fresh_memcpy_Bps"])
    targets = [
        ("E stall <= 0.1x B stall", E["stall_s"] / B["stall_s"], 0.1),
        ("E stall <= 3x (staged bytes per rank / memcpy)", E["stall_s"] / memcpy_bound, 3.0),
        ("E stall <= 1.5x (staged bytes per rank / memcpy, all ranks at once, next to each save)",
         stall_vs_memcpy(E, res), 1.5),
        ("D durable MB/s >= 0.8x fsync write bandwidth (one process's write next to each save)",
         durable_vs_write(D, cal), 0.8),
        ("E durable MB/s >= 0.8x fsync write bandwidth (one process's write next to each save)",
         durable_vs_write(E, cal), 0.8),
        (f"E training overhead <= 3% (B costs {100 * B['overhead']:.0f}%)", E["overhead"], 0.03),
        ("D load <= 1.5x (one process's cold read of its files)", load_vs_read(D, cal), 1.5),
        ("E load <= 1.5x (one process's cold read of its files)", load_vs_read(E, cal), 1.5),
        ("M snapshot stall <= 1.5x (state bytes per rank / memcpy)", M["stall_s"] / state_bound, 1.5),
        ("M snapshot stall <= 1.5x (state bytes per rank / memcpy, all ranks at once)", M["stall_s"] / ranks_bound, 1.5),
        ("M load from memory <= 1.2x (state bytes per rank / memcpy)", M["load_s"] / state_bound, 1.2),
        ("M load from memory <= 1.2x (weights / memcpy + optimizer state / memcpy into fresh memory, all ranks at once)",
         M["load_s"] / fresh_bound, 1.2),
        (f"M training overhead at its automatic interval ({res['memory_every']} steps) <= 5%", M["overhead"], 0.05),
    ]
    res["targets"] = []
    lines = ["", "| target | measured | holds |", "|---|---|---|"]
    for text, value, limit in targets:
        lower_is_better = "<=" in text
        holds = value <= limit if lower_is_better else value >= limit
        res["targets"].append({"target": text, "value": value, "limit": limit, "holds": holds})
        shown = f"{100 * value:+.1f}%" if "overhead" in text else f"{value:.2f}x"
        lines.append(f"| {text} | {shown} | {'yes' if holds else 'NO'} |")
    head = [
        f"State: {res['state_bytes'] / 1e6:.0f} MB per rank (MLP width {res['width']} + AdamW), "
        f"{res['world_size']} ranks ({'NCCL, CUDA' if res['device'] == 'cuda' else 'gloo, CPU'}), "
        f"{res['saves']} saves per arm after one warm-up, medians; "
        f"torch {torch.__version__}.",
        f"Machine ({os.cpu_count()} CPUs): {'device->pinned host copy' if res['device'] == 'cuda' else 'memcpy'} "
        f"{cal['memcpy_Bps'] / 1e9:.2f} GB/s (one process; per rank with all {res['world_size']} copying at once: "
        f"{res['ranks_memcpy_Bps'] / 1e9:.2f} GB/s, into fresh memory {res['ranks_fresh_memcpy_Bps'] / 1e9:.2f} GB/s); fsync'd write {cal['write_Bps'] / 1e6:.0f} MB/s; "
        f"read {cal['read_Bps'] / 1e6:.0f} MB/s ({'cold' if cal['read_cold'] else 'page cache could not be dropped'}); "
        f"the disk, measured before / after the arms: write {disk_runs(cal, 'write_Bps')}, read {disk_runs(cal, 'read_Bps')} MB/s; "
        f"one process's fsync'd writes next to ours' saves: {write_speeds('D', arms['D'])}, {write_speeds('E', arms['E'])} MB/s; "
        f"ours' durable against one process's O_DIRECT write after the save's write bounds (not a target): "
        f"D {direct_write_ratios(arms['D'])}, E {direct_write_ratios(E)}; "
        f"memcpys next to E's saves {memcpy_speeds(E)} GB/s per rank (E's stall against each rank's faster of "
        f"those and one once the save was durable {stall_with_after(E)}, against the worker-start memcpy "
        f"{calibrated_stall(E, res):.2f}x); "
        f"worker start {cal['worker_start_s']:.2f} s; step {res['step_seconds']:.3f} s; "
        f"{res['save_every']} steps without a save: median {statistics.median(res['train_none_s']):.2f} s "
        f"(range {min(res['train_none_s']):.2f}-{max(res['train_none_s']):.2f}) over {res['rounds']} rounds; "
        f"E's writer thread used {E['background_cpu_s']:.2f} s of CPU per save and rank.",
        "",
    ]
    return "\n".join(head + rows + lines), [t["target"] for t in res["targets"] if not t["holds"]]


def chart(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["arms"])
    arms = [res["arms"][n] for n in names]
    labels = [f"{n}\n{a['label']}" for n, a in zip(names, arms)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.27
    for i, (key, title) in enumerate((("stall_s", "stall per save"), ("durable_s", "durable + committed"),
                                      ("load_s", "load (cold)"))):
        ax1.bar([x + (i - 1) * width for x in range(len(arms))], [a[key] for a in arms], width, label=title)
    ax1.set_xticks(range(len(arms)), labels, fontsize=8)
    ax1.set_ylabel("seconds")
    ax1.set_title(f"{res['state_bytes'] / 1e6:.0f} MB of state per rank, {res['world_size']} ranks")
    ax1.legend()
    ax2.bar(range(len(arms)), [100 * a["overhead"] for a in arms], color="tab:red")
    ax2.set_xticks(range(len(arms)), labels, fontsize=8)
    ax2.set_ylabel("% slower than no saves")
    ax2.set_title(f"training with a save every {res['save_every']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--state-mb", type=float, default=400, help="model + AdamW state per rank, MB (default 400)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--saves", type=int, default=7, help="measured saves per arm (after one warm-up)")
    p.add_argument("--loads", type=int, default=3, help="cold loads per arm (median reported)")
    p.add_argument("--rounds", type=int, default=8, help="save intervals per arm in the training-throughput "
                   "comparison (arms take turns)")
    p.add_argument("--save-every", type=int, default=0, help="steps between saves in the throughput run "
                   "(default: the N at which DCP's sync save costs >= 25%%)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model trains (cuda: one GPU per rank, NCCL)")
    p.add_argument("--out", default="runs/bench", help="folder for the JSON, Markdown and PNG")
    p.add_argument("--ckpt-root", default="", help="where checkpoints are written (default: OUT/ckpt)")
    p.add_argument("--sizes", default="", help="a size sweep: state MB per rank, comma-separated (e.g. 100,400,1600); "
                   "sizes that do not fit in memory are skipped")
    args = p.parse_args()
    try:
        sizes = [float(s) for s in args.sizes.split(",")] if args.sizes else []
        if sizes and (len(set(sizes)) < 2 or len(set(sizes)) != len(sizes) or not all(0 < s < math.inf for s in sizes)):
            raise ValueError
    except ValueError:
        p.error(f"--sizes takes two or more different positive sizes in MB, comma-separated (e.g. 100,400,1600), "
                f"got {args.sizes!r}")
    if args.state_mb <= 0 or min(args.ranks, args.saves, args.rounds, args.loads) < 1 or args.save_every < 0:
        p.error("--state-mb, --ranks, --saves, --rounds and --loads must be positive")
    os.makedirs(args.out, exist_ok=True)
    ckpt_root = args.ckpt_root or os.path.join(args.out, "ckpt")
    if args.sizes:
        return size_sweep(args, ckpt_root)
    res = measure(args, args.state_mb, ckpt_root)
    failed = report(res, os.path.join(args.out, "checkpoint-bench"))
    if failed:
        print(f"[bench] targets not met on this machine: {'; '.join(failed)}")
    return 0


def measure(args, state_mb: float, ckpt_root: str) -> dict:
    """Calibrate the machine for ``state_mb`` per rank, then run every arm under torchrun."""
    nbytes = int(state_mb * 1e6)
    print(f"[bench] {state_mb:g} MB per rank: calibrating in {ckpt_root} ...", flush=True)
    disk = [write_read_bandwidth(ckpt_root, nbytes)]
    calibration = {"memcpy_Bps": memcpy_bandwidth(nbytes, args.device), "worker_start_s": worker_start_seconds()}
    raw = os.path.join(args.out, "checkpoint-bench-ranks.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
           os.path.join(HERE, "checkpoint_worker.py"), "--state-mb", str(state_mb), "--ckpt-root", ckpt_root,
           "--out", raw, "--saves", str(args.saves), "--rounds", str(args.rounds), "--loads", str(args.loads), "--device", args.device, "--save-every", str(args.save_every)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env, timeout=3600)
    with open(raw) as f:
        res = json.load(f)
    os.unlink(raw)
    # This machine's disk speed swings from minute to minute: the disk is measured again
    # after the arms, and the bounds are the mean of both (each is in the JSON and the table).
    disk.append(write_read_bandwidth(ckpt_root, nbytes))
    calibration.update(write_Bps=statistics.mean(d[0] for d in disk), read_Bps=statistics.mean(d[1] for d in disk),
                       read_cold=all(d[2] for d in disk), write_Bps_runs=[d[0] for d in disk],
                       read_Bps_runs=[d[1] for d in disk])
    res.update(calibration=calibration, saves=args.saves, created_unix=time.time())
    return res


def report(res: dict, base: str) -> list[str]:
    """Print the table and write BASE.md, .json and .png; returns the targets not met."""
    text, failed = table(res)
    print("\n" + text + "\n")
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
    try:
        chart(res, base + ".png")
        print(f"[bench] wrote {base}.json, {base}.md, {base}.png")
    except ImportError:
        print(f"[bench] wrote {base}.json, {base}.md; no chart: matplotlib is missing (pip install -e '.[bench]')")
    return failed


def size_sweep(args, ckpt_root: str) -> int:
    """The whole bench at each of --sizes, then how each arm's costs grow with the bytes."""
    sizes = [float(s) for s in args.sizes.split(",")]
    available = _mem_available()
    results = []
    for mb in sorted(sizes):
        needed = memory_needed(mb * 1e6, args.ranks)
        if available and needed > 0.8 * available:
            print(f"[bench] skipping {mb:g} MB per rank: the arms hold about {needed / 1e9:.1f} GB at once, "
                  f"{available / 1e9:.1f} GB is available", flush=True)
            continue
        res = measure(args, mb, ckpt_root)
        report(res, os.path.join(args.out, f"checkpoint-bench-{mb:g}MB"))
        results.append(res)
    if len(results) < 2:
        print("[bench] a sweep needs two sizes that fit in memory", file=sys.stderr)
        return 2
    failed = sweep_report(results, os.path.join(args.out, "checkpoint-sweep"))
    if failed:
        print(f"[bench] sweep targets not met on this machine: {'; '.join(failed)}")
    return 0


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0

if __name__ == "__main__":
    sys.exit(main())
