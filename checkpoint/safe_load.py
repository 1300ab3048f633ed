"""Loading never runs code from a checkpoint file.

DCP keeps two kinds of pickles in a checkpoint, and by default trusts both:

- ``.metadata``, the index of the checkpoint, is read with plain ``pickle.load``;
- every non-tensor item (an LR, a step counter, a user's own state) is a ``torch.save`` inside a
  shard file, and DCP's default planner reads it with ``torch.load(weights_only=False)``.

A pickle can call any importable function while it loads, and the commit record's crc32 is no
defence against someone who can write the directory (crc32 is linear: a forged file can be
given any crc32 by changing 4 bytes). So here ``.metadata`` goes through an unpickler that
knows only DCP's metadata classes and the torch and builtin types they are made of, and
non-tensor items go through ``torch.load(weights_only=True)`` with an explicit allow-list
(numpy arrays: numpy's RNG state in checkpoints written before 2026-11-30). Anything else is refused with a line that names the
file and what it tried to load. ``check_checkpoint`` does both for a whole checkpoint so that
discovery can skip a forged one and fall back to an older checkpoint.
"""

from __future__ import annotations

import copyreg
import io
import pathlib
import pickle
import pickletools
import re
import sys
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from fsspec.utils import merge_offset_ranges
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

METADATA_NAME = ".metadata"


def _metadata_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(dcp_metadata, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for name in dir(torch):  # every dtype (torch.float32 pickles as the global torch.float32)
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    allowed[("collections", "OrderedDict")] = OrderedDict
    for cls in (set, frozenset, slice, complex):
        allowed[("builtins", cls.__name__)] = cls
    return allowed


_METADATA_GLOBALS = _metadata_globals()


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to load something that loading does not allow."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _METADATA_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(f"refers to {module}.{name}, which DCP metadata never holds "
                                        "(forged or from an unknown writer; not loaded)") from None


def check_c_unpickle(pickled: bytes, scan: bool = True) -> None:
    """Raise ``pickle.UnpicklingError`` for what a C unpickler with a restricted ``find_class``
    does not refuse by itself:

    - an extension code (EXT1/2/4) that copyreg's cache already holds resolves to its
      callable without ``find_class`` (possible only once code in this process has registered
      and used a copyreg extension: then every pickle is scanned for both, whatever ``scan``
      says);
    - a memo index far beyond the pickle's size: the C unpickler allocates and zeroes a memo
      table of twice that index, so 13 bytes can ask for 64 GiB (``scan``: worth it for small
      pickles; ``.metadata`` is not scanned, 40 ms per 70 KB; a forged one can cost memory,
      never run code).
    """
    if not (scan or copyreg._extension_cache):
        return
    for op, arg, _ in pickletools.genops(pickled):
        if op.name.startswith("EXT"):
            raise pickle.UnpicklingError("holds a copyreg extension code, which no checkpoint writer uses")
        if op.name.endswith("PUT") and int(arg) >= len(pickled):
            raise pickle.UnpicklingError(f"memo index {arg} is beyond the pickle's {len(pickled)} bytes")


def read_metadata(stream) -> Metadata:
    """Unpickle DCP's ``.metadata`` from ``stream``, refusing every global outside the allow-list."""
    if copyreg._extension_cache:
        pickled = stream.read()
        try:
            check_c_unpickle(pickled, scan=False)
        except (pickle.UnpicklingError, ValueError) as e:
            raise UnsafeCheckpointError(f"not DCP metadata: {e} (forged or damaged; not loaded)") from None
        stream = io.BytesIO(pickled)
    metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def default_item_globals() -> list[Callable]:
    """What non-tensor items may hold besides plain Python and tensors: numpy arrays (the
    global numpy RNG state was one before it was saved as a tensor, and a user's item may be)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, _reconstruct, *(type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG")]


class _PlainUnpickler(pickle.Unpickler):
    """Plain Python data only (numbers, strings, lists, tuples, dicts, None): every
    global and every storage is refused, so nothing can be called while it loads."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a storage is not plain data")


_NOT_PLAIN = object()
_PLAIN_MAX_BYTES = 1024  # larger pickles (an older checkpoint's RNG state) go to torch.load: check_c_unpickle's scan is slow


