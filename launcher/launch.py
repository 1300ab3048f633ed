"""The agent ``ftlaunch`` runs: torch's own ``launch_agent`` (torch/distributed/launcher/api.py)
up to the point where it creates ``LocalElasticAgent``, with ``FaultTolerantAgent`` in its
place. Kept next to torch's: the same ``WorkerSpec`` and rendezvous handler from the same
``LaunchConfig`` fields."""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic import metrics
from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.rendezvous import RendezvousParameters, dynamic_rendezvous
from torch.distributed.elastic.rendezvous import registry as rdzv_registry
from torch.distributed.launcher.api import _get_addr_and_port

from . import contract
from .agent import FaultTolerantAgent
from .policy import Policy


def _method_name(depth: int = 2) -> str:
    """``dynamic_rendezvous.get_method_name`` without ``inspect.stack()``. Torch's builds the
    whole stack with source lines, twice, for every rendezvous event it records (the name is
    computed even when no event handler is set): 40-110 ms per rendezvous at the agent's
    stack depth against 1 ms with this, on a restart's critical path."""
    try:
        return sys._getframe(depth).f_code.co_name  # the same frame inspect.stack()[depth] names
    except ValueError:
        return "no_method_name"


def launch_agent(config, entrypoint, cmd_args, run_dir: str, policy: Policy, bootstrapped: bool) -> FaultTolerantAgent:
    """The WorkerSpec and agent that ``torch.distributed.launcher.api.launch_agent`` builds,
    with our agent class in place of LocalElasticAgent. Every ``LaunchConfig`` field goes
    where torch's own ``launch_agent`` puts it (``tests/test_launch_flags.py`` walks torchrun's parser
    to keep it so)."""
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = config.signals_to_handle
    if hasattr(dynamic_rendezvous, "get_method_name"):
        dynamic_rendezvous.get_method_name = _method_name
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
