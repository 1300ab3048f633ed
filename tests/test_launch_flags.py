"""Every torchrun flag reaches ftlaunch's agent, where torch's own launch_agent puts it.

The test walks torchrun's parser: a flag torch adds later that this table does not cover
fails the test, so no flag is ever accepted and silently ignored again."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
from torch.distributed.elastic.multiprocessing import Std
from torch.distributed.run import config_from_args, get_args_parser, run_script_path

from launcher import cli
from launcher.policy import Policy

SCRIPT = "train.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FREE_PORT = _free_port()


def rdzv(agent):
    return agent._worker_group.spec.rdzv_handler


# flag dest -> (extra argv before the script, the script, check(agent, config) -> bool)
CHECKS = {
    # Each value differs from what ftlaunch would choose without the flag.
    "nnodes": (["--nnodes", "1:2", "--rdzv-endpoint", f"localhost:{FREE_PORT}", "--rdzv-conf", "is_host=true"], SCRIPT,
               lambda a, c: (rdzv(a).settings.min_nodes, rdzv(a).settings.max_nodes) == (1, 2)),
    "nproc_per_node": (["--nproc-per-node", "3"], SCRIPT, lambda a, c: a._worker_group.spec.local_world_size == 3),
    "rdzv_backend": (["--rdzv-backend", "static", "--master-port", "29911"], SCRIPT,
                     lambda a, c: type(rdzv(a)).__name__ == "StaticTCPRendezvous"),
    "rdzv_endpoint": (["--rdzv-endpoint", f"localhost:{FREE_PORT}", "--rdzv-conf", "is_host=true"], SCRIPT,
                      lambda a, c: rdzv(a)._store.port == FREE_PORT),
    "rdzv_id": (["--rdzv-id", "job7"], SCRIPT, lambda a, c: rdzv(a).settings.run_id == "job7"),
    "rdzv_conf": (["--rdzv-conf", "join_timeout=77"], SCRIPT,
                  lambda a, c: rdzv(a).settings.timeout.join == timedelta(seconds=77)),
    "standalone": (["--standalone", "--rdzv-backend", "static", "--rdzv-endpoint", "10.9.9.9:5"], SCRIPT,
                   lambda a, c: c.rdzv_endpoint == "localhost:0" and type(rdzv(a)).__name__ == "DynamicRendezvousHandler"),
    "max_restarts": (["--max-restarts", "7"], SCRIPT, lambda a, c: a._worker_group.spec.max_restarts == 7),
    "monitor_interval": (["--monitor-interval", "0.7"], SCRIPT, lambda a, c: a._worker_group.spec.monitor_interval == 0.7),
    "start_method": (["--start-method", "fork"], SCRIPT, lambda a, c: a._start_method == "fork"),
    "event_log_handler": (["--event-log-handler", "console"], SCRIPT,
                          lambda a, c: a._worker_group.spec.event_log_handler == a.event_log_handler == "console"),
    "role": (["--role", "trainer"], SCRIPT, lambda a, c: a._worker_group.spec.role == "trainer"),
    "module": (["-m"], "pkg.mod", lambda a, c: list(a._worker_group.spec.args[:3]) == ["-u", "-m", "pkg.mod"]),
    "no_python": (["--no-python"], "/bin/echo", lambda a, c: a._worker_group.spec.entrypoint == "/bin/echo"),
    "run_path": (["--run-path"], SCRIPT, lambda a, c: a._worker_group.spec.entrypoint is run_script_path),
    "log_dir": (["--log-dir", "LOGS"], SCRIPT, lambda a, c: "LOGS" in a._logs_specs.root_log_dir),
    "redirects": (["--redirects", "3"], SCRIPT, lambda a, c: a._logs_specs._redirects == Std.ALL),
    "tee": (["--tee", "2"], SCRIPT, lambda a, c: a._logs_specs._tee == Std.ERR),
    "log_line_prefix_template": (["--log-line-prefix-template", "[x${rank}]"], SCRIPT,
                                 lambda a, c: a._log_line_prefix_template == "[x${rank}]"),
    "local_ranks_filter": (["--local-ranks-filter", "0"], SCRIPT, lambda a, c: a._logs_specs._local_ranks_filter == {0}),
    "duplicate_stdout_filters": (["--duplicate-stdout-filters", "apple,pear"], SCRIPT,
                                 lambda a, c: a._worker_group.spec.duplicate_stdout_filters == ["apple", "pear"]),
    "duplicate_stderr_filters": (["--duplicate-stderr-filters", "plum"], SCRIPT,
                                 lambda a, c: a._worker_group.spec.duplicate_stderr_filters == ["plum"]),
    # node_rank, master_addr and master_port only mean something to the static rendezvous.
    "node_rank": (["--rdzv-backend", "static", "--nnodes", "2", "--node-rank", "1", "--master-port", "29911"], SCRIPT,
                  lambda a, c: rdzv(a).rank == 1),
    "master_addr": (["--rdzv-backend", "static", "--master-addr", "127.0.0.2", "--master-port", "29911"], SCRIPT,
                    lambda a, c: c.rdzv_endpoint.startswith("127.0.0.2:")),
    "master_port": (["--rdzv-backend", "static", "--master-port", "29911"], SCRIPT,
                    lambda a, c: c.rdzv_endpoint.endswith(":29911")),
    "local_addr": (["--local-addr", "127.0.0.1"], SCRIPT, lambda a, c: a._worker_group.spec.local_addr == "127.0.0.1"),
    "logs_specs": (["--logs-specs", "default"], SCRIPT, lambda a, c: type(a._logs_specs).__name__ == "DefaultLogsSpecs"),
    "numa_binding": (["--numa-binding", "node"], SCRIPT,
                     lambda a, c: a._worker_group.spec.numa_options.affinity_mode.value == "node"),
    # SIGTERM and SIGINT are ftlaunch's own (graceful stop); TorchElastic gets the rest.
    "signals_to_handle": (["--signals-to-handle", "SIGTERM,SIGUSR1"], SCRIPT,
                          lambda a, c: os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGUSR1"),
    "shutdown_timeout": (["--shutdown-timeout", "13"], SCRIPT, lambda a, c: a._shutdown_timeout == 13),
    "virtual_local_rank": (["--virtual-local-rank"], SCRIPT, lambda a, c: a._worker_group.spec.virtual_local_rank),
}
# Flags that act while parsing and never reach an agent.
PARSE_ONLY = {"help", "print_completion", "training_script", "training_script_args"}


def test_every_torchrun_flag_is_covered():
    dests = {action.dest for action in get_args_parser()._actions}
    assert dests - PARSE_ONLY - set(CHECKS) == set(), "torchrun flags ftlaunch does not pass through"


@pytest.mark.parametrize("dest", sorted(CHECKS))
def test_torchrun_flag_reaches_the_agent(dest, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_SIGNALS_TO_HANDLE", "")
    flags, script, check = CHECKS[dest]
    args = cli.parse_args([*flags, script, "--lr", "1"])
    config, entrypoint, cmd_args = config_from_args(args)
    agent = cli.launch_agent(config, entrypoint, cmd_args, str(tmp_path), Policy(), bootstrapped=True)
    try:
        assert check(agent, config), f"--{dest.replace('_', '-')} did not reach the agent"
    finally:
        agent._worker_group.spec.rdzv_handler.shutdown()


def test_policy_flags_come_from_the_dataclass():
    """Each Policy field is a flag with the field's default, and the flags build the Policy."""
    from dataclasses import fields

    assert cli.parse_args([SCRIPT]).policy == Policy()
    args = cli.parse_args([*(f"--{f.name.replace('_', '-')}={i + 2}" for i, f in enumerate(fields(Policy))), SCRIPT])
    assert [getattr(args.policy, f.name) for f in fields(Policy)] == [i + 2 for i in range(len(fields(Policy)))]
