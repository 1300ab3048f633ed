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

The copy of a large CPU tensor uses streaming stores (``copy_into``, ``_streamcopy.c``): the
buffers are not read again until the writer thread, so a copy that reads each destination
line first and keeps it in the caches (torch's) does a third more memory traffic for nothing.
Measured at 1611 MB per rank on the bench's 2-core machine: 0.65-1.0x torch's copy time,
median 0.75x. Torch's copy does it without the compiled module (no C compiler at install, not
x86-64), and where torch has several threads (OMP_NUM_THREADS > 1: it splits a large copy
over them).

Non-tensor leaves (step counters, RNG states, numpy arrays) are small and deep-copied.
DCP's own ``_copy_state_dict`` is not used because it refuses tuples and numpy arrays (a
user's state may hold them; numpy's RNG state, when its bit generator is not the legacy one).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable

import torch

try:
    from . import _streamcopy
except ImportError:  # not built: no C compiler at install
    _streamcopy = None

log = logging.getLogger(__name__)

# Whether large CPU copies use streaming stores (False: torch's copy does them).
STREAMING = bool(_streamcopy is not None and _streamcopy.STREAMS)
# Below this a copy stays in the caches anyway, and one Python call per tensor costs more
# than streaming saves.
STREAM_MIN_BYTES = 1 << 20
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_told = False


def _streamable(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether streaming stores can copy ``src`` into ``dst``: both plain (no subclass: a
    DTensor's or a wrapper's ``data_ptr()`` is 0), dense and contiguous CPU tensors whose
    storage holds the bytes they claim (not a zero tensor, not a freed or shrunk storage),
    the same dtype and shape, at least ``STREAM_MIN_BYTES``, and torch using one thread (its
    copy splits a large one over its threads, which one streaming thread would not beat). A
    conjugate or negative view, a quantized or sparse tensor goes to torch, which resolves
    them."""
    large = src.numel() * src.element_size() >= STREAM_MIN_BYTES and src.device.type == "cpu"
    if not large:
        return False
    if not STREAMING or torch.get_num_threads() != 1:
        _tell_once()
        return False
    return (type(src) in _PLAIN and type(dst) in _PLAIN and dst.device.type == "cpu"
            and src.dtype == dst.dtype and src.shape == dst.shape
            and src.layout == torch.strided and dst.layout == torch.strided
            and src.is_contiguous() and dst.is_contiguous()
            and not any(t.is_conj() or t.is_neg() or t.is_quantized or t._is_zerotensor() for t in (src, dst))
            and _holds_its_bytes(src) and _holds_its_bytes(dst))


def _holds_its_bytes(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage holds every byte ``t`` claims (a pointer of 0, a storage freed
    or shrunk under the view, would be read or written past its end)."""
    return t.data_ptr() != 0 and (t.untyped_storage().nbytes()
                                  >= (t.storage_offset() + t.numel()) * t.element_size())


def _streamed(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Copy ``src`` into ``dst`` with streaming stores if they apply; whether it did."""
    if not _streamable(dst, src):
        return False
    _streamcopy.copy(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    return True


def _tell_once() -> None:
    global _told
    if not _told:
        _told = True
        if _streamcopy is None:
            why = "checkpoint._streamcopy is not built (reinstall with a C compiler and Python's headers)"
        elif not STREAMING:
            why = "this platform has no streaming-store build (x86-64 with gcc or clang only)"
        else:
            why = f"torch uses {torch.get_num_threads()} threads here, over which its copy splits"
        log.info("staging large CPU tensors with torch's copy, not streaming stores: %s", why)


@torch.no_grad()
def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, with streaming stores where they apply (``_streamable``). ``dst``
    is a buffer of ours that ``src`` does not overlap, with no autograd history to keep (the
    streaming path does not bump its version counter)."""
    if not _streamed(dst, src):
        dst.copy_(src)


@torch.no_grad()
def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``copy_into`` pairwise: the large ones with streaming stores, the rest in one
    ``torch._foreach_copy_`` call (not one Python call per small tensor). The large ones are
    copied first: if the rest fails, the destinations hold part of the state (the memory tier
    uncommits its slot before copying into it)."""
    if len(dsts) != len(srcs):  # before copying anything
        raise ValueError(f"copy_all: {len(dsts)} destinations for {len(srcs)} tensors")
    rest = [(dst, src) for dst, src in zip(dsts, srcs) if not _streamed(dst, src)]
    if rest:
        torch._foreach_copy_([d for d, _ in rest], [s for _, s in rest])


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
            copy_into(buffer, tensor.detach())
        return buffer
