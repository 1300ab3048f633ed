"""Turning live training objects into one state dict for DCP, and back.

What goes in (one dict, so one DCP save holds the whole training state):

    model.*       model weights, DDP's ``module.`` prefix stripped (get_state_dict)
    optim.*       optimizer state keyed by parameter name (get_state_dict)
    scheduler.*   LR scheduler state_dict()
    <name>.*      every extra Stateful or dict the user passes (train progress, data cursor)
    rng.rank_<r>  this rank's RNG states: python, numpy, torch CPU, CUDA when present

Replicated tensors (model and optimizer under DDP) are identical on all ranks; DCP writes one
copy. RNG states differ per rank, so each rank saves them under its own key.
"""

from __future__ import annotations

import random
import struct
import weakref
from typing import Any, Mapping

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict, set_state_dict, set_model_state_dict

try:  # how get_state_dict names a model's key (DDP's "module." and torch.compile's "_orig_mod." left out)
    from torch.distributed.checkpoint.state_dict import _get_fqns
except ImportError:  # another torch: every state dict goes through get_state_dict
    _get_fqns = None

from .errors import CheckpointError, CheckpointMismatchError, one_line
from .manifest import DCP_METADATA_NAME


def rng_key(rank: int) -> str:
    return f"rank_{rank}"


