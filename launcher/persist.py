"""The memory tier after a job ends for good (restarts used up, a crash loop): ftlaunch moves
the newest memory snapshot into the durable tier before it exits, then frees the shared
memory. The workers do the moving (they know the state's layout and the commit protocol):
one more generation, started with ``contract.PERSIST_ENV`` set, resumes from memory, commits
that step and exits (``trainer.loop``). It is not a restart: the summary does not count it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

from torch.distributed.elastic.agent.server.api import WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

from . import contract

log = logging.getLogger("ftlaunch")


def persist_memory(agent) -> None:
    """The job ended for good (restarts used up, a crash loop): when the workers' memory
    tier holds a step newer than the newest commit, one more generation moves it to the
    durable tier (``contract.PERSIST_ENV``: the workers resume from memory, commit that
    step and exit), so the job loses at most the steps since its newest snapshot. Then
    the shared memory is freed. A single-node job only: the nodes of a larger one do not
    end together, and a round the others never join would wait for its rendezvous."""
    dirs = sorted({e["memory_dir"] for e in contract.read_events(agent.run_dir) if e.get("memory_dir")})
    if not dirs:
        return
    world_size = agent._worker_group.workers[0].world_size if agent._worker_group.workers else 1
    newest = max((step for d in dirs if (step := _newest_common_step(d, world_size)) is not None), default=-1)
    pending = newest >= 0 and (agent._known_committed is None or newest > agent._known_committed)
    if pending and (agent._worker_group.group_world_size or 1) > 1:
        log.warning("the memory tier holds step %d, newer than the last commit (%s), in %s on this node; a job "
                    "on several nodes is not persisted from memory: relaunch with the same --rdzv-id to resume "
                    "from it, or remove it", newest, agent._known_committed, ", ".join(dirs))
        return
    if pending and not _persist_round(agent, newest):
        log.error("the memory snapshots stay in %s: relaunch with the same --rdzv-id to resume from them, or "
                  "remove them", ", ".join(dirs))
        return
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def _persist_round(agent, step: int) -> bool:
    log.warning("the job ends for good; moving the memory snapshot of step %d to the durable tier", step)
    agent.event("persist_begin", step=step)
    group = agent._worker_group
    os.environ[contract.PERSIST_ENV] = "1"
    state, why = WorkerState.UNKNOWN, ""
    try:
        agent._initialize_workers(group)  # rendezvous and start, as a restart does, but not counted as one
        deadline = time.monotonic() + (agent.policy.io_timeout or 600.0)
        while state not in (WorkerState.SUCCEEDED, WorkerState.FAILED) and time.monotonic() < deadline:
            time.sleep(group.spec.monitor_interval)  # TorchElastic's own monitor period
            state = LocalElasticAgent._monitor_workers(agent, group).state  # no failure accounting, no hang restarts
        why = ("" if state == WorkerState.SUCCEEDED else f"the workers ended {state.name}"
               if state == WorkerState.FAILED else f"not done within {agent.policy.io_timeout or 600.0:g} s")
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
    finally:
        os.environ.pop(contract.PERSIST_ENV, None)
        if state != WorkerState.SUCCEEDED:
            agent._stop_workers(group)
    if why:
        log.error("persisting the memory snapshot of step %d failed: %s", step, why)
    else:  # the step the workers committed (None: the durable tier already held one as new)
        step = next((e.get("step") for e in reversed(contract.read_events(agent.run_dir))
                     if e["event"] == "persisted"), step)
    agent.event("persist_end", step=step, ok=not why, why=why or None)
    return not why


def _newest_common_step(run_dir: str, world_size: int) -> int | None:
    """The newest step that the slots of every rank of this node hold at the group's world
    size (their headers, the slots' commits, read as JSON; the workers check the rest when
    they load it). Slots of another world size (an earlier launch) do not count."""
    held = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else ():
        if not (name.startswith("rank") and name[4:].isdigit()) or int(name[4:]) >= world_size:
            continue  # owner.json, or a rank this group does not have
        steps = set()
        for slot in (0, 1):
            try:
                with open(os.path.join(run_dir, name, f"slot{slot}.json")) as f:
                    header = json.load(f)
                step = header.get("step")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(step, int) and header.get("world_size") == world_size:
                steps.add(step)
        held.append(steps)
    common = set.intersection(*held) if held else set()
    return max(common, default=None)
