"""The run summary from events alone: a persist round after the last failure is neither an
attempt nor a recovery, and a run dir reused by a later launch reports that launch's round."""

from __future__ import annotations

from launcher.summary import format_summary, summarize


def _events(*specs):
    return [{"time": float(t), "event": name, "attempt": 0, **fields} for t, name, fields in specs]


FAILED_AND_PERSISTED = (
    (1, "launch", {}), (2, "workers_started", {}), (3, "fresh_start", {"step": 0}),
    (4, "worker_failed", {"rank": 1, "exitcode": -9, "signal": "SIGKILL", "last_step": 23}),
    (5, "persist_begin", {"step": 22}), (6, "workers_started", {}), (7, "save_commit", {"step": 22}),
    (8, "persisted", {"step": 22}), (9, "persist_end", {"step": 22, "ok": True, "why": None}),
)


def test_a_persist_round_is_not_an_attempt():
    summary = summarize(_events(*FAILED_AND_PERSISTED))
    assert summary["attempts"] == 1 and len(summary["failures"]) == 1
    assert summary["failures"][0]["resumed_step"] is None  # not recovered: the round only persisted
    assert summary["last_committed"] == 22
    text = format_summary(summary, "failed", "RUN")
    assert "memory tier: the snapshot of step 22 was committed to the durable tier before exit" in text
    assert "not recovered (no restart followed)" in text


def test_a_later_launch_in_the_same_run_dir_is_counted_and_not_the_old_round():
    later = ((10, "launch", {}), (11, "workers_started", {}), (12, "resumed", {"step": 22, "source": "disk"}),
             (13, "first_step", {"step": 23}), (14, "finished", {"step": 50}))
    summary = summarize(_events(*FAILED_AND_PERSISTED, *later))
    assert summary["persisted"] is None and summary["ended_by"] == "finished" and summary["attempts"] == 2
    assert "memory tier" not in format_summary(summary, "succeeded", "RUN")


def test_a_failed_persist_round_says_why():
    events = _events(*FAILED_AND_PERSISTED[:5], (6, "persist_end", {"step": 22, "ok": False,
                                                                     "why": "the workers ended FAILED"}))
    text = format_summary(summarize(events), "failed", "RUN")
    assert "memory tier: committing the snapshot of step 22 failed (the workers ended FAILED)" in text


def test_failures_of_a_script_that_reports_no_steps_cost_an_unknown_amount_not_zero():
    """A plain torchrun script under ftlaunch: its workers' heartbeats say step -1 (none
    reported) and no generation says where it resumed. The summary said 'at step -1' and
    'steps lost: 0; time lost: 0 s'."""
    events = _events((1, "launch", {}), (2, "workers_started", {}),
                     (3, "worker_failed", {"rank": 1, "exitcode": 3, "signal": None, "last_step": -1}),
                     (4, "workers_started", {}),
                     (5, "worker_failed", {"rank": 1, "exitcode": 3, "signal": None, "last_step": -1, "attempt": 1}))
    summary = summarize(events)
    assert summary["steps_lost"] is None and summary["seconds_lost"] is None
    assert [f["last_step"] for f in summary["failures"]] == [None, None]
    text = format_summary(summary, "failed", "RUN")
    assert "rank 1 exit code 3 before any step it reported: restarted; steps and time lost unknown (this run dir" in text
    assert "steps lost: unknown; time lost: unknown" in text and "last committed step: none" in text
    assert "-1" not in text and "None" not in text


def test_a_generation_that_failed_before_its_first_step_lost_no_steps():
    events = _events((1, "launch", {}), (2, "workers_started", {}), (3, "fresh_start", {"step": 0}),
                     (4, "first_step", {"step": 1}),
                     (5, "worker_failed", {"rank": 0, "exitcode": -9, "signal": "SIGKILL", "last_step": 30}),
                     (6, "workers_started", {}),
                     (7, "worker_failed", {"rank": 1, "exitcode": 1, "signal": None, "last_step": -1, "attempt": 1}),
                     (8, "workers_started", {}), (9, "resumed", {"step": 25, "source": "disk"}),
                     (10, "first_step", {"step": 26}))
    summary = summarize(events)
    assert [f["steps_lost"] for f in summary["failures"]] == [5, 0]
    assert summary["steps_lost"] == 5
    text = format_summary(summary, "succeeded", "RUN")
    assert "rank 1 exit code 1 before any step it reported: resumed from step 25 (disk), 0 steps" in text


def test_a_run_dir_reused_by_a_second_launch_keeps_both_launches_failures():
    """Attempts count from 0 in every launch: the second launch's first failure is a failure
    of its own, not a repeat of the first launch's attempt 0 (it was dropped)."""
    first = ((1, "launch", {}), (2, "workers_started", {}), (3, "fresh_start", {"step": 0}),
             (4, "first_step", {"step": 1}),
             (5, "worker_failed", {"rank": 1, "exitcode": -9, "signal": "SIGKILL", "last_step": 23}))
    second = ((10, "launch", {}), (11, "workers_started", {}), (12, "resumed", {"step": 20, "source": "disk"}),
              (13, "first_step", {"step": 21}),
              (14, "worker_failed", {"rank": 0, "exitcode": 1, "signal": None, "last_step": 40}),
              (15, "workers_started", {"attempt": 1}), (16, "resumed", {"step": 40, "source": "disk"}),
              (17, "first_step", {"step": 41}), (18, "finished", {"step": 50}))
    summary = summarize(_events(*first, *second))
    assert [(f["kind"], f["last_step"], f["resumed_step"]) for f in summary["failures"]] == [
        ("signal SIGKILL", 23, 20), ("exit code 1", 40, 40)]
    assert summary["steps_lost"] == 3 and summary["attempts"] == 3
