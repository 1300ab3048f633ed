"""How a memory snapshot lays out one rank's state (``memory.py`` writes and reads the slots):
the tensors copied raw, one after another at aligned offsets, and everything else (step
counters, RNG states, the data cursor) pickled as a skeleton in which each tensor is a marker
holding its index. The skeleton is read back allowing only the globals a disk checkpoint's
non-tensor items may hold: loading never runs code."""

from __future__ import annotations

import json
import pickle
from typing import Any

import torch

from .safe_load import UnsafeCheckpointError

_ALIGN = 64
_TENSOR = "__ftckpt_shm_tensor__"  # marks where a tensor was in the pickled skeleton


class Unpickler(pickle.Unpickler):
    """Plain pickle (a tenth of torch.save's time for small items), read back allowing only
    the globals a disk checkpoint's non-tensor items may hold."""

    def __init__(self, stream, allowed):
        super().__init__(stream)
        self.allowed = {(getattr(obj, "__module__", ""), getattr(obj, "__qualname__", "")): obj for obj in allowed}

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name)) or self.allowed.get((module.replace("numpy.core", "numpy._core"), name))
        if found is None:
            raise UnsafeCheckpointError(f"refers to {module}.{name}, which loading does not allow (forged or from an "
                                        "unknown writer; a type of your own: CheckpointManager(safe_globals=[...]))")
        return found


_PLAIN = {int, float, bool, str, bytes, type(None)}


def split(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """The state with every tensor replaced by a marker holding its index in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return (_TENSOR, len(tensors) - 1)
    if isinstance(obj, dict):
        return {k: split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if all(map(_PLAIN.__contains__, map(type, obj))):  # a long list of plain values (625 ints), at C speed
            return obj
        return type(obj)(split(v, tensors) for v in obj)
    return obj


def join(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == _TENSOR:
        return tensors[obj[1]]
    if isinstance(obj, dict):
        return {k: join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join(v, tensors) for v in obj]
    if isinstance(obj, tuple):
        return tuple(join(v, tensors) for v in obj)
    return obj


def layout_of(tensors: list[torch.Tensor]) -> tuple[list, str, int]:
    """Where each tensor goes in a slot: [dtype, shape, offset, bytes, device] each, that as
    JSON, and where the pickled rest starts."""
    layout, offset = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        layout.append([str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes, str(t.device)])
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return layout, json.dumps(layout), offset


def tensor_indices(obj: Any) -> list[int]:
    """The indices of the tensors a skeleton (or a part of it) holds."""
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == _TENSOR:
        return [obj[1]]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return [i for v in values for i in tensor_indices(v)]
