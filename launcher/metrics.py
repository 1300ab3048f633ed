"""``ftlaunch --metrics-port P``: a Prometheus endpoint for the run (agent side).

Every scrape is computed from the run's events file, the same source as the summary
(``launcher.summary``), plus the agent's live view of the heartbeats (the newest step, the
step rate). Nothing is counted twice or drifts from what the summary will say, and there is
no hook to keep in step with the agent. The events file of a long run is a few MB at most;
it is read incrementally (only what was appended since the last scrape is parsed).

Metrics (all prefixed ``ftlaunch_``): ``restarts_total``, ``failures_total{kind}``,
``hangs_total``, ``last_committed_step``, ``step``, ``steps_per_second``, and histograms
``save_stall_seconds``, ``save_durable_seconds``, ``recovery_seconds``, ``steps_redone``.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from . import contract
from .summary import summarize

log = logging.getLogger("ftlaunch")

SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STEPS_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class _EventTail:
    """The events file, parsed once: each call reads only what was appended since the last."""

    def __init__(self, run_dir: str):
        self.path = contract.events_path(run_dir)
        self.events: list[dict] = []
        self._offset = 0
        self._lock = threading.Lock()

    def read(self) -> list[dict]:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return self.events
            complete = data[:data.rfind(b"\n") + 1]  # a line being appended is read next time
            self._offset += len(complete)
            for line in complete.splitlines():
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    continue
            return list(self.events)


def _histogram(name: str, doc: str, values: list[float], buckets: tuple) -> HistogramMetricFamily:
    cumulative = [(str(b), sum(v <= b for v in values)) for b in buckets] + [("+Inf", len(values))]
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=float(sum(values)))


class RunCollector(Collector):
    def __init__(self, run_dir: str, agent=None):
        self.events = _EventTail(run_dir)
        self.agent = agent

    def collect(self):
        events = self.events.read()
        summary = summarize(events)
        restarts = CounterMetricFamily("ftlaunch_restarts", "restarts of the worker group (failures and scale-ups)")
        restarts.add_metric([], max(0, summary["attempts"] - 1))
        yield restarts
        failures = CounterMetricFamily("ftlaunch_failures", "failed generations by the kind of their first failure",
                                       labels=["kind"])
        for kind, count in summary["failures_by_kind"].items():
            failures.add_metric([kind], count)
        yield failures
        hangs = CounterMetricFamily("ftlaunch_hangs", "ranks the watchdog found hung")
        hangs.add_metric([], sum(e["event"] == "hang_detected" for e in events))
        yield hangs
        committed = GaugeMetricFamily("ftlaunch_last_committed_step", "the newest committed checkpoint's step (-1: none)")
        committed.add_metric([], -1 if summary["last_committed"] is None else summary["last_committed"])
        yield committed
        step, rate = self._live()
        yield GaugeMetricFamily("ftlaunch_step", "the newest step a worker of this node reported", value=step)
        yield GaugeMetricFamily("ftlaunch_steps_per_second", "training steps per second (latest, from the heartbeats)",
                                value=rate)
        yield _histogram("ftlaunch_save_stall_seconds", "how long each save blocked training",
                         [e["stall_seconds"] for e in events if e["event"] == "save_staged"], SECONDS_BUCKETS)
        yield _histogram("ftlaunch_save_durable_seconds", "from the start of a save to its commit",
                         [e["seconds"] for e in events if e["event"] == "save_commit"], SECONDS_BUCKETS)
        recovered = [f for f in summary["failures"] if f["seconds_lost"] is not None]
        yield _histogram("ftlaunch_recovery_seconds", "failure (a hung rank: its last progress) -> first step after it",
                         [f["seconds_lost"] for f in recovered], SECONDS_BUCKETS)
        yield _histogram("ftlaunch_steps_redone", "steps trained again after each failure",
                         [f["steps_lost"] for f in recovered if f["steps_lost"] is not None], STEPS_BUCKETS)

    def _live(self) -> tuple[float, float]:
        agent = self.agent
        if agent is None:
            return -1.0, 0.0
        try:
            beats = list(getattr(agent, "_beat_cache", {}).values())
            step = max((b.step for b in beats if b.step is not None), default=-1)
            seconds = getattr(agent, "_step_seconds", 0.0) or 0.0
        except RuntimeError:  # the agent's thread changed the cache under us: next scrape
            return -1.0, 0.0
        return float(step), (1.0 / seconds if seconds > 0 else 0.0)


def serve(run_dir: str, port: int, addr: str, agent=None) -> int:
    """Start the endpoint in a daemon thread; returns the port it listens on (``port`` 0:
    a free one). It is recorded as a ``metrics`` event, so tools (and tests) can find it."""
    REGISTRY.register(RunCollector(run_dir, agent))
    server, _thread = start_http_server(port, addr=addr)
    bound = server.server_address[1]
    log.info("metrics at http://%s:%d/metrics", addr, bound)
    contract.append_event(run_dir, "metrics", agent=True, addr=addr, port=bound, pid=os.getpid())
    return bound
