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

import contextlib
import errno
import logging
import os
import signal
import sys
import time
import uuid
from dataclasses import fields

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.elastic.agent.server.api import WorkerState
from torch.distributed.run import config_from_args, get_args_parser, parse_min_max_nnodes

from . import contract, faults, prewarm
from .agent import FaultTolerantAgent
from .policy import Policy
from .launch import launch_agent
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
    for f in fields(Policy):  # --hang-timeout ... --grace-period, defaults and help from the dataclass
        ours.add_argument(f"--{f.name.replace('_', '-')}", type=int if f.type in (int, "int") else float, default=f.default,
                          help=f.metadata["help"])
    ours.add_argument("--no-prewarm", action="store_true",
                      help="start every worker as a fresh interpreter instead of forking it from a server that "
                           "has imported torch already (restarts then pay for `import torch` again)")
    ours.add_argument("--prewarm-import", action="append", default=[], metavar="MODULE",
                      help="also import MODULE in the fork server (repeatable), e.g. transformers")
    ours.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                      help="serve Prometheus metrics of the run (restarts, failures by kind, hangs, last committed "
                           "step, steps/s, save stall and durable seconds, recovery seconds, steps redone) at "
                           "http://ADDR:PORT/metrics; 0: a free port (logged, and in events.jsonl as a metrics event)")
    ours.add_argument("--metrics-addr", default="127.0.0.1",
                      help="address the metrics endpoint binds to (0.0.0.0 for every interface)")
    ours.add_argument("--inject", action="append", default=[], metavar="SPEC",
                      help="fault for the workers, repeatable: "
                           f"{'|'.join(k for k in faults.KINDS if k != 'fail-at-start')}:rank=R:step=N, "
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
    try:
        args.policy = Policy(**{f.name: getattr(args, f.name) for f in fields(Policy)})
    except ValueError as e:
        parser.error(str(e))
    if args.max_restarts < 0:
        parser.error(f"--max-restarts must be >= 0, got {args.max_restarts}")
    try:
        args.nproc_count = int(args.nproc_per_node)
    except ValueError:  # auto, cpu, gpu, xpu, a privateuse1 backend's name: torchrun resolves it or says why not
        args.nproc_count = None
    if args.nproc_count is not None and args.nproc_count < 1:  # torchrun would divide by it
        parser.error(f"--nproc-per-node must be >= 1, got {args.nproc_per_node!r}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error(f"--metrics-port must be a port number (0-65535; 0: a free one), got {args.metrics_port}")
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
    if argv[:1] == ["report"]:
        from . import report

        return report.main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="[ftlaunch] %(message)s")
    args = parse_args(argv)
    run_dir = os.path.abspath(args.run_dir or os.path.join("runs", "ftlaunch", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
    try:
        os.makedirs(run_dir, exist_ok=True)
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as e:
        print(f"ftlaunch: error: --run-dir {run_dir}: {e.strerror or e}; give a directory ftlaunch can create and "
              "write (events, heartbeats, logs)", file=sys.stderr)
        return 2
    os.environ[contract.RUN_DIR_ENV] = run_dir
    if args.inject:
        os.environ[INJECT_ENV] = ",".join(args.inject)
    os.environ[contract.AGENT_PID_ENV] = str(os.getpid())
    nproc = args.nproc_count or 1
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
    with contextlib.ExitStack() as stack:
        if entrypoint == sys.executable and not args.no_prewarm:
            server = prewarm.fork_server(run_dir, args.prewarm_import, own=prewarm.is_own_script(args.training_script))
            cmd_args = [*stack.enter_context(server), *cmd_args]
        elif entrypoint == sys.executable:  # plain interpreters, through the same bootstrap
            cmd_args = ["-u", "-m", "launcher.bootstrap", *cmd_args]
        agent = launch_agent(config, entrypoint, cmd_args, run_dir, args.policy,
                             bootstrapped=entrypoint == sys.executable)
        if args.metrics_port is not None:
            from . import metrics

            try:
                metrics.serve(run_dir, args.metrics_port, args.metrics_addr, agent)
            except OSError as e:  # the port is taken, the address is not this host's
                print(f"ftlaunch: error: --metrics-port {args.metrics_port} on {args.metrics_addr}: {e.strerror or e}",
                      file=sys.stderr)
                return 2
        return run(agent, run_dir)


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
            if shutdown_rdzv and agent.stop_requested_at is None:  # a stopping node has no time for it
                try:
                    agent.persist_memory()  # at most the steps since the newest memory snapshot are lost
                except SignalException:
                    raise
                except Exception as e:  # the summary must still be printed
                    log.error("could not persist the memory tier: %s: %s", type(e).__name__, e)
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
