"""Launcher side of the project. For now the worker side that training scripts import:
``launcher.worker`` (joining the process group safely across restarts) and
``launcher.faults`` (fault injection). The TorchElastic agent CLI (``ftlaunch``) comes with
its own issue. Never imports the trainer, so any torchrun-compatible script can use it.
"""
