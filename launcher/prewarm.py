"""Pre-warmed workers: restart a worker without paying for ``import torch`` again.

A restarted worker spends most of the time before it runs a line of the training script
importing torch and torch.distributed.checkpoint. ftlaunch starts one fork server per node
at launch, which imports those once. TorchElastic's entrypoint becomes a thin client (this
module, which imports no torch) that hands the server its argv, environment, working
directory and stdin/stdout/stderr (file descriptors passed over a Unix socket); the server
forks a worker that runs the script exactly as ``python -u script`` would.

    fork server (imported torch)          TorchElastic's worker process = the client
      `- supervisor (one per worker) <-- unix socket --> forwards signals, waits for the status
           `- worker: runpy of the script  (its exit status becomes the client's)

The supervisor kills the worker's whole session when the client dies (TorchElastic SIGKILLs
the client), and forwards any other signal. The client exits with the worker's status,
re-raising a fatal signal on itself so TorchElastic sees the same ``exitcode: -9`` a plain
worker would give. Every process of the chain (server, supervisor, worker, client) gets
SIGKILL when its parent dies, so nothing outlives a SIGKILLed ftlaunch. The worker gets the
client's CPU affinity (``--numa-binding``), umask and rlimits, and exits as the interpreter
does (threads joined, atexit handlers run: ``launcher.bootstrap``).

Forking a process that imported torch is safe while it has started no threads of its own and
never touched a GPU; the server does neither. Each worker re-seeds Python's and NumPy's global
RNGs from the OS, as a fresh interpreter would.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

from . import bootstrap
from .contract import WORKER_ID_ENV

_server_pid = 0

WARM_MODULES = ("torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict",
                "torch.nn.parallel", "torch.optim", "torch._dynamo", "numpy")  # torch._dynamo: the first optimizer imports it
# This project's own modules and the libraries they use: imported by the server only for a
# script of this project (train.py), whose imports resolve to them anyway; any other script
# could have a module of the same name (a "trainer" of its own) that these would shadow.
OWN_MODULES = ("fsspec", "psutil", "tqdm", "checkpoint", "launcher.worker", "trainer.loop")
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds ``launcher``
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def is_own_script(script: str) -> bool:
    """``script`` is one of this project's (its modules are worth pre-importing)."""
    return os.path.dirname(os.path.abspath(script)) == PROJECT


# -- server ---------------------------------------------------------------------------------
def serve(socket_path: str, modules: list[str], own: bool = False) -> None:
    bootstrap.die_with_parent()  # ftlaunch dies -> so does the server
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(256)  # clients may connect (and wait) while the imports below run
    for name in modules:
        importlib.import_module(name)
    if own:  # from the project's folder, whatever ftlaunch's working directory holds; never fatal
        sys.path.insert(0, PROJECT)
        for name in OWN_MODULES:
            try:
                importlib.import_module(name)
            except Exception as e:  # the workers import it themselves, as without the server
                print(f"prewarm: not pre-importing {name}: {type(e).__name__}: {e}", flush=True)
        sys.path.remove(PROJECT)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    global _server_pid
    _server_pid = os.getpid()
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _supervise(conn)
            finally:
                os._exit(0)
        conn.close()


def _supervise(conn: socket.socket) -> None:
    bootstrap.die_with_parent(expected_parent=_server_pid)  # the server dies -> so do we
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = json.loads(message)
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become_worker(request, fds, supervisor)  # never returns
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    pidfd = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([pidfd, conn], [], [])
        if pidfd in ready:
            # What it started dies with it, as TorchElastic's killpg does for plain workers:
            # before the worker is reaped, while its pid cannot belong to anyone else.
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT)
            _kill_session(pid)
            _, status = os.waitpid(pid, 0)
            conn.sendall(json.dumps({"status": status}).encode() + b"\n")
            return
        data = conn.recv(64)
        if not data:  # the client is gone (TorchElastic killed it): so goes its worker, with
            # every process of the worker's session (its own children: data loaders, ...)
            _kill_session(pid)
            os.waitpid(pid, 0)
            return
        for signum in data:
            os.kill(pid, signum)


def _kill_session(pid: int) -> None:
    """SIGKILL the worker and every process in its session (it called setsid, so its
    process group id is its pid)."""
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass


