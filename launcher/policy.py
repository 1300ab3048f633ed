"""The agent's watchdog and restart policy: how long each phase may go without progress,
how long to back off before a restart, when to give up. ``ftlaunch``'s policy flags are
generated from ``Policy``'s fields (``launcher.cli``); ``FaultTolerantAgent`` applies them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from . import contract

REPORTER_STARTUP_TIMEOUT = 300.0


@dataclass
class Policy:
    """Watchdog and restart policy (seconds; 0 disables a timeout). ``ftlaunch``'s flags are
    generated from these fields (``--hang-timeout`` for ``hang_timeout``...), their help from
    the metadata."""

    hang_timeout: float = field(default=120.0, metadata={"help": (
        "seconds a training rank may go without a step before the group is restarted (0: off). A step is a "
        "Reporter.beat() or, for any other Python script, an optimizer.step() (torch's global optimizer hook, no "
        "code change); such a script that goes longer without a step (a long eval) needs a larger value. A rank "
        "the kernel shows stopped (SIGSTOP) for this long is hung in any phase, saving and loading included")})
    startup_timeout: float | None = field(default=None, metadata={"help": (
        "seconds a worker may take from the start of its script to its first heartbeat. Default: 300 s for scripts "
        "that report with launcher.worker.Reporter (they announce themselves at start), and no limit for any other "
        "script, which is watched from its first optimizer.step() on (0: off for all). Importing torch before the "
        "script starts is under --io-timeout")})
    io_timeout: float = field(default=600.0, metadata={"help": (
        "seconds a rank may spend launching (importing torch before its script starts), loading, saving, stopping "
        "or finishing (eval, final save, exit) before it counts as hung (0: off)")})
    crash_loop_limit: int = field(default=3, metadata={"help": (
        "stop after this many restarts in a row that made no progress: no newer committed checkpoint and no step "
        "past the one the failure before reached (as reported in heartbeats)")})
    restart_backoff: float = field(default=1.0, metadata={"help": (
        "first wait before a restart after one that made no progress; doubles each time, at most 60 s")})
    grace_period: float = field(default=30.0, metadata={"help": (
        "on SIGTERM/SIGINT: seconds the workers get to agree on a step, commit it and exit")})

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 0:
                raise ValueError(f"--{f.name.replace('_', '-')} must be >= 0, got {value}")

    def limit_for(self, phase: str, source: str | None = None) -> float:
        """Seconds without progress allowed in ``phase`` (written by ``source``); 0 = none.

        - launching: a bootstrapped worker whose interpreter, or the fork server, is still
          importing torch: the launcher's own start-up, I/O bound, so the I/O limit.
        - starting, not from a Reporter: bootstrap's mark (the script began), or a worker
          not run by launcher.bootstrap (``--no-python``, ``--run-path``) that never beat
          (asked with no source); and joining (in init_process_group, waiting for its
          peers): the startup limit, if set.
        - starting from a Reporter (the script announced itself): the startup limit, 300 s
          when not set.
        - training: the hang limit.
        """
        if phase == contract.JOINING or (phase == contract.STARTING and source != contract.REPORTER):
            return self.startup_timeout or 0.0
        if phase == contract.TRAINING:
            return self.hang_timeout
        if phase == contract.STARTING:
            return REPORTER_STARTUP_TIMEOUT if self.startup_timeout is None else self.startup_timeout
        return self.io_timeout  # launching, loading, saving, stopping, paused (for a restart), finishing

    def backoff_for(self, streak: int) -> float:
        """Wait before a restart; ``streak`` = failures in a row without progress."""
        return 0.0 if streak == 0 else min(60.0, self.restart_backoff * 2 ** (streak - 1))
