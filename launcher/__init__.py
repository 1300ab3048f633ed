"""Launcher side of the project: ``ftlaunch`` (``cli``) and its TorchElastic agent (``agent``),
the worker <-> agent contract (``contract``), the worker side that training scripts import
(``worker``: process-group init, heartbeats, stop agreement), fault injection (``faults``),
pre-warmed workers (``prewarm``) and the run summary (``summary``).

Never imports the trainer, so any torchrun-compatible script can run under ftlaunch.
"""
