"""The chaos campaign: real faults at random times, and an oracle that trusts nothing we print.

    python bench/chaos.py --episodes 200 --seed 1 --out runs/chaos     (make chaos)
    python bench/chaos.py --seed 1 --out runs/chaos --only 17          (replay episode 17)

Each episode runs one job under ftlaunch (2 workers) on one of two scripts: ``train.py``, or
``bench/chaos_worker.py``, a DDP script that uses only the checkpoint library. It draws one
fault (the kinds rotate, so every kind is covered; the step, the rank and the file are drawn
from the episode's seed) and injects it while the job runs. Then it checks, from the files
on disk and the processes on the machine alone:

- the exit status is honest: 0 only if the final step is committed and verifies;
- the final state is bitwise equal to an uninterrupted run of the same script;
- every checkpoint that verified before the fault still verifies, except the one we damaged
  (retention deletes nothing here: keep_last=0);
- a checkpoint that fails verification was never loaded, and a forged one never ran code;
- no process of the episode is left running;
- nothing hung past the episode's time limit.

Results go to OUT/episodes.jsonl, one line per episode, so a campaign resumes where it
stopped; the table at the end covers every episode in that file for this seed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the shared fault-scenario harness

from procs import (assert_each_sample_once, compare_training_state, effective_steps, forge_metadata, load_checkpoint,  # noqa: E402
                   network_namespace, read_trace, wait_until)

from checkpoint import Storage, verify  # noqa: E402
from checkpoint.manifest import list_steps, step_dir_name  # noqa: E402
from launcher.contract import Beat, heartbeat_path, read_events  # noqa: E402
from launcher.proctree import kill_tree  # noqa: E402

# (total steps, save every N) per script: long enough (about 5 s of training here) for a fault
# drawn at a random step to land mid-run, with several commits before it.
JOBS = {"train": (400, 20), "plain": (200, 20)}
NODE_KINDS = ("kill-node", "net-cut")
TRAINER_ONLY = ("kill-while-writing", "kill-before-commit", "kill-load", "enospc", *NODE_KINDS)
KINDS = ("kill-worker", "kill-while-writing", "sigstop", "kill-ftlaunch", "corrupt-file", "kill-before-commit",
         "sigterm", "flip-metadata", "kill-load", "forged-metadata", "unreadable-shard", "enospc", *NODE_KINDS)
NODE_EPOCHS = 10  # kill-node: 3 loopback nodes of 1 worker, digits for 10 epochs (230 steps)
LAUNCH_FLAGS = ("--nproc-per-node=2", "--hang-timeout", "3", "--grace-period", "5", "--restart-backoff", "0.2")
EPISODE_TIMEOUT = 240
DAMAGE = ("corrupt-file", "flip-metadata", "forged-metadata", "unreadable-shard")


# -- the two jobs ----------------------------------------------------------------------------
def job_command(script: str, ckpt: Path, run_dir: Path, inject: list[str]) -> list[str]:
    steps, save_every = JOBS[script]
    launch = [sys.executable, "-m", "launcher.cli", *LAUNCH_FLAGS, "--run-dir", str(run_dir)]
    if script == "train":
        return [*launch, *(a for f in inject for a in ("--inject", f)), str(REPO / "train.py"), "--ckpt-dir", str(ckpt),
                "--max-steps", str(steps), "--save-every-steps", str(save_every), "--keep-last", "0",
                "--log-every", "1000", "--run-dir", str(run_dir)]
    return [*launch, str(REPO / "bench" / "chaos_worker.py"), str(ckpt), str(steps), str(save_every),
            str(run_dir / "steps")]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def reference(script: str, out: Path) -> dict:
    """The final state of an uninterrupted run (computed once per campaign, then cached)."""
    cached = out / f"reference-{script}.pt"
    if not cached.exists():
        d = out / f"reference-{script}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        proc = start(job_command(script, d / "ckpt", d / "run", []), d / "log")
        if proc.wait(timeout=EPISODE_TIMEOUT) != 0:
            raise SystemExit(f"chaos: the uninterrupted {script} run failed; see {d / 'log'}")
        torch.save(load_checkpoint(d / "ckpt" / step_dir_name(JOBS[script][0]), d), cached)
    return torch.load(cached, weights_only=False)


# -- observing a running job -----------------------------------------------------------------
def beats(run_dir: Path) -> dict[int, Beat]:
    return {r: b for r in (0, 1) if (b := Beat.read(heartbeat_path(str(run_dir), r))) is not None}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> dict[int, Beat]:
    """Block until every rank reported ``step`` (a heartbeat) and return the beats."""
    found: dict = {}

    def reached():
        found.update(beats(run_dir))
        return len(found) == 2 and min(b.step for b in found.values()) >= step

    wait_until(reached, timeout, proc, f"step {step}", poll=0.005)
    return found


def verified_steps(ckpt: Path) -> dict[int, dict]:
    """Committed steps that verify by hash, with their records' file lists."""
    storage, out = Storage(ckpt), {}
    for step in list_steps(storage):
        manifest, _ = verify(storage, step_dir_name(step), "hash")
        if manifest is not None:
            out[step] = {name: (rec.size, rec.crc32) for name, rec in manifest.files.items()}
    return out


