"""ftlaunch and the worker side it watches, by the process each module runs in.

Agent side: the ``ftlaunch`` process (and ``ftlaunch rendezvous`` / ``ftlaunch cluster``)
    cli         the command line: torchrun's parser plus the policy flags; runs the agent
    launch      builds the WorkerSpec and the agent from torchrun's LaunchConfig
    agent       FaultTolerantAgent: heartbeat watchdog, restarts, backoff, preemption
    persist     after the last failure: commit the memory tier's newest snapshot, free /dev/shm
    policy      Policy: per-phase limits, backoff, crash-loop limit (the flags' source)
    summary     the run summary, from events.jsonl
    metrics     ``--metrics-port``: a Prometheus endpoint computed from events.jsonl and the beats
    report      ``ftlaunch report``: a timeline picture and the summary of a run, from events.jsonl
    prewarm     server side: ``fork_server`` (in ftlaunch) and the fork server it starts
    rendezvous  ``ftlaunch rendezvous``: a c10d store that outlives every node
    cluster     ``ftlaunch cluster``: a multi-node cluster on loopback

Worker side: imported by training scripts, or run inside the worker process
    worker      process-group init, Reporter (heartbeats), StopRequest (agreed stop)
    bootstrap   runs the script: optimizer-step heartbeats, phase marks, parent-death signal
    faults      fault injection (``--inject``; ftlaunch's cli only parses the specs)
    prewarm     client side: the entrypoint TorchElastic starts, and the forked worker

Shared by both sides
    contract    the worker <-> agent contract: environment, run directory, Beat, phases, events
    proctree    process trees and states (agent's watchdog, cluster; faults' node kill)

Rule: worker-side modules import only worker-side and shared modules, never agent-side
ones, so a training process never loads the agent. Nothing here imports the trainer, so
any torchrun-compatible script can run under ftlaunch.
"""