def _become_worker(request: dict, fds: list[int], supervisor: int) -> None:
    os.setsid()
    bootstrap.die_with_parent(expected_parent=supervisor)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    # What the client's process has and a fork of the server would not: the directory, the
    # environment, CPU affinity (``--numa-binding`` sets it on the client), umask, rlimits.
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.sched_setaffinity(0, request["affinity"])
    os.umask(request["umask"])
    for name, limits in request["rlimits"].items():
        try:
            resource.setrlimit(getattr(resource, name), tuple(limits))
        except (ValueError, OSError) as e:  # e.g. a hard limit above the server's, without root
            print(f"ftlaunch: pre-warmed worker keeps the server's {name} ({e})", file=sys.stderr, flush=True)
    for sig in FORWARDED + (signal.SIGCHLD,):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import random

    random.seed()  # a fresh interpreter draws new seeds from the OS; so do we
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    code = 1
    try:
        bootstrap.watch_optimizer_steps()
        code = bootstrap.run_as_main(request["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        bootstrap.exit_like_python(code)  # never returns


# -- the server's lifetime, from ftlaunch -------------------------------------------------------
@contextlib.contextmanager
def fork_server(run_dir: str, extra_modules: list[str], own: bool = False):
    """Start a fork server for this launch (its output in RUN_DIR/fork-server.log); yield the
    interpreter arguments that run a worker through it (the script and its arguments follow);
    on exit kill it and remove its socket's folder."""
    folder = tempfile.mkdtemp(prefix="ftl-")  # short: AF_UNIX paths <= 107 bytes
    socket_path = os.path.join(folder, "fork.sock")
    modules = ",".join([*WARM_MODULES, *extra_modules])
    own_flag = ["--own"] if own else []
    with open(os.path.join(run_dir, "fork-server.log"), "ab") as log_file:
        server = subprocess.Popen([sys.executable, "-u", "-m", "launcher.prewarm", "serve", "--modules", modules, *own_flag,
                                   "--socket", socket_path], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield ["-m", "launcher.prewarm", "run", "--socket", socket_path]
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


# -- client ---------------------------------------------------------------------------------
def client(socket_path: str, argv: list[str], connect_timeout: float = 10.0) -> int:
    bootstrap.die_with_agent()  # ftlaunch dies -> so do we
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            conn.connect(socket_path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                # The server binds its socket within moments of ftlaunch starting: it is gone
                # (killed?). Run as a plain interpreter instead: slower to start, same result.
                print(f"ftlaunch: no fork server at {socket_path}; starting a plain interpreter",
                      file=sys.stderr, flush=True)
                os.execv(sys.executable, [sys.executable, "-u", "-m", "launcher.bootstrap", *argv])
            time.sleep(0.02)
    env = dict(os.environ, **{WORKER_ID_ENV: str(os.getpid())})
    umask = os.umask(0)
    os.umask(umask)
    rlimits = {name: resource.getrlimit(getattr(resource, name)) for name in dir(resource) if name.startswith("RLIMIT_")}
    script = bootstrap.strip_interpreter_args(argv)  # the server's workers are unbuffered already (-u)
    request = {"argv": script, "env": env, "cwd": os.getcwd(), "affinity": sorted(os.sched_getaffinity(0)),
               "umask": umask, "rlimits": rlimits}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    for sig in FORWARDED:
        signal.signal(sig, lambda signum, _frame: conn.sendall(bytes([signum])))
    replies = conn.makefile("rb")
    for line in replies:
        reply = json.loads(line)
        if "status" in reply:
            status = reply["status"]
            if os.WIFSIGNALED(status):  # die the same way, so TorchElastic reports the signal
                sig = os.WTERMSIG(status)
                if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be caught anyway
                    signal.signal(sig, signal.SIG_DFL)
                os.kill(os.getpid(), sig)
            return os.waitstatus_to_exitcode(status)
    return 1  # the supervisor vanished without a status


def main(argv: list[str] | None = None) -> int:
    """``serve --socket PATH --modules a,b`` or ``run --socket PATH <python args...>`` (the
    python args, such as ``-u train.py --lr 1``, are passed through untouched)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 3 and argv[0] == "run" and argv[1] == "--socket":
        return client(argv[2], argv[3:])
    parser = argparse.ArgumentParser(prog="python -m launcher.prewarm serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--modules", default=",".join(WARM_MODULES))
    parser.add_argument("--own", action="store_true", help="also import OWN_MODULES, from the project's folder")
    args = parser.parse_args(argv)
    serve(args.socket, [m for m in args.modules.split(",") if m], args.own)
    return 0


if __name__ == "__main__":
    sys.exit(main())