def capture_rng() -> dict[str, Any]:
    """This rank's RNG states; python's and numpy's as int64 tensors. As tuples of 625 ints
    they were non-tensor items, which rank 0's discovery unpickles for every rank with
    torch's pure-Python weights-only unpickler (0.7-1.5 ms each: most of a 2-rank
    discovery, and growing with the world size) and each rank again while loading; as
    tensors they load through the reader's fast path. (The version before this one cannot
    load them: DCP refuses a tensor where it expects an item.)"""
    state = {
        "python": _ints_tensor(random.getstate(), _python_rng_ints),
        "numpy": _ints_tensor(np.random.get_state(), _numpy_rng_ints),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what ``capture_rng`` captured (or an older checkpoint's tuples)."""
    random.setstate(_python_rng_state(state["python"]))
    np.random.set_state(_numpy_rng_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _bits_float(n: int) -> float:
    return struct.unpack("<d", struct.pack("<q", n))[0]


def _ints_tensor(state: Any, to_ints) -> Any:
    """``state`` as an int64 tensor (``to_ints``), or unchanged when it is not laid out as
    expected (another numpy bit generator: a dict, saved as its items)."""
    ints = to_ints(state)
    return state if ints is None else torch.from_numpy(np.array(ints, dtype=np.int64))


def _python_rng_ints(state: Any) -> list[int] | None:
    """``random.getstate()``, (version, 625 ints each < 2**32, gauss_next or None), as
    [version, n, *ints, has gauss, gauss's bits]."""
    version, internal, gauss = state
    if not all(type(n) is int and 0 <= n < 2**63 for n in (version, *internal)):
        return None
    return [version, len(internal), *internal, gauss is not None, _float_bits(0.0 if gauss is None else gauss)]


def _python_rng_state(saved: Any) -> Any:
    """``random.getstate()``'s form of a saved state: an int64 tensor, or an older tuple."""
    if not isinstance(saved, torch.Tensor):
        return saved
    ints = saved.tolist()
    version, n = ints[0], ints[1]
    has_gauss, gauss = ints[2 + n:]
    return version, tuple(ints[2:2 + n]), _bits_float(gauss) if has_gauss else None


def _numpy_rng_ints(state: Any) -> list[int] | None:
    """numpy's legacy ``("MT19937", 624 uint32 keys, pos, has_gauss, cached_gaussian)`` as
    [*keys, pos, has_gauss, cached_gaussian's bits]; None for any other bit generator's."""
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == "MT19937"):
        return None
    _, keys, pos, has_gauss, cached = state
    return [*keys.tolist(), int(pos), int(has_gauss), _float_bits(float(cached))]


def _numpy_rng_state(saved: Any) -> Any:
    """``np.random.get_state()``'s form of a saved state: an int64 tensor, or an older tuple
    (or another bit generator's dict)."""
    if not isinstance(saved, torch.Tensor):
        return saved
    *keys, pos, has_gauss, cached = saved.tolist()
    return "MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, _bits_float(cached)


def rng_as_captured(key: str, value: Any) -> Any:
    """An item of a checkpoint's ``rng.*`` as ``random.getstate()`` / ``np.random.get_state()``
    give it, whichever form it was saved in (for comparing two checkpoints' RNG states)."""
    decode = {"python": _python_rng_state, "numpy": _numpy_rng_state}.get(key.rsplit(".", 1)[-1])
    return value if decode is None else decode(value)


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class TrainingState:
    """The live objects of one rank, and how to save them into / load them from a dict."""

    def __init__(self, model=None, optimizer=None, scheduler=None, extra: Mapping[str, Any] | None = None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.extra = dict(extra or {})
        reserved = {"model", "optim", "scheduler", "rng"} & set(self.extra)
        if reserved:
            raise ValueError(f"extra state names {sorted(reserved)} are reserved; rename them")
        for name, obj in self.extra.items():
            if not (_is_stateful(obj) or isinstance(obj, dict)):
                raise TypeError(f"extra state {name!r} must be a dict or have state_dict()/load_state_dict()")
        if optimizer is not None and model is None:
            raise ValueError("an optimizer needs its model: pass model= too")
        self._dcp_layout = DcpLayout()

    def state_dict(self, rank: int, with_rng: bool = True, dcp: bool = True) -> dict[str, Any]:
        """DCP's layout (``dcp``: optimizer state keyed by parameter name, any sharding), or
        the objects' own ``state_dict()``s, a tenth of the time, for the memory tier (the same
        process layout loads them back)."""
        out: dict[str, Any] = {}
        if not dcp:
            if self.model is not None:
                out["model"] = self.model.state_dict()
            if self.optimizer is not None:
                out["optim"] = self.optimizer.state_dict()
        elif self.model is not None:
            out["model"], optim = self._dcp_layout.state_dicts(self.model, self.optimizer)
            if self.optimizer is not None:
                out["optim"] = optim
        if self.scheduler is not None:
            out["scheduler"] = self.scheduler.state_dict()
        for name, obj in self.extra.items():
            out[name] = obj.state_dict() if _is_stateful(obj) else dict(obj)
        if with_rng:
            out["rng"] = {rng_key(rank): capture_rng()}
        return out

    def apply(self, loaded: dict[str, Any], rank: int, dcp: bool = True) -> None:
        """Put a loaded state dict (same shape as ``state_dict(dcp=...)`` made) into the live objects."""
        if not dcp:
            if self.model is not None:
                self.model.load_state_dict(loaded["model"])
            if self.optimizer is not None:
                self.optimizer.load_state_dict(loaded["optim"])
        elif self.model is not None and self.optimizer is not None:
            set_state_dict(self.model, self.optimizer, model_state_dict=loaded["model"],
                           optim_state_dict=loaded["optim"])
        elif self.model is not None:
            set_model_state_dict(self.model, loaded["model"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(loaded["scheduler"])
        for name, obj in self.extra.items():
            if _is_stateful(obj):
                obj.load_state_dict(loaded[name])
            else:
                obj.clear()
                obj.update(loaded[name])
        if "rng" in loaded:
            restore_rng(loaded["rng"][rng_key(rank)])


class DcpLayout:
    """``get_state_dict``'s result for a model (and optimizer) in a tenth of the time, once the
    layout is known. DCP's function walks every parameter's names three times per call: 1.5 ms
    for 64 parameters here, 0.15 ms for 4, growing with a model's parameter count, and all of
    it is in an async save's stall. Here the objects' own ``state_dict()``s are renamed with
    the names DCP gave the same keys, learnt from one ``get_state_dict`` call; they are used
    only if, on that call's objects, the renamed dicts were identical to DCP's (the same
    keys in the same order, the same tensors, equal values), and only while the model has the
    same parameters in the same places, the optimizer the same ones in the same order, and the
    model's state dict the same keys. Every other case goes through ``get_state_dict``: an
    optimizer without state yet (DCP creates it), a layout not learnt, one the renaming does
    not give (tried once per layout), FSDP's flat parameters (never tried: their
    ``state_dict()`` gathers the whole model)."""

    def __init__(self) -> None:
        self._layout: tuple | None = None  # the model's named parameters and the optimizer's, when learnt
        self._usable = False  # whether renaming gives get_state_dict's result for that layout
        self._model_keys: tuple = ()  # model.state_dict()'s keys when learnt
        self._names: dict[str, str] = {}  # model key -> DCP's name
        self._param_names: list[str] = []  # DCP's name of each parameter, by the optimizer's index

    def state_dicts(self, model, optimizer) -> tuple[dict, dict | None]:
        """(model state dict, optimizer state dict or None) as ``get_state_dict`` gives them."""
        layout = _params(model, optimizer)
        known = self._is_layout(layout)
        if known and self._usable and (optimizer is None or optimizer.state):
            raw_model = model.state_dict()
            if tuple(raw_model) == self._model_keys:
                try:
                    return self._renamed(raw_model, None if optimizer is None else optimizer.state_dict())
                except (KeyError, IndexError, TypeError):  # not the optimizer's usual state dict (patched)
                    pass
            known = False  # the same parameters, other keys (a buffer registered since): learn anew
        slow = (get_model_state_dict(model), None) if optimizer is None else get_state_dict(model, optimizer)
        if not known:
            self._learn(model, optimizer, layout, slow)
        return slow

    def _is_layout(self, layout: tuple) -> bool:
        if self._layout is None:
            return False
        (names, params), (learnt_names, learnt_params) = layout, self._layout
        return (names == learnt_names and len(params) == len(learnt_params)
                and all(ref() is p for p, ref in zip(params, learnt_params)))

    def _renamed(self, raw_model: dict, raw_optim: dict | None) -> tuple[dict, dict | None]:
        model = raw_model
        for key in list(model):  # as get_state_dict renames: in place, a renamed key moves last
            name = self._names[key]
            if name != key:
                model[name] = model.pop(key)
        if raw_optim is None:
            return model, None
        names = self._param_names
        state = {names[pid]: value for pid, value in raw_optim["state"].items()}
        groups = [{**group, "params": [names[pid] for pid in group["params"]]} for group in raw_optim["param_groups"]]
        return model, {"state": state, "param_groups": groups}

    def _learn(self, model, optimizer, layout: tuple, slow: tuple[dict, dict | None]) -> None:
        """Learn the names from the call just made (whose result is ``slow``), usable only if
        renaming the objects' state dicts gives what it gave."""
        names, params = layout
        # Weak references: a parameter replaced since (load_state_dict(assign=True)) is not kept alive.
        self._layout = (names, [weakref.ref(p) for p in params])
        self._usable, self._model_keys, self._names, self._param_names = False, (), {}, []
        if _get_fqns is None or _has_flat_parameters(model):
            return
        try:
            raw_model = model.state_dict()
            self._model_keys = tuple(raw_model)
            for key in raw_model:
                fqns = _get_fqns(model, key)
                if len(fqns) != 1:
                    return
                self._names[key] = next(iter(fqns))
            raw_optim = None
            if optimizer is not None:
                raw_optim = optimizer.state_dict()
                self._param_names = [""] * len(_optimizer_params(optimizer))
                for raw_group, dcp_group in zip(raw_optim["param_groups"], slow[1]["param_groups"], strict=True):
                    for pid, name in zip(raw_group["params"], dcp_group["params"], strict=True):
                        self._param_names[pid] = name
            self._usable = _same(self._renamed(raw_model, raw_optim), slow)
        except Exception:  # a layout this renaming does not know: get_state_dict's it stays
            self._usable = False


def _params(model, optimizer) -> tuple[list, list]:
    """The names of the model's parameters (a tied one under its first name, the one DCP
    gives its optimizer state) and, in that order followed by the optimizer's in its order,
    the parameters: the same objects in the same places keep the names learnt for them."""
    names, params = [], []
    for name, param in model.named_parameters():
        names.append(name)
        params.append(param)
    return names, params + _optimizer_params(optimizer)


def _optimizer_params(optimizer) -> list:
    return [] if optimizer is None else [p for group in optimizer.param_groups for p in group["params"]]


def _has_flat_parameters(model) -> bool:
    """Whether FSDP (the wrapper, FSDP1) manages part of the model: its ``state_dict()`` is
    a collective that gathers the full model by default."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return bool(FullyShardedDataParallel.fsdp_modules(model))


def _same(a: Any, b: Any) -> bool:
    """Whether two state dicts are the same: equal structure and values, and tensors that
    are views of the same memory with the same layout (a DTensor: the same placements of the
    same local shard)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if type(a) is not type(b):
            return False
        try:
            if hasattr(a, "to_local"):  # a DTensor: data_ptr() is 0 for every one
                return (a.placements == b.placements and a.device_mesh == b.device_mesh and a.shape == b.shape
                        and _same(a.to_local(), b.to_local()))
            return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
                    and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())
        except Exception:  # a tensor without storage to compare
            return False
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


def flatten_tensors(state: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Size]:
    """``{"model.conv1.weight": shape, ...}`` in DCP's dotted key style, tensors only."""
    out: dict[str, torch.Size] = {}
    items = state.items() if isinstance(state, Mapping) else enumerate(state)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value.shape
        elif isinstance(value, (Mapping, list)):
            out.update(flatten_tensors(value, name + "."))
    return out


def check_compatible(ours: Mapping[str, Any], saved_shapes: Mapping[str, torch.Size], where: str) -> None:
    """Raise ``CheckpointMismatchError`` listing keys and shapes that differ, before DCP does.

    DCP's own error for a foreign checkpoint is a long traceback about a missing key; this
    one names what differs so the user can tell "wrong directory" from "wrong model config".
    """
    mine = {k: v for k, v in flatten_tensors(ours).items() if not k.startswith("rng.")}
    theirs = {k: v for k, v in saved_shapes.items() if k.split(".", 1)[0] in {"model", "optim"}}
    missing = sorted(k for k in mine if k not in saved_shapes)
    unexpected = sorted(k for k in theirs if k not in mine)
    shapes = sorted(f"{k} (checkpoint {list(saved_shapes[k])}, this run {list(v)})"
                    for k, v in mine.items() if k in saved_shapes and saved_shapes[k] != v)
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("shape mismatch", shapes), ("missing from checkpoint", missing),
                        ("not in this model", unexpected)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            parts.append(f"{label}: {shown}")
    raise CheckpointMismatchError(
        f"checkpoint {where} was saved from a different model or optimizer; " + "; ".join(parts)
        + ". Use a fresh checkpoint directory, or the model settings that wrote this one.")


def incompatibility(state: Mapping[str, Any], reader, where: str) -> tuple[type, str] | None:
    """Why ``state`` cannot be loaded from the checkpoint ``reader`` reads, as (error class,
    message), or None: the kind travels with the message when ranks share their errors."""
    try:
        saved = {k: v.size for k, v in reader.read_metadata().state_dict_metadata.items() if hasattr(v, "size")}
        check_compatible(state, saved, where)
    except CheckpointMismatchError as e:
        return CheckpointMismatchError, str(e)
    except Exception as e:
        return CheckpointError, f"cannot read {where}/{DCP_METADATA_NAME}: {one_line(e)}"
    return None