def _plain_item(stream: io.BytesIO) -> Any:
    """The value of a ``torch.save`` of plain Python data, read with the C unpickler; or
    ``_NOT_PLAIN`` when it holds anything else (a tensor, a numpy array, damage), for
    ``torch.load`` to read or refuse. Most items of a checkpoint (an LR, the betas, the
    parameter ids) are plain and small, and this takes 0.05 ms where
    ``torch.load(weights_only=True)`` (a pure-Python unpickler) takes 0.2 to 1 ms."""
    try:
        archive = torch._C.PyTorchFileReader(stream)
        if archive.has_record("byteorder") and archive.get_record("byteorder") != sys.byteorder.encode():
            return _NOT_PLAIN
        if archive.get_record_size("data.pkl") > _PLAIN_MAX_BYTES:
            return _NOT_PLAIN
        pickled = archive.get_record("data.pkl")
        check_c_unpickle(pickled)
        return _PlainUnpickler(io.BytesIO(pickled)).load()
    except Exception:
        return _NOT_PLAIN
    finally:
        stream.seek(0)


def load_item(data: io.BytesIO | bytes, allowed: Iterable[Callable], what: str) -> Any:
    """``torch.load`` one non-tensor item with ``weights_only=True`` and the ``allowed`` globals
    (plain Python data through a faster unpickler that allows no globals at all)."""
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    value = _plain_item(stream)
    if value is not _NOT_PLAIN:
        return value
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(stream, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # torch's message opens with advice to use weights_only=False; keep only what it found.
        found = re.search(r"(?:unsupported )?GLOBAL ([\w.]+)", text, re.IGNORECASE)
        if found:
            raise UnsafeCheckpointError(f"{what}: not loaded, it refers to {found.group(1)}, which loading does not "
                                        "allow; a type of your own can be allowed with "
                                        "CheckpointManager(safe_globals=[...]) (ftckpt --safe-globals pkg.module.Name)") from None
        detail = text.rpartition("WeightsUnpickler error:")[2].strip() or "no detail"
        raise UnsafeCheckpointError(f"{what}: not loaded, its pickle is damaged or holds an operation that loading "
                                    f"does not allow (torch: {detail.splitlines()[0]})") from None
    except MemoryError:
        raise  # a passing shortage, not the checkpoint's damage (retention would set it aside)
    except Exception as e:
        # Damaged bytes that get past the unpickler's allow-list and then break it in any way
        # (a flipped bit in a string, a cut stream, an assertion inside torch): refused like
        # any other damage, never a crash (tests/test_ftckpt.py flips every byte of every item).
        raise UnsafeCheckpointError(f"{what}: not loaded, damaged ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def unpickling_reason(error: Exception) -> str:
    """What torch's weights-only unpickler refused, without the rest of its message (which
    suggests ``weights_only=False``: running the file's code)."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
        found = re.search(r"Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+ whose module [\w.]+ is blocked"
                          r"|`*[\w.]+`* must be \w+ to load", text)  # names only: the rest came from the file
        return f"torch's weights-only unpickler refused it ({found.group(0) if found else 'see torch.load'})"
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor items load with ``weights_only=True``."""

    def __init__(self, allowed: Iterable[Callable], where: str, **kwargs):
        super().__init__(**kwargs)
        self.allowed = list(allowed)
        self.where = where

    def create_local_plan(self) -> LoadPlan:
        """DCP's plan, with each plain tensor that was saved whole (one chunk: DDP's, at any
        world size) planned here: DCP's general planning of it (a typing-protocol check per
        tensor, the resharding sweep) took 7-13 ms of the bench's 403 MB load. The read item is
        the one DCP would make (a test compares the two); anything else is planned by DCP,
        and so is the whole state when the checkpoint holds keys it lacks (DCP then tries
        torch 2.3's key layout) other than the RNG states of ranks this state has none of
        (``rng.rank_N.*``: in every multi-rank checkpoint)."""
        saved = self.metadata.state_dict_metadata
        own_rngs = {key.split(".", 2)[1] for key in self.state_dict if key.startswith("rng.")}
        if any(not key.startswith("rng.") or key.split(".", 2)[1] in own_rngs
               for key in saved.keys() - self.state_dict.keys()):
            return super().create_local_plan()
        strict = not self.allow_partial_load
        items = []
        for fqn, obj in self.state_dict.items():
            item = _whole_tensor_read(fqn, saved.get(fqn), obj)
            items += [item] if item is not None else create_default_local_load_plan({fqn: obj}, self.metadata, strict).items
        return LoadPlan(items)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        # What the default planner does, with a safe torch.load.
        loaded = load_item(value, self.allowed, f"{self.where}: item {fqn}")
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def _whole_tensor_read(fqn: str, saved, obj) -> ReadItem | None:
    """The read of ``obj``, a plain tensor, from the one chunk ``saved`` holds of the same
    size; None for anything else."""
    if type(obj) not in (torch.Tensor, torch.nn.Parameter) or not isinstance(saved, TensorStorageMetadata):
        return None
    size = obj.size()
    if saved.size != size or len(saved.chunks) != 1 or not obj.numel():  # DCP plans no read of an empty one
        return None
    chunk = saved.chunks[0]
    if chunk.sizes != size or any(chunk.offsets):
        return None
    zeros = torch.Size([0] * len(size))
    return ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(fqn, zeros, 0), dest_offsets=zeros,
                    storage_index=MetadataIndex(fqn, chunk.offsets, 0), storage_offsets=zeros, lengths=size)


class SafeMetadataReader:
    """Mixin for DCP's file readers: ``.metadata`` through the restricted unpickler, read
    once per reader (a load reads it to check compatibility, then DCP reads it again: 1.4 ms
    each for the bench's 403 MB state; a round trip each on an object store)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        cached = getattr(self, "_safe_metadata", None)
        if cached is not None and cached[0] == path:
            metadata = cached[1]
        else:
            with self.fs.create_stream(path, "rb") as stream:
                try:
                    metadata = read_metadata(stream)
                except UnsafeCheckpointError as e:
                    raise UnsafeCheckpointError(f"{path}: {e}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._safe_metadata = (path, metadata)
        metadata.storage_meta.load_id = self.load_id
        return metadata


def fsspec_reader(url: str, storage_options: dict | None = None):
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    class SafeFsspecReader(SafeMetadataReader, FsspecReader):
        pass

    return SafeFsspecReader(url, **(storage_options or {}))


def check_checkpoint(fs, directory: str, allowed: Iterable[Callable]) -> None:
    """Read ``.metadata`` and every non-tensor item of the checkpoint in ``directory`` (an
    fsspec filesystem path) the way loading will; raise ``UnsafeCheckpointError`` naming the
    file and item when one is refused. Tensors are not read (they load with
    ``weights_only=True`` anyway)."""
    path = f"{directory}/{METADATA_NAME}"
    with fs.open(path, "rb") as f:
        try:
            metadata = read_metadata(f)
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{path}: {e}") from None
        except Exception as e:  # truncated or not a pickle at all
            raise UnsafeCheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    allowed = list(allowed)
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data or {}, dict):
        raise UnsafeCheckpointError(f"{path}: not a DCP index (its tables are not tables; damaged or forged)")
    items = []  # (fqn, shard path, MetadataIndex's storage info)
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, BytesStorageMetadata):
            continue
        info = (metadata.storage_data or {}).get(dcp_metadata.MetadataIndex(fqn))
        # Neither is ever written by this library: refuse here, so discovery falls back to an
        # older checkpoint instead of every restart failing the same load.
        if info is None:
            raise UnsafeCheckpointError(f"{path}: item {fqn} has no location in any shard (damaged or forged)")
        if info.transform_descriptors:
            raise UnsafeCheckpointError(f"{path}: item {fqn} is stored through transforms "
                                        f"{list(info.transform_descriptors)}, which this library never writes")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (info.offset, info.length)):
            raise UnsafeCheckpointError(f"{path}: item {fqn} has no valid byte range (damaged or forged)")
        items.append((fqn, f"{directory}/{info.relative_path}", info.offset, info.offset + info.length))
    if not items:
        return
    # Ranged reads of just the items (an object store's file object would fetch a whole
    # read-ahead block, s3fs: 50 MB, per item). DCP writes a shard's items side by side, so
    # nearby ranges are merged into one read, and the reads go out in one call (at once on s3fs).
    paths, starts, ends = merge_offset_ranges([i[1] for i in items], [i[2] for i in items], [i[3] for i in items],
                                              max_gap=2**20, sort=True)
    blocks = fs.cat_ranges(paths, starts, ends, on_error="return")
    block = 0  # the merged reads are sorted as the items are here: walk both together
    for fqn, shard, start, end in sorted(items, key=lambda i: (i[1], i[2], i[3])):
        while block < len(paths) and not (paths[block] == shard and starts[block] <= start and end <= ends[block]):
            block += 1
        if block == len(paths):  # DCP never writes items that overlap (an older fsspec merges them short)
            raise UnsafeCheckpointError(f"{path}: item {fqn}'s bytes overlap another item's (damaged or forged)")
        if isinstance(blocks[block], BaseException):
            raise blocks[block]
        load_item(blocks[block][start - starts[block]:end - starts[block]], allowed, f"{shard}: item {fqn}")

__all__ = ["SafeLoadPlanner", "SafeMetadataReader", "UnsafeCheckpointError", "check_checkpoint",
           "default_item_globals", "fsspec_reader", "load_item", "read_metadata", "unpickling_reason"]
