"""Errors the checkpoint layer raises. Each message is one line that names what is wrong."""

from torch.distributed.checkpoint.api import CheckpointException


class CheckpointError(RuntimeError):
    """A save, commit or load could not be done; nothing committed was harmed."""


class SaveFailuresExceeded(CheckpointError):
    """More scheduled saves failed in a row than ``save_failures_allowed``."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint on disk holds a different model/optimizer than the one being loaded."""


def one_line(e: BaseException) -> str:
    """One line for an exception. DCP's CheckpointException (a BaseException) carries each
    failed rank's own exception; the first one is the useful part."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _trace) = next(iter(sorted(e.failures.items(), key=lambda kv: kv[0])))
        return f"rank {rank}: {one_line(inner)}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
