"""``ftlaunch``: torchrun's command line and TorchElastic's agent, with defaults that recover.

    ftlaunch --nproc-per-node=2 train.py --ckpt-dir runs/demo

Every torchrun flag keeps its meaning (the parser is torchrun's own). What differs:

- c10d rendezvous, and a private one on a free local port when the job fits on one node
  (torchrun's ``--standalone``); restarts enabled (``--max-restarts 10``).
- Each generation of workers gets a fresh store (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``):
  with the agent's store shared, torch 2.14 lets a restarted group read the keys of the
  group that died (see README), which makes restarts fail or hang.
- The agent is ``FaultTolerantAgent``: hang detection, backoff, crash-loop limit,
  preemption with a grace period, an events file and a summary (``--run-dir``).
- Python workers are forked from a server that imported torch already (``launcher.prewarm``),
  so a restart does not pay for ``import torch`` again (``--no-prewarm`` turns it off).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import registry as rdzv_registry
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.elastic import metrics
from torch.distributed.elastic.agent.server.api import WorkerSpec, WorkerState
from torch.distributed.launcher.api import _get_addr_and_port
from torch.distributed.run import config_from_args, get_args_parser, parse_min_max_nnodes

from . import contract, prewarm
from .agent import FaultTolerantAgent, Policy
from .faults import INJECT_ENV, parse_fault
from .summary import format_summary, summarize

log = logging.getLogger("ftlaunch")


def build_parser():
    parser = get_args_parser()
    parser.prog = "ftlaunch"
    parser.description = ("Fault-tolerant torchrun: TorchElastic's agent with hang detection, restarts that "
                          "recover, crash-loop limits and graceful preemption. Every torchrun flag works.")
    parser.set_defaults(rdzv_backend="c10d", max_restarts=10)

    def error(message):  # one line, no usage dump
        parser.exit(2, f"ftlaunch: error: {message} (see --help)\n")

    parser.error = error
    ours = parser.add_argument_group("ftlaunch")
    ours.add_argument("--run-dir", default="", help="run directory: events.jsonl, heartbeats, per-attempt logs "
                      "(default: runs/ftlaunch/<time>-<pid>)")
    ours.add_argument("--hang-timeout", type=float, default=120.0,
                      help="seconds a training rank may go without a step before the group is restarted (0: off). "
                           "A step is a Reporter.beat() or, for any other Python script, an optimizer.step() "
                           "(torch's global optimizer hook, no code change); such a script that goes longer "
                           "without a step (a long eval) needs a larger value")
    ours.add_argument("--startup-timeout", type=float, default=None,
                      help="seconds a worker may take to its first heartbeat. Default: 300 s for scripts that "
                           "report with launcher.worker.Reporter (they announce themselves at start), and no "
                           "limit for any other script, which is watched from its first optimizer.step() on "
                           "(0: off for all). Counted from the moment the script begins; importing torch before "
                           "that is under --io-timeout")
    ours.add_argument("--io-timeout", type=float, default=600.0,
                      help="seconds a rank may spend launching (importing torch before its script starts), loading, saving, stopping or finishing (eval, final save, exit) before it counts as hung (0: off)")
    ours.add_argument("--crash-loop-limit", type=int, default=3,
                      help="stop after this many restarts in a row that did not advance the committed checkpoint "
                           "(as reported in heartbeats; a script without launcher.worker.Reporter never advances)")
    ours.add_argument("--restart-backoff", type=float, default=1.0,
                      help="first wait before a restart after one that made no progress; doubles each time, at most 60 s")
    ours.add_argument("--grace-period", type=float, default=30.0,
                      help="on SIGTERM/SIGINT: seconds the workers get to agree on a step, commit it and exit")
    ours.add_argument("--no-prewarm", action="store_true",
                      help="start every worker as a fresh interpreter instead of forking it from a server that "
                           "has imported torch already (restarts then pay for `import torch` again)")
    ours.add_argument("--prewarm-import", action="append", default=[], metavar="MODULE",
                      help="also import MODULE in the fork server (repeatable), e.g. transformers")
    ours.add_argument("--inject", action="append", default=[], metavar="SPEC",
                      help="fault for the workers, repeatable: "
                           "kill|kill-before-commit|kill-node-before-commit|kill-load|hang|raise:rank=R:step=N, "
                           "fail-at-start:rank=LOCAL_RANK:step=0 (a broken device on this node, every generation)")
    return parser


# Several nodes on c10d: every agent is a client of a store that no node hosts (`ftlaunch
# rendezvous`), so losing any node, the first one included, does not stop the job; a dead
# node is declared dead after 3 missed 1-s keep-alives (stock: 3 x 5 s), and a round closes
# 2 s after enough nodes joined (stock: 30 s), so survivors go on within seconds.
MULTI_NODE_RDZV_DEFAULTS = {"is_host": "false", "keep_alive_interval": "1", "keep_alive_max_attempt": "3",
                            "last_call_timeout": "2"}


def with_defaults(rdzv_conf: str, defaults: dict[str, str]) -> str:
    """``--rdzv-conf`` with ``defaults`` added for the keys the user did not set."""
    given = {item.split("=", 1)[0].strip() for item in rdzv_conf.split(",") if "=" in item}
    return ",".join(filter(None, [rdzv_conf, *(f"{k}={v}" for k, v in defaults.items() if k not in given)]))


def parse_args(argv: list[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("hang_timeout", "startup_timeout", "io_timeout", "restart_backoff", "grace_period"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.crash_loop_limit < 0 or args.max_restarts < 0:
        parser.error("--crash-loop-limit and --max-restarts must be >= 0")
    for spec in args.inject:
        try:
            parse_fault(spec)
        except ValueError as e:
            parser.error(f"--inject: {e}")
    try:
        _, max_nodes = parse_min_max_nnodes(args.nnodes)
    except (ValueError, RuntimeError):
        parser.error(f"--nnodes {args.nnodes!r} must be N or MIN:MAX")
    if args.standalone or (max_nodes == 1 and not args.rdzv_endpoint and args.rdzv_backend != "static"):
        # A private rendezvous on a free port (the job's TORCHELASTIC_RUN_ID keeps a given --rdzv-id).
        args.rdzv_backend, args.rdzv_endpoint = "c10d", "localhost:0"
        args.rdzv_id = str(uuid.uuid4()) if args.rdzv_id == "none" else args.rdzv_id
    elif not args.rdzv_endpoint and args.rdzv_backend != "static":
        parser.error(f"--nnodes {args.nnodes} spans several nodes: give --rdzv-endpoint HOST:PORT (and --rdzv-id)")
    elif args.rdzv_backend == "c10d":
        args.rdzv_conf = with_defaults(args.rdzv_conf, MULTI_NODE_RDZV_DEFAULTS)
    if args.rdzv_backend == "static":
        log.warning("static rendezvous cannot replace a failed node or re-form after a restart; prefer c10d")
    unknown = [s for s in args.signals_to_handle.split(",") if s.strip() and not hasattr(signal, s.strip())]
    if unknown:
        parser.error(f"--signals-to-handle: unknown signal {unknown[0].strip()!r} (names like SIGHUP,SIGUSR1)")
    # SIGTERM/SIGINT are ours (graceful stop); TorchElastic keeps the others it was given.
    args.signals_to_handle = ",".join(s.strip() for s in args.signals_to_handle.split(",")
                                      if s.strip() not in ("SIGTERM", "SIGINT", ""))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rendezvous"]:
        from . import rendezvous

        return rendezvous.main(argv[1:])
    if argv[:1] == ["cluster"]:
        from . import cluster

        return cluster.main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="[ftlaunch] %(message)s")
    args = parse_args(argv)
    run_dir = os.path.abspath(args.run_dir or os.path.join("runs", "ftlaunch", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
    os.makedirs(run_dir, exist_ok=True)
    os.environ[contract.RUN_DIR_ENV] = run_dir
    if args.inject:
        os.environ[INJECT_ENV] = ",".join(args.inject)
    os.environ[contract.AGENT_PID_ENV] = str(os.getpid())
    nproc = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")  # a fresh store per generation
    if args.log_dir is None:
        args.log_dir = os.path.join(run_dir, "logs")
        if args.tee == "0" and args.redirects == "0":
            args.tee = "3"  # per-attempt, per-rank files and the console

    try:
        config, entrypoint, cmd_args = config_from_args(args)
        parse_rendezvous_endpoint(config.rdzv_endpoint, default_port=29400)
    except ValueError as e:  # torchrun's own checks (endpoint, nproc, ...) raise ValueError
        print(f"ftlaunch: error: {e} (see --help)", file=sys.stderr)
        return 2
    fork_server = None
    if entrypoint == sys.executable and not args.no_prewarm:
        fork_server, cmd_args = start_fork_server(run_dir, args.prewarm_import, cmd_args)
    elif entrypoint == sys.executable:  # plain interpreters, through the same bootstrap
        cmd_args = ["-u", "-m", "launcher.bootstrap", *cmd_args]
    policy = Policy(hang_timeout=args.hang_timeout, startup_timeout=args.startup_timeout, io_timeout=args.io_timeout,
                    crash_loop_limit=args.crash_loop_limit, backoff=args.restart_backoff,
                    grace_period=args.grace_period)
    agent = launch_agent(config, entrypoint, cmd_args, run_dir, policy, bootstrapped=entrypoint == sys.executable)
    try:
        return run(agent, run_dir)
    finally:
        if fork_server is not None:
            fork_server.kill()
            fork_server.wait()
            shutil.rmtree(os.path.dirname(fork_server.args[-1]), ignore_errors=True)


def start_fork_server(run_dir: str, extra_modules: list[str], cmd_args: list[str]):
    """Start the pre-warm fork server; returns it and the worker command that goes through it."""
    socket_path = os.path.join(tempfile.mkdtemp(prefix="ftl-"), "fork.sock")  # short: AF_UNIX paths <= 107 bytes
    modules = ",".join([*prewarm.WARM_MODULES, *extra_modules])
    log_file = open(os.path.join(run_dir, "fork-server.log"), "ab")
    server = subprocess.Popen([sys.executable, "-u", "-m", "launcher.prewarm", "serve", "--modules", modules,
                               "--socket", socket_path], stdout=log_file, stderr=subprocess.STDOUT)
    return server, ["-m", "launcher.prewarm", "run", "--socket", socket_path, *cmd_args]


def launch_agent(config, entrypoint, cmd_args, run_dir: str, policy: Policy, bootstrapped: bool) -> FaultTolerantAgent:
    """The WorkerSpec and agent that ``torch.distributed.launcher.api.launch_agent`` builds,
    with our agent class in place of LocalElasticAgent. Every ``LaunchConfig`` field goes
    where torch's own ``launch_agent`` puts it (``tests/test_launch_flags.py`` walks torchrun's parser
    to keep it so)."""
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle
    params = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint,
                                  run_id=config.run_id, min_nodes=config.min_nodes, max_nodes=config.max_nodes,
                                  local_addr=config.local_addr, **config.rdzv_configs)
    master_addr, master_port = _get_addr_and_port(params)
    spec = WorkerSpec(role=config.role, local_world_size=config.nproc_per_node, entrypoint=entrypoint,
                      args=tuple(cmd_args), rdzv_handler=rdzv_registry.get_rendezvous_handler(params),
                      max_restarts=config.max_restarts, monitor_interval=config.monitor_interval,
                      master_addr=master_addr, master_port=master_port, local_addr=config.local_addr,
                      event_log_handler=config.event_log_handler, numa_options=config.numa_options,
                      duplicate_stdout_filters=config.duplicate_stdout_filters,
                      duplicate_stderr_filters=config.duplicate_stderr_filters,
                      virtual_local_rank=config.virtual_local_rank)
    contract.append_event(run_dir, "launch", agent=True, attempt=0, entrypoint=" ".join([str(entrypoint), *cmd_args]),
                          nproc_per_node=config.nproc_per_node, nnodes=f"{config.min_nodes}:{config.max_nodes}",
                          max_restarts=config.max_restarts, rdzv_backend=config.rdzv_backend)
    metrics.initialize_metrics(metrics.MetricsConfig(config.metrics_cfg))
    return FaultTolerantAgent(spec, config.logs_specs, run_dir=run_dir, policy=policy, bootstrapped=bootstrapped,
                              start_method=config.start_method,
                              log_line_prefix_template=config.log_line_prefix_template,
                              shutdown_timeout=config.shutdown_timeout,
                              event_log_handler=config.event_log_handler)


def run(agent: FaultTolerantAgent, run_dir: str) -> int:
    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if agent.stop_requested_at is None:
            agent.request_stop(f"received {name}")
        elif signum == signal.SIGINT:  # Ctrl-C twice: stop waiting for the workers
            raise SignalException(f"second {name}: stopping now", sigval=signal.Signals(signum))
        else:  # schedulers may repeat SIGTERM; the grace period already bounds the stop
            log.info("%s again; still stopping (grace period %g s)", name, agent.policy.grace_period)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    exit_code, result = 1, "failed"
    shutdown_rdzv = True
    try:
        outcome = agent.run()
        agent.record_event(succeeded=True)  # the agent ran; whether the workers did is below
        # Only SUCCEEDED is success: TorchElastic's is_failed() does not count an UNHEALTHY
        # group (our hang detector's verdict) that ran out of restarts.
        if outcome.state == WorkerState.SUCCEEDED:
            exit_code, result = 0, "succeeded"
        else:
            result = f"failed: {agent.stop_reason or agent.exhausted_reason()}"
            shutdown_rdzv = not agent.leaving  # the other nodes go on: keep the rendezvous open
    except SignalException as e:
        # As torch's launch_agent: do not shut the rendezvous down, so that the other nodes
        # can go on (a shut-down rendezvous is closed for good under this run id).
        shutdown_rdzv = False
        agent.record_event(succeeded=False)
        exit_code, result = 128 + e.sigval, f"failed: killed by {e.sigval.name}"
    except Exception:
        agent.record_event(succeeded=False)
        raise
    finally:
        if shutdown_rdzv:
            agent._worker_group.spec.rdzv_handler.shutdown()
    summary = summarize(contract.read_events(run_dir))
    if exit_code == 0 and summary["ended_by"] == "preempted":
        result = f"stopped on request at step {summary['end_step']}, committed; relaunch to resume"
    contract.append_event(run_dir, "result", agent=True, attempt=agent.attempt, exit_code=exit_code,
                          result=result, summary={k: v for k, v in summary.items() if k != "failures"})
    print(format_summary(summary, result, run_dir), flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
