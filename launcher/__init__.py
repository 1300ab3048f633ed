"""Launcher side of the project: the TorchElastic agent (``ftlaunch``) and the small worker
side that training scripts import (``launcher.worker``, ``launcher.faults``).

The worker side never imports the trainer, so any torchrun-compatible script can use it.
"""
