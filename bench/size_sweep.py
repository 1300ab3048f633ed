"""How each arm's checkpoint costs grow with the bytes: the sweep half of
``checkpoint_bench.py --sizes 100,400,1600``.

Per arm, the stall, the durable time and the load are fitted as ``seconds = c * bytes^k`` by
least squares on log-log axes: ``k`` = 1.0 is linear, above it a cost grows faster than the
state (what a size sweep is for: a ratio that holds at 400 MB and not at 4 GB). The targets
are checked at every size against that size's own bounds, measured in the same run: for E's
stall a memcpy with every rank copying at once (the ranks share the memory bandwidth, as their
staging does), the faster of two right before each save (the memory bandwidth here flips
between two levels 1.7x apart, each held for 0.2-2 s: a copy a second away may be at the
other); for ours' saves one process's
fsync'd write of as many bytes into a new file right before and right after each save (the
median of the durable / write ratios, each save against the mean of its two writes: the
disk's write speed swings 3x within seconds here); and for
loads one process's cold read of the same checkpoint's files, right before or after each
load (the median of the load / read ratios). The calibration's write bandwidth (the mean of
measurements before and after the arms) is reported beside it.
"""

from __future__ import annotations

import json
import math
import statistics

COSTS = (("stall_s", "stall"), ("durable_s", "durable + committed"), ("load_s", "load"))
EXPONENT_LIMIT = 1.1


def memory_needed(state_bytes: float, ranks: int) -> float:
    """What the arms hold at once, all ranks together: per rank the live state, DCP
    async_save's copy, our staging (this rank's share, at first the whole state) and the
    memory tier's two slots in shared memory, all kept for the whole run; and the copy that
    measures E's stall's bound next to each save (two buffers of at most 256 MiB)."""
    return ranks * (state_bytes * 5 + 2 * min(256 << 20, state_bytes / ranks))


