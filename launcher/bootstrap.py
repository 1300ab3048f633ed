"""How ftlaunch runs a Python training script: exactly as ``python -u script`` would, plus
two things the script does not have to ask for.

1. **A heartbeat without code changes.** Torch's global optimizer hook
   (``register_optimizer_step_post_hook``) makes every ``optimizer.step()`` a beat in the
   worker's heartbeat file, so the agent can tell a stopped or deadlocked worker of *any*
   script from a working one. A script that uses ``launcher.worker.Reporter`` reports its own
   steps and phases instead (the hook then stays quiet).
2. **Nothing outlives the launcher.** The process asks the kernel for SIGKILL when its parent
   dies (``PR_SET_PDEATHSIG``), so a SIGKILLed ftlaunch takes its workers with it.

Both the pre-warmed path (``launcher.prewarm`` forks a worker, then calls ``run_as_main`` and
``exit_like_python``) and the plain path (``python -u -m launcher.bootstrap ARGS``, used with
``--no-prewarm``) go through this module, so they behave alike.

The script runs the way the interpreter runs it: ``sys.argv`` is the script and its
arguments, ``sys.path[0]`` is the script's directory (the current directory for ``-m``), an
uncaught exception prints its traceback and exits 1, ``SystemExit`` keeps its code, and at
exit non-daemon threads are joined and ``atexit`` handlers run (an async checkpoint save in
flight is finished, not lost).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time
import traceback

from . import contract

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """Linux: SIGKILL this process when its parent dies, however it dies. With
    ``expected_parent``, exit at once if the parent is already gone (it may die between our
    fork and this call)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(128 + signal.SIGKILL)


