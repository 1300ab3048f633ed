"""Errors the checkpoint layer raises. Each message is one line that names what is wrong."""


class CheckpointError(RuntimeError):
    """A save, commit or load could not be done; nothing committed was harmed."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint on disk holds a different model/optimizer than the one being loaded."""
