"""A copy of the training state that a background thread can write while training goes on.

The blocking part of an async save is ``Stager.stage``: one memcpy of every tensor into
host buffers that were allocated at the first save and are reused by every later one (page
-locked on CUDA so the device->host copy runs at full PCIe speed; plain memory on CPU).
Allocating per save would make every save pay page faults on fresh memory and let the
allocator's high-water mark grow; reusing keeps the extra host memory at one copy of the
state.

Under DDP every rank holds the same model and optimizer, but DCP writes each replicated
tensor on one rank only. Once a save has shown which tensors this rank writes, later saves
stage only those (``skip``) plus any tensor not seen before: the stall and the staging memory
shrink to this rank's share (half with 2 ranks, an eighth with 8).

Non-tensor leaves (step counters, RNG states, numpy arrays) are small and deep-copied.
DCP's own ``_copy_state_dict`` is not used because it refuses tuples and numpy arrays (a
user's state may hold them; numpy's RNG state, when its bit generator is not the legacy one).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch


class Stager:
    """Reusable staging buffers, one per tensor path in the state dict."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._used: set[tuple] = set()
        self._device_copies = False
        self._skip = None
        self.tensor_fqns: set[str] = set()  # every tensor of the last staged state, skipped or not

    @property
    def nbytes(self) -> int:
        """Host bytes held by the staging buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    @torch.no_grad()
    def stage(self, state: Any, skip: Callable[[str], bool] | None = None) -> Any:
        """A copy of ``state`` (nested dicts/lists) whose tensors live in the reused buffers,
        leaving out the tensors whose DCP key (``"model.fc.weight"``) ``skip`` names.
        Returns once every tensor is copied, so the live state may change right after."""
        self._used = set()
        self._device_copies = False
        self._skip = skip
        self.tensor_fqns = set()
        staged = self._copy(state, ())
        for path in set(self._buffers) - self._used:  # the state lost a tensor: free its buffer
            del self._buffers[path]
        if self._device_copies:
            torch.cuda.synchronize()  # the non-blocking device->host copies must have landed
        return staged

    def _copy(self, obj: Any, path: tuple) -> Any:
        if isinstance(obj, torch.Tensor):
            if type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter):
                raise TypeError(f"async checkpointing stages plain tensors; {'.'.join(map(str, path))} "
                                f"is a {type(obj).__name__}: use async_mode='off'")
            return self._copy_tensor(obj, path)
        if isinstance(obj, dict):
            out = {}
            for key, value in obj.items():
                if isinstance(value, torch.Tensor) and self._skipped(path + (key,)):
                    continue  # another rank writes it
                out[key] = self._copy(value, path + (key,))
            return out
        if isinstance(obj, list):
            return [self._copy(value, path + (i,)) for i, value in enumerate(obj)]
        return copy.deepcopy(obj)

    def _skipped(self, path: tuple) -> bool:
        fqn = ".".join(map(str, path))  # how DCP names a nested key
        self.tensor_fqns.add(fqn)
        return self._skip is not None and self._skip(fqn)

    def _copy_tensor(self, tensor: torch.Tensor, path: tuple) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pin = tensor.is_cuda
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            self._buffers[path] = buffer
        self._used.add(path)
        if tensor.is_cuda:
            self._device_copies = True
            buffer.copy_(tensor.detach(), non_blocking=True)
        else:
            buffer.copy_(tensor.detach())
        return buffer