def outlive_parent() -> None:
    """Undo ``die_with_parent`` for this process: a node-kill fault must go on killing its
    node after its own parent (the agent, or the fork server) is gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, 0)
    except (OSError, AttributeError):
        pass


def die_with_agent() -> None:
    """``die_with_parent``, for a process whose parent is ftlaunch's agent (its pid is in the
    environment): exit at once if the agent is gone already."""
    agent = os.environ.get(contract.AGENT_PID_ENV, "")
    die_with_parent(int(agent) if agent.isdigit() else None)


# -- the optimizer-step heartbeat --------------------------------------------------------------
class _OptimizerBeats:
    """Writes a heartbeat after every ``optimizer.step()`` of this process (one 512-byte
    pwrite), unless the script reports through ``Reporter``."""

    def __init__(self, run_dir: str, rank: int, pid: int, generation: int):
        self.writer = contract.BeatWriter(run_dir, rank)
        self.rank, self.pid, self.generation = rank, pid, generation
        self.steps = 0
        self.silenced = False

    def __call__(self, _optimizer, _args, _kwargs) -> None:
        if self.silenced:
            return
        self.steps += 1
        self.writer.write(contract.Beat(rank=self.rank, pid=self.pid, generation=self.generation, step=self.steps,
                                        phase=contract.TRAINING, time=time.monotonic(), source=contract.OPTIMIZER,
                                        os_pid=os.getpid()))


_beats: _OptimizerBeats | None = None


def silence_optimizer_beats() -> None:
    """Called by ``Reporter``: the script reports its own progress from now on."""
    if _beats is not None:
        _beats.silenced = True


def watch_optimizer_steps(env=os.environ) -> None:
    """Under ftlaunch, make every ``optimizer.step()`` of this process a heartbeat, and mark
    the moments its script starts (phase ``starting``) and it starts joining its process
    group (phase ``joining``)."""
    global _beats
    run_dir = env.get(contract.RUN_DIR_ENV)
    if not run_dir or "RANK" not in env or _beats is not None:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _beats = _OptimizerBeats(run_dir, int(env["RANK"]), int(env.get(contract.WORKER_ID_ENV, os.getpid())),
                             int(env.get("TORCHELASTIC_RESTART_COUNT", 0)))
    register_optimizer_step_post_hook(_beats)
    # The script starts now: the startup clock counts from here, not from the wait for the
    # interpreter (or the fork server) to import torch, which a loaded machine can stretch.
    _write_phase(_beats, contract.STARTING, -1)
    _mark_joining(_beats)


def _wait_for_rank0_store(timeout: float = 10.0) -> None:
    """Without the agent's store (ftlaunch gives each generation a fresh one), rank 0 starts
    the group's TCPStore and the others connect to it; one that comes first is refused and
    retries with a backoff that cost 0.3-0.4 s of a 0.5 s restart here. Wait for the port
    with short polls instead (a connection closed at once is harmless to the store); after
    ``timeout`` torch's own retries take over."""
    import socket

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    if (os.environ.get("RANK", "0") == "0" or not addr or not port.isdigit()
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"):
        return
    try:  # resolved once: a poll must not become a stream of DNS queries
        family, kind, proto, _, where = socket.getaddrinfo(addr, int(port), type=socket.SOCK_STREAM)[0]
    except OSError:
        return  # torch reports it
    deadline, pause = time.monotonic() + timeout, 0.005
    while time.monotonic() < deadline:
        with socket.socket(family, kind, proto) as probe:
            probe.settimeout(1)
            if probe.connect_ex(where) == 0:
                return
        time.sleep(pause)  # sleep-ok: polling a port with a deadline
        pause = min(pause * 1.5, 0.05)  # gentle on rank 0's host when it is slow to start


def _mark_joining(beats: _OptimizerBeats) -> None:
    """Wrap ``torch.distributed.init_process_group`` so that the worker's heartbeat says
    ``joining`` before it first talks to its peers. The agent uses it to tell a worker that
    failed on its own (before joining: a broken device) from one that failed because a peer
    did (while or after joining)."""
    import functools

    import torch.distributed as dist

    real = dist.init_process_group

    @functools.wraps(real)
    def init_process_group(*args, **kwargs):
        if not beats.silenced and beats.steps == 0:
            _write_phase(beats, contract.JOINING, -1)
        if "store" not in kwargs and kwargs.get("init_method", "env://") == "env://" and len(args) < 2:
            _wait_for_rank0_store()
        return real(*args, **kwargs)

    real_destroy = dist.destroy_process_group

    @functools.wraps(real_destroy)
    def destroy_process_group(*args, **kwargs):
        # Training is over: teardown and exit get the I/O limit, not the step limit.
        if not beats.silenced:
            _write_phase(beats, contract.FINISHING, beats.steps)
        return real_destroy(*args, **kwargs)

    dist.init_process_group = init_process_group
    dist.destroy_process_group = destroy_process_group


def _write_phase(beats: _OptimizerBeats, phase: str, step: int) -> None:
    beats.writer.write(contract.Beat(rank=beats.rank, pid=beats.pid, generation=beats.generation, step=step,
                                     phase=phase, time=time.monotonic(), source=contract.BOOTSTRAP, os_pid=os.getpid()))


# -- running the script --------------------------------------------------------------------------
def strip_interpreter_args(argv: list[str]) -> list[str]:
    """``["-u", "-m", "pkg.mod", "-u", "x"]`` -> ``["-m", "pkg.mod", "-u", "x"]``: drop the
    interpreter's options (ftlaunch's workers have them already: unbuffered) and keep the
    script or ``-m module`` with its own arguments, untouched."""
    for i, arg in enumerate(argv):
        if arg == "-m" or not arg.startswith("-") or arg == "-":
            return argv[i:]
    return []


def run_as_main(argv: list[str]) -> int:
    """Run ``script args...`` or ``-m module args...`` as ``__main__``; return the exit code
    ``python`` would give (an uncaught exception prints its traceback and gives 1)."""
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in argv[0]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -signal.SIGINT  # python re-raises SIGINT on itself: "killed by SIGINT"
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def exit_like_python(code: int) -> None:
    """Finish the way the interpreter does at exit, then leave with ``code``: join non-daemon
    threads, run atexit handlers, flush stdio. For a forked worker, whose stack still holds the
    fork server's frames (a plain ``sys.exit`` would unwind into them)."""
    try:
        threading._shutdown()  # what Py_FinalizeEx calls first: waits for non-daemon threads
    except Exception:
        traceback.print_exc()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:  # die by the same signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def main(argv: list[str] | None = None) -> int:
    """``python -u -m launcher.bootstrap [interpreter options] script args...``"""
    argv = sys.argv[1:] if argv is None else argv
    die_with_agent()
    script = strip_interpreter_args(argv)
    if not script:
        print("usage: python -m launcher.bootstrap [-u] (script | -m module) [args...]", file=sys.stderr)
        return 2
    watch_optimizer_steps()
    code = run_as_main(script)
    if code < 0:
        exit_like_python(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
