"""The few collectives the checkpoint layer needs, usable with or without a process group.

Without an initialized process group every helper acts as a world of one, so the same
CheckpointManager code serves ``python train.py`` and ``torchrun ... train.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def control_group() -> Any:
    """A gloo group for small Python-object collectives.

    Object collectives on NCCL need a CUDA device per rank and a host->device copy of every
    pickle; a gloo group avoids both. With gloo already the default, reuse the default group.
    """
    if not initialized() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def private_group() -> Any:
    """A new gloo group for one user's collectives alone: a background thread's collectives
    on it never interleave with the caller's on the default group. None without a group.
    Every rank must call this at the same point (creating a group is itself a collective)."""
    if not initialized():
        return None
    return dist.new_group(backend="gloo")


def broadcast(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def gather_or_raise(value: Any, error: str | None, group: Any = None) -> list[Any]:
    """Every rank's ``value``; or, when any rank reported an error, the same
    ``CheckpointError`` on every rank (a rank failing alone would leave the others waiting
    in the next collective)."""
    from .errors import CheckpointError

    gathered = all_gather((value, error), group)
    errors = [e for _, e in gathered if e]
    if errors:
        raise CheckpointError(errors[0])
    return [v for v, _ in gathered]


def on_rank0(rank: int, fn: Callable[[], Any], what: str, group: Any = None) -> Any:
    """Run ``fn`` on rank 0 alone; every rank returns its result or raises the same
    ``CheckpointError`` (of the same subclass: a lost lease stays a ``LeaseHeldError``), so
    no rank is left waiting in a collective."""
    from .errors import CheckpointError, one_line

    result, error, kind = None, None, CheckpointError
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # any backend's error type: fsspec, S3, OSError...
            detail = str(e) if isinstance(e, CheckpointError) else one_line(e)
            error = f"{what}: {detail}" if what else detail
            kind = type(e) if isinstance(e, CheckpointError) else CheckpointError
    result, error, kind = broadcast((result, error, kind), group)
    if error:
        raise kind(error)
    return result
