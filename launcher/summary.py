"""The one-screen summary of a run, computed from its events file alone."""

from __future__ import annotations


# Why a failure's cost can be unknown: the figures need the events "resumed" (or "fresh_start")
# and "first_step" of the next generation, which train.py writes through Reporter.event on the
# node of global rank 0; a plain script, or another node's run dir, has none.
_NOT_RECORDED = ("this run dir holds no record of where a generation resumed and its first step: "
                 "Reporter.event('resumed' | 'fresh_start') and Reporter.event('first_step'), from global rank 0")


def _failure_kind(event: dict) -> str:
    if event["event"] == "node_left":
        return "node left"
    if event["event"] == "hang_detected":
        return f"hang ({event['phase']})"
    if event.get("signal"):
        return f"signal {event['signal']}"
    return f"exit code {event['exitcode']}"


def summarize(events: list[dict]) -> dict:
    """Attempts, failures by kind, and per failure the steps and seconds it cost: steps from
    the newest step any worker reported to the step the next generation resumed from, and
    seconds from the failure (for a hang: the rank's last progress) to the first step of the
    next generation. A failure no generation recovered from has no such figures (None), nor
    has any failure of a script that reports no steps (``launcher.worker.Reporter``): a
    plain torchrun script under ftlaunch."""
    events = sorted(events, key=lambda e: e["time"])
    commits = [e["step"] for e in events if e["event"] == "save_commit"]
    # After the last failure ftlaunch may start one more generation that only moves the memory
    # tier's snapshot to disk (launcher.persist): not an attempt, not a recovery. A run dir
    # may hold several launches: drop each such round, report the newest.
    kept, in_round, persisted = [], False, None
    for e in events:
        if e["event"] == "persist_begin":
            in_round, persisted = True, None
        elif e["event"] == "persist_end":
            in_round, persisted = False, e
        elif e["event"] == "launch":
            in_round, persisted = False, None
            kept.append(e)
        elif not in_round:
            kept.append(e)
    events = kept
    # Only the trainer's Reporter says where a generation started and its first step; without
    # it no failure's cost is known, and none is counted as 0.
    reports = any(e["event"] in ("resumed", "fresh_start", "first_step") for e in events)
    # Attempts count from 0 in each launch: a generation is (launch, attempt).
    launch_of, launches = {}, 0
    for e in events:
        launches += e["event"] == "launch"
        launch_of[id(e)] = launches
    failures = []  # one per failed generation: its first failure event (root cause first)
    seen_generations = set()
    for e in events:
        generation = (launch_of[id(e)], e.get("attempt"))
        if e["event"] in ("worker_failed", "hang_detected", "node_left") and generation not in seen_generations:
            seen_generations.add(generation)
            same = [x for x in events if x["event"] == e["event"] and (launch_of[id(x)], x.get("attempt")) == generation]
            # -1 (or none): no step reported yet in that generation.
            steps = [s for s in (x.get("last_step") if x["event"] == "worker_failed" else x.get("step") for x in same)
                     if isinstance(s, int) and s >= 0]
            last_step = max(steps) if steps else None
            # A hang costs from the rank's last progress, not from its detection.
            failures.append({"time": e["time"], "since": e.get("since", e["time"]), "kind": _failure_kind(e),
                             "rank": e.get("rank"), "last_step": last_step})
    for f in failures:
        f["restarted"] = any(e["time"] > f["time"] and e["event"] == "workers_started" for e in events)
        resumed = next((e for e in events if e["time"] > f["time"] and e["event"] in ("resumed", "fresh_start")), None)
        first = next((e for e in events if e["time"] > f["time"] and e["event"] == "first_step"), None)
        f["resumed_step"] = resumed["step"] if resumed else None
        f["resumed_from"] = resumed.get("source") if resumed else None  # "memory", "disk" (None: not said)
        f["steps_lost"] = max(0, (f["last_step"] or 0) - resumed["step"]) if resumed else None
        f["seconds_lost"] = round(first["time"] - f["since"], 2) if first else None
    by_kind: dict[str, int] = {}
    for f in failures:
        by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
    end = next((e for e in reversed(events) if e["event"] in ("finished", "preempted")), None)
    return {
        "attempts": sum(e["event"] == "workers_started" for e in events),
        "failures": failures,
        "failures_by_kind": by_kind,
        "steps_lost": sum(f["steps_lost"] or 0 for f in failures) if reports or not failures else None,
        "seconds_lost": round(sum(f["seconds_lost"] or 0 for f in failures), 2) if reports or not failures else None,
        "last_committed": max(commits) if commits else None,
        "ended_by": end["event"] if end else None,
        "persisted": {"step": persisted["step"], "ok": persisted["ok"], "why": persisted.get("why")} if persisted else None,
        "end_step": end["step"] if end else None,
    }


def format_summary(summary: dict, result: str, run_dir: str) -> str:
    lines = [f"== ftlaunch summary (run dir {run_dir}) ==", f"result: {result}"]
    restarts = max(summary["attempts"] - 1, 0)
    lines.append(f"attempts: {summary['attempts']} ({restarts} restart{'s' * (restarts != 1)})")
    if summary["failures"]:
        kinds = ", ".join(f"{n} x {k}" for k, n in summary["failures_by_kind"].items())
        lines.append(f"failures: {kinds}")
        for f in summary["failures"]:
            who = f"rank {f['rank']} " if f["rank"] is not None else ""
            at = f"at step {f['last_step']}" if f["last_step"] is not None else "before any step it reported"
            where = f"  {who}{f['kind']} {at}"
            if f["resumed_step"] is None or f["seconds_lost"] is None:
                lines.append(f"{where}: " + (f"restarted; steps and time lost unknown ({_NOT_RECORDED})" if f["restarted"]
                                             else "not recovered (no restart followed)"))
            else:
                source = f" ({f['resumed_from']})" if f.get("resumed_from") else ""
                lines.append(f"{where}: resumed from step {f['resumed_step']}{source}, {f['steps_lost']} steps and "
                             f"{f['seconds_lost']} s lost")
        if summary["steps_lost"] is None:
            lines.append(f"steps lost: unknown; time lost: unknown ({_NOT_RECORDED})")
        else:
            lines.append(f"steps lost: {summary['steps_lost']}; time lost: {summary['seconds_lost']} s "
                         "(failure, or a hung rank's last progress, -> first step of the next generation)")
    else:
        lines.append("failures: none")
    persisted = summary.get("persisted")
    if persisted:
        if not persisted["ok"]:
            lines.append(f"memory tier: committing the snapshot of step {persisted['step']} failed ({persisted['why']})")
        elif persisted["step"] is None:
            lines.append("memory tier: nothing newer than the last commit to persist")
        else:
            lines.append(f"memory tier: the snapshot of step {persisted['step']} was committed to the durable tier "
                         "before exit")
    committed = summary["last_committed"]
    lines.append(f"last committed step: {'none' if committed is None else committed}")
    return "\n".join(lines)
