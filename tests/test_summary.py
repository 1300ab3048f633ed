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
