"""``state.DcpLayout``: the renamed state dicts an async save stages are exactly what DCP's
``get_state_dict`` gives, and every layout it has not verified goes through DCP's function."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import Replicate, distribute_tensor
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint.state as state
from checkpoint.state import DcpLayout, TrainingState, _has_flat_parameters, _same


def _tied() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10, bias=False))
    model[2].weight = model[0].weight  # tied input and output embeddings, as language models do
    return model


def _step(model, opt) -> None:
    opt.zero_grad()
    out = model(torch.arange(4)) if isinstance(_inner(model)[0], torch.nn.Embedding) else model(torch.randn(4, 8))
    out.sum().backward()
    opt.step()


def _inner(model):
    return model.module if isinstance(model, DDP) else model


@pytest.fixture
def calls(monkeypatch):
    """How often DCP's get_state_dict ran."""
    count = {"n": 0}
    real = state.get_state_dict

    def counted(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(state, "get_state_dict", counted)
    return count


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(kind: str):
    if kind == "tied":
        return _tied()
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 8))
    return DDP(model) if kind == "ddp" else model


@pytest.mark.parametrize("kind", ["plain", "ddp", "tied"])
def test_renamed_state_dicts_are_get_state_dicts(kind, calls, request):
    if kind == "ddp":
        request.getfixturevalue("one_rank_group")
    torch.manual_seed(0)
    model = _model(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _step(model, opt)
    layout = DcpLayout()
    layout.state_dicts(model, opt)  # learns the layout from DCP's own result
    assert calls["n"] == 1
    for _ in range(3):
        _step(model, opt)
        fast = layout.state_dicts(model, opt)
        assert calls["n"] == 1  # renamed, DCP's function not run
        assert _same(fast, get_state_dict(model, opt))  # torch's own function, not the counted one
    if kind == "ddp":
        assert all(not key.startswith("module.") for key in fast[0])  # DDP's prefix left out, as DCP does


def test_layouts_it_has_not_verified_go_through_get_state_dict(calls):
    torch.manual_seed(0)
    model = _model("plain")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layout = DcpLayout()
    layout.state_dicts(model, opt)  # no optimizer state yet: DCP creates it (a step with zero grads)
    assert calls["n"] == 1 and opt.state
    opt.state.clear()
    layout.state_dicts(model, opt)  # empty again: DCP's function again, never a renaming of nothing
    assert calls["n"] == 2
    extra = torch.nn.Parameter(torch.zeros(3))
    model.register_parameter("extra", extra)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    _step(model, opt)
    got = layout.state_dicts(model, opt)  # new keys, a new parameter: learnt anew
    assert calls["n"] == 3 and _same(got, get_state_dict(model, opt))
    assert _same(layout.state_dicts(model, opt), get_state_dict(model, opt)) and calls["n"] == 3
    old = model[0].weight
    model[0].weight = torch.nn.Parameter(old.detach().clone())  # a parameter replaced, its state moved
    opt.param_groups[0]["params"][0] = model[0].weight
    opt.state[model[0].weight] = opt.state.pop(old)
    got = layout.state_dicts(model, opt)
    assert calls["n"] == 4 and _same(got, get_state_dict(model, opt))


def test_what_changes_between_saves_is_read_anew(calls):
    """Learnt on an optimizer without state (a load's first call); then the learning rate a
    scheduler sets, state a parameter gains later, and swapped parameters are all as DCP's."""
    torch.manual_seed(0)
    model = _model("plain")
    model[2].weight.requires_grad_(False)  # no grad, so no state at first
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    layout = DcpLayout()
    layout.state_dicts(model, opt)
    assert calls["n"] == 1
    _step(model, opt)
    scheduler.step()
    got = layout.state_dicts(model, opt)
    assert calls["n"] == 1 and got[1]["param_groups"][0]["lr"] == 0.05 and _same(got, get_state_dict(model, opt))
    model[2].weight.requires_grad_(True)
    _step(model, opt)
    got = layout.state_dicts(model, opt)
    assert calls["n"] == 1 and "2.weight" in got[1]["state"] and _same(got, get_state_dict(model, opt))
    model[0].weight, model[2].weight = model[2].weight, model[0].weight  # the same keys, other tensors
    got = layout.state_dicts(model, opt)
    assert calls["n"] == 2 and _same(got, get_state_dict(model, opt))
    assert got[1]["state"]["0.weight"] is opt.state[model[0].weight]  # each state under its parameter's name
    model.register_buffer("seen", torch.zeros(2))  # the same parameters, one key more
    got = layout.state_dicts(model, opt)
    assert calls["n"] == 3 and "seen" in got[0] and _same(got, get_state_dict(model, opt))


def test_a_retied_weight_keeps_dcps_name(calls):
    """DCP names a tied parameter's optimizer state after its first place in the model: tying
    it elsewhere (the same parameters, the same keys) changes that name."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False),
                                torch.nn.Linear(8, 8, bias=False))
    model[1].weight = model[0].weight
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    layout = DcpLayout()
    layout.state_dicts(model, opt)
    model[1].weight = model[2].weight  # re-tied: 1 and 2 share now
    got = layout.state_dicts(model, opt)
    assert calls["n"] == 2 and _same(got, get_state_dict(model, opt)) and "1.weight" in got[1]["state"]


def test_a_replaced_parameter_is_not_kept_alive():
    model = _model("plain")
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    layout = DcpLayout()
    layout.state_dicts(model, opt)
    old = weakref.ref(model[0].weight)
    model.load_state_dict(model.state_dict(), assign=True)  # new Parameter objects
    opt = torch.optim.AdamW(model.parameters())
    gc.collect()
    assert old() is None


def test_dtensors_compare_by_their_local_shards(one_rank_group):
    mesh = init_device_mesh("cpu", (1,))
    weights = distribute_tensor(torch.ones(4, 4), mesh, [Replicate()])
    assert _same({"w": weights}, {"w": weights.detach()})
    assert not _same({"w": weights}, {"w": distribute_tensor(torch.ones(4, 4), mesh, [Replicate()])})


def test_fsdp2_models_are_renamed_and_fsdp1_models_never_tried(one_rank_group, calls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    layout = DcpLayout()
    layout.state_dicts(model, opt)
    got = layout.state_dicts(model, opt)
    assert calls["n"] == 1 and _same(got, get_state_dict(model, opt))
    fsdp1 = FullyShardedDataParallel(torch.nn.Linear(8, 8), device_id=torch.device("cpu"))
    assert _has_flat_parameters(fsdp1) and not _has_flat_parameters(model)


def test_same_tells_other_memory_and_other_values_apart():
    weights = torch.ones(3)
    assert _same({"w": weights, "lr": 0.1}, {"w": weights.detach(), "lr": 0.1})
    assert not _same({"w": weights}, {"w": weights.clone()})  # equal values, other memory
    assert not _same({"w": weights, "lr": 0.1}, {"w": weights, "lr": 0.2})
    assert not _same({"a": weights, "b": weights}, {"b": weights, "a": weights})  # another order
    assert not _same({"w": weights}, {"w": weights[:2]})


def test_a_layout_the_renaming_gets_wrong_stays_with_get_state_dict(calls, monkeypatch):
    """Learning is tried once per layout; a wrong name is never used."""
    model = _model("plain")
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    asked = []
    monkeypatch.setattr(state, "_get_fqns", lambda _model, key: asked.append(key) or {key + "_wrong"})
    layout = DcpLayout()
    for n in range(1, 4):
        got = layout.state_dicts(model, opt)
        assert calls["n"] == n and "0.weight" in got[0]
    assert asked == list(model.state_dict())  # tried for the first call only


def test_training_state_without_an_optimizer_is_dcps_model_state_dict():
    model = _model("plain")
    training = TrainingState(model)
    training.state_dict(0)
    second = training.state_dict(0)
    assert training._dcp_layout._usable  # the second one was renamed
    assert "optim" not in second and _same(second["model"], get_model_state_dict(model))