def leftover_processes(episode_dir: Path, grace: float = 10.0) -> list[tuple[psutil.Process, str]]:
    """Processes of the episode (named in their command line or environment) still running
    ``grace`` s after the job ended: parent-death signals take a moment to land."""
    mine = str(episode_dir)

    def find():
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                cmdline = " ".join(proc.info["cmdline"] or ())
                if mine in cmdline or proc.environ().get("FTLAUNCH_RUN_DIR", "").startswith(mine):
                    found.append((proc, cmdline))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    deadline = time.monotonic() + grace
    while (found := find()) and time.monotonic() < deadline:
        time.sleep(0.2)  # sleep-ok: waiting, with a deadline, for exiting processes to go
    return found


def wait_or_kill(proc: subprocess.Popen, started: float, what: str, violations: list[str]) -> int:
    """``proc``'s exit code; past the episode's time limit a violation, and its tree killed."""
    try:
        return proc.wait(timeout=max(1, EPISODE_TIMEOUT - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        violations.append(f"hang: {what} did not end within the episode's {EPISODE_TIMEOUT} s")
        kill_tree(proc.pid)
        return proc.wait()


# -- damage ------------------------------------------------------------------------------------
def flip_byte(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))



# -- one episode -------------------------------------------------------------------------------
def run_episode(index: int, seed: int, kind: str, script: str, out: Path, refs: dict) -> dict:
    rng = random.Random(f"{seed}:{index}")
    d = out / f"ep{index:04d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    ckpt, run_dir = d / "ckpt", d / "run"
    violations: list[str] = []
    info: dict = {"episode": index, "seed": seed, "kind": kind, "script": script}
    damaged: int | None = None
    marker = d / "FORGED_CODE_RAN"
    mounted = False
    inject: list[str] = []
    rank = rng.randrange(2)
    steps, save_every = JOBS[script]
    fault_step = rng.randrange(save_every + 3, steps - 2 * save_every)
    if kind in ("kill-while-writing", "kill-before-commit"):
        fault_step = rng.randrange(2, steps // save_every) * save_every
        inject = [f"{kind}:rank={rank}:step={fault_step}"]
    elif kind == "kill-load":
        inject = [f"kill:rank={rank}:step={fault_step}",
                  f"kill-load:rank={1 - rank}:step={fault_step // save_every * save_every}"]
    elif kind == "enospc":
        ckpt.mkdir()
        size_kb = int(refs["ckpt_kb"][script] * rng.uniform(2.5, 4.5))
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(ckpt)],
                                 capture_output=True).returncode == 0
        if not mounted:
            return {**info, "skipped": "cannot mount a tmpfs (needs root)"}
    started = time.monotonic()
    proc = start(job_command(script, ckpt, run_dir, inject), d / "log")
    fault_time, step_at_fault = None, None
    try:
        before: dict = {}
        if kind not in TRAINER_ONLY:
            seen = wait_for_step(run_dir, fault_step, proc)
            if kind in DAMAGE:  # something committed to damage (async commits trail by a step or two)
                wait_until(lambda: bool(before.update(verified_steps(ckpt)) or before), 60, proc, "a commit")
            else:
                before = verified_steps(ckpt)
            seen.update(beats(run_dir))
            step_at_fault = max(b.step for b in seen.values())
            fault_time = time.time()
            target = seen[rank].os_pid
            if kind in ("kill-worker", "sigstop", *DAMAGE) and not psutil.pid_exists(target):
                # A restart replaced the worker between our reads (a false alarm on a loaded
                # machine): no fault can land on it; say so instead of judging the episode.
                kill_tree(proc.pid)
                return {**info, "skipped": f"the rank {rank} worker (pid {target}) was replaced before the fault"}
            if kind == "kill-worker":
                os.kill(target, signal.SIGKILL)
            elif kind == "sigstop":
                os.kill(target, signal.SIGSTOP)
            elif kind in ("kill-ftlaunch", "sigterm"):
                proc.send_signal(signal.SIGKILL if kind == "kill-ftlaunch" else signal.SIGTERM)
            else:  # damage a committed checkpoint, then kill a worker so that the job resumes
                damaged = rng.choice(sorted(before)) if kind == "corrupt-file" else max(before)
                step_dir = ckpt / step_dir_name(damaged)
                if kind == "corrupt-file":
                    victim = step_dir / rng.choice(sorted(before[damaged]) + ["manifest.json"])
                    if rng.random() < 0.5:
                        victim.write_bytes(victim.read_bytes()[:rng.randrange(victim.stat().st_size)])
                    else:
                        flip_byte(victim, rng)
                elif kind == "flip-metadata":
                    flip_byte(step_dir / ".metadata", rng)
                elif kind == "forged-metadata":
                    forge_metadata(step_dir, marker)
                elif kind == "unreadable-shard":  # an OSError (EISDIR) on read, as root cannot get EACCES
                    shard = sorted(step_dir.glob("*.distcp"))[0]
                    shard.unlink()
                    shard.mkdir()
                os.kill(target, signal.SIGKILL)
                info["damaged"] = damaged
        rc = wait_or_kill(proc, started, "the job", violations)
        info["rc"] = rc
        if kind == "kill-ftlaunch":
            for leftover, cmdline in leftover_processes(d):
                violations.append(f"outlived the SIGKILLed ftlaunch: {cmdline[:100]}")
                kill_tree(leftover.pid)
        if kind in ("kill-ftlaunch", "sigterm"):
            if kind == "sigterm" and script == "train" and rc != 0:
                violations.append(f"a preempted train.py run exited {rc}, not 0")
            relaunch = start(job_command(script, ckpt, run_dir, []), d / "log")
            rc = wait_or_kill(relaunch, started, "the relaunch", violations)
            info["rc"] = rc
        violations += judge(kind, script, rc, ckpt, before, damaged, marker, refs[script], d)
        info.update(cost(script, run_dir, fault_time, step_at_fault))
    finally:
        for leftover, cmdline in leftover_processes(d):
            violations.append(f"process left running: {cmdline[:120]}")
            kill_tree(leftover.pid)
        if mounted:
            subprocess.run(["umount", "-l", str(ckpt)], capture_output=True)
    info["seconds"] = round(time.monotonic() - started, 1)
    info["violations"] = violations
    return info


