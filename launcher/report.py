"""``ftlaunch report RUN_DIR [-o run.png]``: a picture of what happened to a run, from its
events file alone, and the one-screen summary as Markdown beside it (``run.md``).

The picture has two rows on one time axis (seconds since the first launch):
- steps over time, one line per generation of workers (from the steps the events carry:
  first step, saves, the failure, the resume), saves as dots, commits as green ticks;
- the generations as bars, failures as red lines, hangs in orange, each labelled.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import contract
from .summary import format_summary, summarize

FAILURES = ("worker_failed", "hang_detected", "node_left")


def generations(events: list[dict]) -> list[dict]:
    """Each generation: its start, its end (the next one's failure or restart, or the run's
    end), and the (time, step) points its events carry."""
    starts = [e for e in events if e["event"] == "workers_started"]
    out = []
    for i, start in enumerate(starts):
        end_time = starts[i + 1]["time"] if i + 1 < len(starts) else events[-1]["time"]
        failed = next((e for e in events if e["event"] in FAILURES and start["time"] <= e["time"] < end_time), None)
        points = [(e["time"], e["step"]) for e in events
                  if start["time"] <= e["time"] <= end_time and e.get("agent") is not True
                  and e["event"] in ("first_step", "save_begin", "resumed", "fresh_start", "finished", "preempted")
                  and isinstance(e.get("step"), int)]
        if failed is not None:  # a hung rank's step is as of its last progress, not its detection
            step = failed.get("last_step") if failed["event"] == "worker_failed" else failed.get("step")
            if isinstance(step, int) and step >= 0:  # -1: no step reported yet
                points.append((failed.get("since", failed["time"]), step))
        out.append({"attempt": start.get("attempt", i), "start": start["time"],
                    "end": failed["time"] if failed else end_time, "failure": failed, "points": sorted(points)})
    return out


def render(run_dir: str, out_png: str) -> tuple[str, str]:
    """Write the picture and the Markdown; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = sorted(contract.read_events(run_dir), key=lambda e: e["time"])
    if not events:
        raise ValueError(f"{contract.events_path(run_dir)}: no events (not an ftlaunch run directory?)")
    t0 = events[0]["time"]
    gens = generations(events)
    fig, (steps_ax, bars_ax) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True,
                                            gridspec_kw={"height_ratios": [3, 1.2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(gens):
        color = colors[i % len(colors)]
        if g["points"]:
            steps_ax.plot([t - t0 for t, _ in g["points"]], [s for _, s in g["points"]], "-", color=color,
                          label=f"generation {g['attempt']}")
        bars_ax.barh(0, g["end"] - g["start"], left=g["start"] - t0, height=0.5, color=color, alpha=0.7)
        bars_ax.text(g["start"] - t0, 0.35, f"gen {g['attempt']}", fontsize=8)
    saves = [(e["time"] - t0, e["step"]) for e in events if e["event"] == "save_begin"]
    commits = [(e["time"] - t0, e["step"]) for e in events if e["event"] == "save_commit"]
    if saves:
        steps_ax.plot(*zip(*saves), "o", color="tab:gray", markersize=3, label="save started")
    if commits:
        steps_ax.plot(*zip(*commits), "|", color="tab:green", markersize=12, markeredgewidth=2, label="committed")
    for g in gens:  # each failed generation's first failure event: the root cause, as in the summary
        e = g["failure"]
        if e is not None:
            hang = e["event"] == "hang_detected"
            color = "tab:orange" if hang else "tab:red"
            x = e["time"] - t0
            for ax in (steps_ax, bars_ax):
                ax.axvline(x, color=color, linestyle="--", linewidth=1)
                if hang and "since" in e:  # from the rank's last progress to the detection
                    ax.axvspan(e["since"] - t0, x, color=color, alpha=0.15)
            what = (f"hang, rank {e.get('rank')}" if hang else "node left" if e["event"] == "node_left"
                    else f"rank {e.get('rank')}: {e.get('signal') or 'exit ' + str(e.get('exitcode'))}")
            bars_ax.text(x, -0.55, what, color=color, fontsize=8, rotation=0)
    summary = summarize(events)
    steps_ax.set_ylabel("step")
    steps_ax.set_title(f"{os.path.basename(os.path.abspath(run_dir))}: {summary['attempts']} generation(s), "
                       f"{len(summary['failures'])} failure(s), last commit "
                       f"{'none' if summary['last_committed'] is None else summary['last_committed']}, "
                       + (f"{summary['steps_lost']} steps and {summary['seconds_lost']} s lost"
                          if summary["steps_lost"] is not None else "steps and time lost unknown"))
    steps_ax.legend(fontsize=8, loc="upper left")
    bars_ax.set_yticks([])
    bars_ax.set_ylim(-0.8, 0.8)
    bars_ax.set_xlabel("seconds since launch")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)

    result = next((e.get("result") for e in reversed(events) if e["event"] == "result"), "still running, or killed")
    md_path = os.path.splitext(out_png)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(f"# Run {run_dir}\n\n![timeline]({os.path.basename(out_png)})\n\n```\n"
                f"{format_summary(summary, result, run_dir)}\n```\n")
    return out_png, md_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ftlaunch report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="an ftlaunch --run-dir (it holds events.jsonl)")
    p.add_argument("-o", "--output", default="", help="the picture (default RUN_DIR/report.png); "
                   "the Markdown goes beside it (.md)")
    args = p.parse_args(argv)
    if not os.path.isfile(contract.events_path(args.run_dir)):
        print(f"ftlaunch report: error: {contract.events_path(args.run_dir)} does not exist: give an ftlaunch --run-dir",
              file=sys.stderr)
        return 2
    try:
        png, md = render(args.run_dir, args.output or os.path.join(args.run_dir, "report.png"))
    except ImportError:
        print("ftlaunch report: error: matplotlib is missing (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"ftlaunch report: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {png} and {md}")
    return 0
