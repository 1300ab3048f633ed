"""DCP's file reader, reading whole tensors straight into the live ones.

DCP's ``FileSystemReader`` loads each tensor by ``torch.load``-ing its slice of the shard file
into a new tensor and then copying that into the live one: a fresh allocation (page faults)
and a second copy of every byte. Most reads of a resume are whole tensors into contiguous
CPU tensors of the same shape and dtype (DDP, same or another world size), and for those the
bytes on disk are exactly the bytes the live tensor needs: ``torch.save`` stores an
uncompressed, contiguous storage record. Those are read with one ``readinto`` into the live
tensor's memory. Everything else (partial chunks when resharding, GPU tensors, views,
non-tensor items) goes through DCP's own code, unchanged.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from .safe_load import SafeMetadataReader, fsspec_reader

_STORAGE_RECORD = "data/0"  # a torch.save of one tensor holds exactly one storage


class DirectFileSystemReader(SafeMetadataReader, dcp.FileSystemReader):
    """DCP's FileSystemReader with direct reads of whole tensors, and ``.metadata`` read
    through the restricted unpickler (``checkpoint.safe_load``)."""

    def read_data(self, plan, planner) -> Future:
        rest = []
        per_file: dict[str, list] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for relative_path, reqs in per_file.items():
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    if not self._read_into_target(stream, req, planner):
                        rest.append(req)
        if rest:
            super().read_data(dataclasses.replace(plan, items=rest), planner).wait()
        done: Future = Future()
        done.set_result(None)
        return done

    def _read_into_target(self, stream, req, planner) -> bool:
        """Read ``req`` straight into its target if it is a whole tensor stored contiguously;
        False (nothing read) when DCP's general path must handle it."""
        info = self.storage_data[req.storage_index]
        if req.type == LoadItemType.BYTE_IO or info.transform_descriptors:
            return False
        target = planner.resolve_tensor(req).detach()
        if target.device.type != "cpu" or not target.is_contiguous() or type(target) is not torch.Tensor:
            return False
        # The saved tensor's layout, from its pickle alone (no data is read on "meta").
        saved = torch.load(self._slice_file(stream, info), map_location="meta", weights_only=True)
        if not (isinstance(saved, torch.Tensor) and saved.dtype == target.dtype and saved.shape == target.shape
                and saved.is_contiguous() and saved.storage_offset() == 0
                and all(o == 0 for o in req.storage_offsets) and list(req.lengths) == list(saved.shape)):
            return False
        archive = torch._C.PyTorchFileReader(self._slice_file(stream, info))
        nbytes = target.numel() * target.element_size()
        if (not archive.has_record("byteorder") or archive.get_record("byteorder") != sys.byteorder.encode()
                or not archive.has_record(_STORAGE_RECORD) or archive.get_record_size(_STORAGE_RECORD) < nbytes):
            return False
        stream.seek(info.offset + archive.get_record_offset(_STORAGE_RECORD))
        if nbytes:
            dest = memoryview(target.reshape(-1).view(torch.uint8).numpy())
            filled = 0
            while filled < nbytes:
                n = stream.readinto(dest[filled:])
                if not n:
                    raise EOFError(f"{info.relative_path}: ended {nbytes - filled} bytes early in {req.storage_index.fqn}")
                filled += n
        planner.commit_tensor(req, target)
        return True


def reader_for(storage, dirname: str):
    """The DCP reader for checkpoint ``dirname`` under ``storage`` (a ``Storage``): direct
    reads on a local disk, fsspec's reader (with the root's options) elsewhere; both read
    ``.metadata`` through the restricted unpickler."""
    if storage.is_local:
        return DirectFileSystemReader(storage.join(dirname))
    return fsspec_reader(storage.url_of(dirname), storage.options)