def judge(kind, script, rc, ckpt: Path, before: dict, damaged, marker: Path, ref: dict, d: Path) -> list[str]:
    problems = []
    steps = JOBS[script][0]
    final = ckpt / step_dir_name(steps)
    storage = Storage(ckpt)
    final_ok = final.exists() and verify(storage, step_dir_name(steps), "hash")[0] is not None
    damaged_intact = damaged is not None and (ckpt / step_dir_name(damaged)).exists() and \
        verify(storage, step_dir_name(damaged), "hash")[0] is not None
    only_one_damaged = damaged is not None and set(before) == {damaged} and not damaged_intact
    if kind == "enospc":
        if rc == 0 and not final_ok:
            problems.append("exit 0 without a committed final step (disk full)")
    elif only_one_damaged:
        # The only commit was damaged: the job must refuse to start over it, and say so.
        if rc == 0 or "none verifies" not in (d / "log").read_text():
            problems.append(f"the only checkpoint was damaged and the job did not refuse to start (exit {rc})")
    elif rc != 0:
        problems.append(f"the job did not recover: exit {rc} (see {d / 'log'})")
    if rc == 0 and not final_ok:
        problems.append("exit 0 but the final step is not committed and verified")
    if final_ok and kind != "enospc":
        diffs = compare_training_state(load_checkpoint(final, d), ref)
        if diffs:
            problems.append(f"final state differs from the uninterrupted run: {', '.join(diffs[:3])}")
    after = verified_steps(ckpt)
    for step, files in before.items():
        if step == damaged:
            continue
        if after.get(step) != files:
            problems.append(f"step {step} verified before the fault and does not now")
    if marker.exists():
        problems.append("a forged checkpoint ran code")
    if damaged is not None:
        if script == "plain":
            loaded = resumed_steps_from_log(d / "run" / "steps")
        else:
            loaded = [e.get("step") for e in read_events(str(d / "run"))  # a memory snapshot is not the file
                      if e.get("event") == "resumed" and e.get("source") != "memory"]
        if damaged in loaded and not damaged_intact:
            problems.append(f"the damaged checkpoint of step {damaged} was loaded")
    return problems