def exponent(sizes: list[float], seconds: list[float]) -> float:
    """The slope of log(seconds) against log(bytes), least squares."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(t, 1e-9)) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def targets_at(res: dict) -> list[tuple[str, float, float]]:
    """Issue 13's goals at one size: (what, measured ratio, limit); lower is better unless
    the text says >=."""
    cal, arms = res["calibration"], res["arms"]
    B, D, E = arms["B"], arms["D"], arms["E"]
    return [
        ("E stall <= 1.5x (staged bytes / memcpy, all ranks at once, next to it)", stall_vs_memcpy(E, res), 1.5),
        ("E stall <= 0.1x DCP sync's", E["stall_s"] / B["stall_s"], 0.1),
        ("D durable >= 0.8x fsync'd write bandwidth (one process's write next to it)", durable_vs_write(D, cal), 0.8),
        ("E durable >= 0.8x fsync'd write bandwidth (one process's write next to it)", durable_vs_write(E, cal), 0.8),
        ("D load <= 1.3x (one process's cold read of its files)", load_vs_read(D, cal), 1.3),
        ("E load <= 1.3x (one process's cold read of its files)", load_vs_read(E, cal), 1.3),
    ]


def read_bound(arm: dict, cal: dict) -> float:
    """Seconds for one process to read the arm's checkpoint cold: the median read of its own
    files, each right before or after one of its loads (results from before: bytes / the
    calibration's cold read)."""
    return arm["read_s"] if "read_s" in arm else arm["bytes"] / cal["read_Bps"]


def load_vs_read(arm: dict, cal: dict) -> float:
    """The arm's load time over one process's cold read of the same files: the median of the
    ratios of each load to the read next to it (results from before 2026-11-30 compared the
    median load with the fastest read)."""
    return arm["load_vs_read"] if "load_vs_read" in arm else arm["load_s"] / read_bound(arm, cal)


def durable_vs_write(arm: dict, cal: dict) -> float:
    """The arm's durable MB/s over one process's fsync'd write bandwidth: the median of the
    ratios of each save to the mean of a write of as many bytes right before it and one right
    after it (results from
    before 2026-11-30, twelfth session: over the calibration's mean write bound)."""
    return arm["durable_vs_write"] if "durable_vs_write" in arm else calibrated_durable(arm, cal)


def stall_vs_memcpy(arm: dict, res: dict) -> float:
    """E's stall over a memcpy of the bytes it staged, every rank copying at once: the median
    of the ratios of each save to the faster of two copies right before it (results from the
    twelfth session, 2026-11-30: to the faster of one right before and one once the save was
    durable; from before it: the median stall over the fastest of three copies at the
    worker's start, still shown beside it)."""
    return arm["stall_vs_memcpy"] if "stall_vs_memcpy" in arm else calibrated_stall(arm, res)


def stall_with_after(arm: dict) -> str:
    """E's stall against the faster of its copies right before and the one once durable."""
    return f"{arm['stall_vs_memcpy_with_after']:.2f}x" if "stall_vs_memcpy_with_after" in arm else "-"


def calibrated_stall(arm: dict, res: dict) -> float:
    """The median stall over the staged bytes at the fastest of three memcpys (every rank at
    once) at the worker's start."""
    return arm["stall_s"] / ((arm["staging_bytes"] or res["state_bytes"]) / res["ranks_memcpy_Bps"])


def write_bound(arm: dict, cal: dict) -> float:
    """Seconds for one process to write the arm's bytes, fsync'd: the median of the writes
    next to its saves (results from before: bytes / the calibration's write bandwidth)."""
    return statistics.median(arm["writes_s"]) if arm.get("writes_s") else arm["bytes"] / cal["write_Bps"]


def memcpy_bound(arm: dict, res: dict) -> float:
    """Seconds to copy the bytes E staged, every rank at once: the median of the copies next
    to its saves (results from before: at the worker-start copy's speed)."""
    if arm.get("memcpys_s"):
        return statistics.median(arm["memcpys_s"])
    return (arm["staging_bytes"] or res["state_bytes"]) / res["ranks_memcpy_Bps"]


def bound_exponents(sizes: list[float], results: list[dict]) -> str:
    """How E's bounds themselves grow with the bytes: a cost held to a fixed ratio of its
    bound grows as fast as the bound does."""
    E = [r["arms"]["E"] for r in results]
    return ", ".join([
        f"E's memcpys {exponent(sizes, [memcpy_bound(a, r) for a, r in zip(E, results)]):.2f}",
        f"the writes next to E's saves {exponent(sizes, [write_bound(a, r['calibration']) for a, r in zip(E, results)]):.2f}",
        f"the reads next to E's loads {exponent(sizes, [read_bound(a, r['calibration']) for a, r in zip(E, results)]):.2f}"])


def calibrated_durable(arm: dict, cal: dict) -> float:
    """The arm's median durable MB/s over the mean of the write bounds measured before and
    after the size's arms (minutes apart): the figure up to the eleventh session."""
    return arm["bytes"] / arm["durable_s"] / cal["write_Bps"]


def memcpy_speeds(arm: dict) -> str:
    """The GB/s per rank of the memcpys next to the arm's saves: median (range)."""
    speeds = sorted(b / 1e9 for b in arm.get("memcpy_Bps") or [])
    if not speeds:
        return "-"
    return f"{statistics.median(speeds):.1f} ({speeds[0]:.1f}-{speeds[-1]:.1f})"


def write_speeds(name: str, arm: dict) -> str:
    """The MB/s of one process's fsync'd writes next to the arm's saves: median (range)."""
    speeds = sorted(arm["bytes"] / w / 1e6 for w in arm.get("writes_s") or [])
    if not speeds:
        return f"{name} -"
    return f"{name} {statistics.median(speeds):.0f} ({speeds[0]:.0f}-{speeds[-1]:.0f})"


def direct_write_ratios(arm: dict) -> str:
    """Durable against one process's O_DIRECT write of as many bytes after the save and its
    write bounds (median of the ratios) and that write's MB/s (median, range); for the report
    only."""
    writes = arm.get("direct_writes_s") or []
    if not writes or "durable_vs_direct_write" not in arm:
        return "-"
    speeds = sorted(arm["bytes"] / w / 1e6 for w in writes)
    return (f"{arm['durable_vs_direct_write']:.2f}x ({statistics.median(speeds):.0f} MB/s, "
            f"{speeds[0]:.0f}-{speeds[-1]:.0f})")


def _holds(text: str, value: float, limit: float) -> bool:
    return value >= limit if ">=" in text else value <= limit


def sweep_report(results: list[dict], base: str) -> list[str]:
    """Print and write BASE.md, .json and .png; returns the targets not met."""
    # Two sizes may build the same model (the MLP's layers are rounded): one point each.
    results = list({r["state_bytes"]: r for r in sorted(results, key=lambda r: r["state_bytes"])}.values())
    if len(results) < 2:
        print("[bench] the sizes built models of one size: nothing to fit")
        return ["two different state sizes"]
    sizes = [r["state_bytes"] for r in results]
    names = list(results[0]["arms"])
    lines = [f"Size sweep: {', '.join(f'{s / 1e6:.0f}' for s in sizes)} MB of state per rank, "
             f"{results[0]['world_size']} ranks, {results[0]['saves']} saves per arm and size, medians.", "",
             "| arm | " + " | ".join(f"{s / 1e6:.0f} MB: stall / durable / load (s)" for s in sizes)
             + " | exponent: stall / durable / load |",
             "|---|" + "---|" * (len(sizes) + 1)]
    exponents: dict[str, dict[str, float]] = {}
    for name in names:
        arms = [r["arms"][name] for r in results]
        exponents[name] = {key: exponent(sizes, [a[key] for a in arms]) for key, _ in COSTS}
        lines.append(f"| {name}: {arms[0]['label']} | "
                     + " | ".join(f"{a['stall_s']:.3f} / {a['durable_s']:.3f} / {a['load_s']:.3f}" for a in arms)
                     + " | " + " / ".join(f"{exponents[name][key]:.2f}" for key, _ in COSTS) + " |")
    lines += ["", "| target | " + " | ".join(f"{s / 1e6:.0f} MB" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    failed = []
    table = [targets_at(r) for r in results]
    for i, (text, _, limit) in enumerate(table[0]):
        cells = []
        for size, row in zip(sizes, table):
            value = row[i][1]
            ok = _holds(text, value, limit)
            cells.append(f"{value:.2f}x {'yes' if ok else 'NO'}")
            if not ok:
                failed.append(f"{text} at {size / 1e6:.0f} MB ({value:.2f}x)")
        lines.append(f"| {text} | " + " | ".join(cells) + " |")
    for name in ("D", "E"):  # ours: every exponent of every cost
        for key, label in COSTS:
            k = exponents[name][key]
            if k > EXPONENT_LIMIT:
                failed.append(f"{name} {label} exponent {k:.2f} > {EXPONENT_LIMIT}")
    lines += ["", f"Exponents of ours (D, E) must be <= {EXPONENT_LIMIT} (1.0 is linear); the exponents of the bounds "
              f"measured next to E: {bound_exponents(sizes, results)}. A save's write bound is the mean "
              "of one process's fsync'd writes of as many bytes into a new file right before and right after it (the "
              "median of the ratios); against the mean of the write bounds measured before and after each size's arms instead, "
              "durable was: " + "; ".join(
                  f"{size / 1e6:.0f} MB: D {calibrated_durable(r['arms']['D'], r['calibration']):.2f}x, "
                  f"E {calibrated_durable(r['arms']['E'], r['calibration']):.2f}x" for size, r in zip(sizes, results))
              + "; the memcpys next to E's saves, GB/s per rank (median, range): "
              + ", ".join(f"{size / 1e6:.0f} MB {memcpy_speeds(r['arms']['E'])}" for size, r in zip(sizes, results))
              + "; E's stall against each rank's faster of those and a memcpy once the save was durable (the "
              "twelfth session's bound, with one copy more before): "
              + ", ".join(f"{size / 1e6:.0f} MB {stall_with_after(r['arms']['E'])}" for size, r in zip(sizes, results))
              + "; against the fastest of three memcpys at the worker's start: "
              + ", ".join(f"{size / 1e6:.0f} MB {calibrated_stall(r['arms']['E'], r):.2f}x" for size, r in zip(sizes, results))
              + "; one process's fsync'd writes of as many bytes next to ours' saves, MB/s (median, range): "
              + "; ".join(f"{size / 1e6:.0f} MB: " + ", ".join(write_speeds(n, r['arms'][n]) for n in "DE")
                          for size, r in zip(sizes, results))
              + "; ours' durable time against one process's O_DIRECT write of as many bytes after the save's write bounds "
              "(ours writes that way; not a target): "
              + "; ".join(f"{size / 1e6:.0f} MB: " + ", ".join(f"{n} {direct_write_ratios(r['arms'][n])}" for n in "DE")
                          for size, r in zip(sizes, results))
              + ". A load's bound is one process's cold read of its own "
              "files right before or after it. The calibration, MB/s, before / after: "
              + "; ".join(f"{size / 1e6:.0f} MB: write {disk_runs(r['calibration'], 'write_Bps')}, "
                          f"cold read {disk_runs(r['calibration'], 'read_Bps')}" for size, r in zip(sizes, results)) + "."]
    text = "\n".join(lines)
    print("\n" + text + "\n")
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    with open(base + ".json", "w") as f:
        json.dump({"sizes": sizes, "exponents": exponents, "failed": failed, "results": results}, f, indent=2)
    try:
        chart(results, exponents, base + ".png")
        print(f"[bench] wrote {base}.md, {base}.json, {base}.png")
    except ImportError:
        print(f"[bench] wrote {base}.md, {base}.json; no chart: matplotlib is missing (pip install -e '.[bench]')")
    return failed


def disk_runs(cal: dict, key: str) -> str:
    """A disk calibration's measurements in MB/s, before / after the arms."""
    return " / ".join(f"{v / 1e6:.0f}" for v in cal.get(key + "_runs", [cal[key]]))


def chart(results: list[dict], exponents: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gb = [r["state_bytes"] / 1e9 for r in results]
    fig, axes = plt.subplots(1, len(COSTS), figsize=(15, 4.8))
    for ax, (key, title) in zip(axes, COSTS):
        for name in results[0]["arms"]:
            ax.loglog(gb, [r["arms"][name][key] for r in results], marker="o",
                      label=f"{name} {results[0]['arms'][name]['label']} (k={exponents[name][key]:.2f})")
        if key == "stall_s":  # the bound: a copy of E's staged bytes, every rank at once, next to its saves (median)
            ax.loglog(gb, [memcpy_bound(r["arms"]["E"], r) for r in results], "k:",
                      label="memcpy of E's staged bytes, all ranks at once")
        if key == "durable_s":  # the bounds: one process's write of E's bytes next to its saves (median), and the calibration's
            ax.loglog(gb, [write_bound(r["arms"]["E"], r["calibration"]) for r in results], "k--",
                      label="one process's fsync'd write of E's bytes")
            ax.loglog(gb, [r["arms"]["B"]["bytes"] / r["calibration"]["write_Bps"] for r in results], "k:",
                      label="bytes / the calibration's write bandwidth")
        if key == "load_s":  # the bound: one process's cold read of E's files (median), next to its loads
            ax.loglog(gb, [read_bound(r["arms"]["E"], r["calibration"]) for r in results], "k:",
                      label="one process's cold read of E's files")
        ax.set_xlabel("GB of state per rank")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