def resumed_steps_from_log(prefix: Path) -> list[int]:
    """Steps a later generation of the plain script resumed from: its first step minus one."""
    firsts: dict[int, int] = {}
    for path in prefix.parent.glob(prefix.name + ".rank*"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            firsts[rec["gen"]] = min(firsts.get(rec["gen"], rec["step"]), rec["step"])
    return [s - 1 for g, s in firsts.items() if g > 0]


def cost(script: str, run_dir: Path, fault_time, step_at_fault) -> dict:
    """Kill-to-first-step seconds and steps re-executed (the newest step any rank had run
    minus the step training resumed from), from the job's own step records. For injected
    faults the fault's time and step are the agent's first failure event."""
    if script == "train":
        events = read_events(str(run_dir))
        if fault_time is None:
            failure = next((e for e in events if e["event"] in ("worker_failed", "hang_detected")), None)
            if failure is None:
                return {}
            fault_time, step_at_fault = failure["time"], failure.get("last_step", failure.get("step"))
        first = next((e for e in events if e["event"] == "first_step" and e["time"] > fault_time), None)
        resumed = next((e for e in events if e["event"] == "resumed" and e["time"] > fault_time), None)
        if first is None or resumed is None or step_at_fault is None:
            return {}
        return {"recovery_s": round(first["time"] - fault_time, 2),
                "steps_redone": max(0, step_at_fault - resumed["step"])}
    if fault_time is None:
        return {}
    records = [json.loads(l) for p in run_dir.glob("steps.rank*") for l in p.read_text().splitlines()]
    old = {r["pid"] for r in records if r["t"] <= fault_time}
    after = [r for r in records if r["t"] > fault_time and r["pid"] not in old]  # the new processes' steps
    if not after:
        return {}
    first = min(after, key=lambda r: r["t"])
    return {"recovery_s": round(first["t"] - fault_time, 2), "steps_redone": max(0, step_at_fault - (first["step"] - 1))}


# -- a whole node killed -----------------------------------------------------------------------
def run_node_episode(index: int, seed: int, out: Path, kind: str) -> dict:
    """Three ftlaunch agents (nodes) around a standalone rendezvous store. ``kill-node``: on
    loopback, one node is SIGKILLed whole (agent, fork server, workers) at a random step.
    ``net-cut``: the third node lives in a network namespace of its own and its link is taken
    down at a random step (it stays alive, silent). The survivors must finish at world size 2
    with every sample of every epoch trained exactly once."""
    with network_namespace("10.214.0") if kind == "net-cut" else contextlib.nullcontext(None) as net:
        if isinstance(net, str):
            return {"episode": index, "seed": seed, "kind": kind, "script": "train", "skipped": net}
        return _node_episode(index, seed, out, kind, net)


def _node_episode(index: int, seed: int, out: Path, kind: str, net: dict | None) -> dict:
    rng = random.Random(f"{seed}:{index}")
    d = out / f"ep{index:04d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    info: dict = {"episode": index, "seed": seed, "kind": kind, "script": "train"}
    violations: list[str] = []
    started = time.monotonic()
    host = net["host_ip"] if net else "127.0.0.1"
    store = start([sys.executable, "-m", "launcher.cli", "rendezvous", "--host", host, "--port", "0",
                   "--port-file", str(d / "port")], d / "rendezvous.log")
    nodes: dict[int, subprocess.Popen] = {}
    victim = 2 if net else rng.randrange(3)
    total = NODE_EPOCHS * 23
    fault_step = rng.randrange(25, total - 60)
    try:
        wait_until(lambda: (d / "port").exists(), 60, store, "the rendezvous store")
        endpoint = f"{host}:{(d / 'port').read_text()}"
        for node in range(3):
            cmd = [sys.executable, "-m", "launcher.cli", "--nnodes", "2:3", "--nproc-per-node", "1",
                   "--hang-timeout", "3", "--rdzv-endpoint", endpoint, "--rdzv-id", f"chaos-{index}",
                   "--run-dir", str(d / f"node{node}"), str(REPO / "train.py"), "--ckpt-dir",
                   str(d / "ckpt"), "--epochs", str(NODE_EPOCHS), "--save-every-steps", "20",
                   "--keep-last", "0", "--trace-samples", "--run-dir", str(d / "shared"), "--log-every", "1000"]
            if net:  # nodes 0 and 1 on the host side of the veth pair, node 2 behind it
                inside = node == victim
                addr, ifname = (net["ns_ip"], net["ns_if"]) if inside else (host, net["host_if"])
                cmd = [*(("ip", "netns", "exec", net["ns"]) if inside else ()), "env", f"GLOO_SOCKET_IFNAME={ifname}",
                       cmd[0], *cmd[1:3], "--local-addr", addr, *cmd[3:]]
            nodes[node] = start(cmd, d / f"node{node}.log")

        def newest_step():
            return max((b.step for n in range(3) for r in range(3)
                        if (b := Beat.read(heartbeat_path(str(d / f"node{n}"), r))) is not None), default=-1)

        wait_until(lambda: newest_step() >= fault_step, 180, None, f"step {fault_step}")
        before = verified_steps(d / "ckpt")
        fault_time, step_at_fault = time.time(), newest_step()
        if net:
            subprocess.run(["ip", "link", "set", net["host_if"], "down"], check=True)  # the cable is cut
        else:
            kill_tree(nodes[victim].pid)
        info["victim"] = victim  # (net-cut: node 2, whose link was cut)
        for node, proc in nodes.items():
            if node == victim:
                continue
            rc = wait_or_kill(proc, started, f"node {node}", violations)
            if rc != 0:
                violations.append(f"surviving node {node} exited {rc} (see {d / f'node{node}.log'})")
        storage = Storage(d / "ckpt")
        final = verify(storage, step_dir_name(total), "hash")[0]
        if final is None or final.world_size != 2:
            violations.append(f"the final step {total} is not committed at world size 2")
        try:
            assert_each_sample_once(effective_steps(read_trace(d / "shared")), NODE_EPOCHS)
        except AssertionError as e:
            violations.append(f"exactness: {e}")
        after = verified_steps(d / "ckpt")
        violations += [f"step {s} verified before the fault and does not now" for s, f in before.items() if after.get(s) != f]
        events = [e for n in range(3) if n != victim for e in read_events(str(d / f"node{n}"))]
        first = min((e["time"] for e in events if e["event"] == "first_step" and e["time"] > fault_time), default=None)
        resumed = [e["step"] for e in events if e["event"] == "resumed" and e["time"] > fault_time]
        if first is not None and resumed:
            info.update(recovery_s=round(first - fault_time, 2), steps_redone=max(0, step_at_fault - min(resumed)))
    except AssertionError as e:
        violations.append(str(e))
    finally:
        for proc in [*nodes.values(), store]:
            kill_tree(proc.pid)
        for leftover, cmdline in leftover_processes(d):
            violations.append(f"process left running: {cmdline[:120]}")
            kill_tree(leftover.pid)
    info["seconds"] = round(time.monotonic() - started, 1)
    info["violations"] = violations
    return info


# -- the campaign ------------------------------------------------------------------------------
def plan(episodes: int, kinds: list[str], scripts: list[str]) -> list[tuple[str, str]]:
    """Kinds rotate so every kind is covered; scripts alternate per round (trainer-only kinds
    always run train.py)."""
    out = []
    for i in range(episodes):
        kind = kinds[i % len(kinds)]
        script = scripts[(i // len(kinds)) % len(scripts)]
        out.append((kind, "train" if kind in TRAINER_ONLY else script))
    return out


def percentile(values: list[float], q: float):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def table(results: list[dict]) -> str:
    lines = ["| fault | episodes | recovered | kill->first step p50 / p95 (s) | steps re-executed p50 / p95 |",
             "|---|---|---|---|---|"]
    for kind in KINDS:
        rows = [r for r in results if r["kind"] == kind and "skipped" not in r]
        if not rows:
            continue
        ok = sum(not r["violations"] for r in rows)
        rec = [r["recovery_s"] for r in rows if "recovery_s" in r]
        redo = [r["steps_redone"] for r in rows if "steps_redone" in r]
        fmt = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
        lines.append(f"| {kind} | {len(rows)} | {ok} | {fmt(percentile(rec, .5))} / {fmt(percentile(rec, .95))} | "
                     f"{fmt(percentile(redo, .5))} / {fmt(percentile(redo, .95))} |")
    total = [r for r in results if "skipped" not in r]
    bad = [r for r in total if r["violations"]]
    lines.append(f"\n{len(total)} episodes, {len(total) - len(bad)} without violations, {len(bad)} with")
    for r in bad:
        lines.append(f"- episode {r['episode']} ({r['kind']}, {r['script']}; replay: --seed {r['seed']} --only "
                     f"{r['episode']}): " + "; ".join(r["violations"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/chaos")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of: " + ", ".join(KINDS))
    parser.add_argument("--scripts", default="train,plain", help="train, plain or both")
    parser.add_argument("--only", type=int, action="append", default=[], help="run just this episode (repeatable)")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    scripts = [s for s in args.scripts.split(",") if s]
    unknown = [k for k in kinds if k not in KINDS] + [s for s in scripts if s not in ("train", "plain")]
    if unknown or args.episodes < 1:
        parser.error(f"unknown kind or script {unknown}" if unknown else "--episodes must be >= 1")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "episodes.jsonl"
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            if r["seed"] == args.seed:
                done[r["episode"]] = r
    schedule = plan(args.episodes, kinds, scripts)
    todo = args.only or [i for i in range(args.episodes) if i not in done]
    refs: dict = {"ckpt_kb": {}}
    for script in sorted({s for _, s in schedule}):
        refs[script] = reference(script, out)
        step_dir = out / f"reference-{script}" / "ckpt" / step_dir_name(JOBS[script][0])
        refs["ckpt_kb"][script] = max(1, sum(p.stat().st_size for p in step_dir.iterdir()) // 1024)
    with open(results_path, "a") as log:
        for index in tqdm(todo, desc="chaos", unit="episode", disable=not sys.stderr.isatty()):
            kind, script = schedule[index]
            if kind in NODE_KINDS:
                result = run_node_episode(index, args.seed, out, kind)
            else:
                for attempt in range(3):  # same draw; a worker replaced before the fault is timing, so again
                    result = run_episode(index, args.seed, kind, script, out, refs)
                    if "was replaced before the fault" not in result.get("skipped", ""):
                        break
                    print(f"episode {index} {kind} ({script}): {result['skipped']}; running it again", flush=True)
            done[index] = result
            log.write(json.dumps(result) + "\n")
            log.flush()
            status = "ok" if not result.get("violations") else "VIOLATION: " + "; ".join(result["violations"])
            print(f"episode {index} {kind} ({script}): {result.get('skipped') or status}", flush=True)
            if not result.get("violations") and "skipped" not in result:
                shutil.rmtree(out / f"ep{index:04d}", ignore_errors=True)  # keep only what needs a look
    results = [done[i] for i in sorted(done) if i < args.episodes or i in args.only]
    report = table(results)
    (out / "chaos.md").write_text(report + "\n")
    print(report)
    return 1 if any(r.get("violations") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
