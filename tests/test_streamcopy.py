"""The staging copy with streaming stores (checkpoint/_streamcopy.c via staging.copy_into):
byte-exact at every alignment and size, on both instruction paths, and only where it applies
(anything torch must resolve, a conjugate view say, goes to torch's copy)."""

import os
import platform
import shutil
import sysconfig

import pytest
import torch
from torch.utils._pytree import tree_map

from checkpoint import staging
from checkpoint.staging import Stager, copy_all, copy_into

X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture
def streamed(monkeypatch):
    """Counts the streaming copies, so a test can tell the path it covered was taken. Torch
    at one thread, as under `make test` and torchrun (streaming is for one thread only)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    calls = []
    real = staging._streamcopy.copy

    def counting(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(staging._streamcopy, "copy", counting)
    return calls


def _can_build() -> bool:
    """What setuptools needs to build the extension: x86-64, Python's headers and the C
    compiler this Python was built with (sysconfig's CC) on PATH."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    return X86 and os.path.exists(headers) and shutil.which(cc) is not None


def test_built_where_it_can_be():
    """`make install` builds it where it can; a silent fallback there would leave the stall at
    torch's copy without anyone knowing."""
    if not _can_build():
        pytest.skip("no x86-64 C build here (compiler, Python headers): torch's copy stages")
    assert staging._streamcopy is not None and staging.STREAMING, \
        "checkpoint._streamcopy did not build: run `make install` and read its output"


@pytest.mark.skipif(not staging.STREAMING, reason="checkpoint._streamcopy not built")
@pytest.mark.parametrize("sse2_only", [False, True])
def test_exact_at_every_alignment_and_size(sse2_only):
    src = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)
    for src_off in (0, 1, 15, 16, 17, 31, 32, 33):
        for dst_off in (0, 1, 8, 16, 31, 32, 47):
            for n in (0, 1, 15, 16, 31, 32, 63, 64, 127, 128, 129, 4095, 4096, 4097, 40000):
                dst = torch.zeros(1 << 16, dtype=torch.uint8)
                staging._streamcopy.copy(dst.data_ptr() + dst_off, src.data_ptr() + src_off, n, sse2_only)
                assert torch.equal(dst[dst_off:dst_off + n], src[src_off:src_off + n]), (src_off, dst_off, n)
                assert not dst[:dst_off].any() and not dst[dst_off + n:].any(), (src_off, dst_off, n)


@pytest.mark.skipif(not staging.STREAMING, reason="checkpoint._streamcopy not built")
def test_copy_into_streams_only_what_it_can(streamed):
    big = 1 << 18  # elements: 1 MiB of float32
    cases = [
        ("float32", torch.randn(big), True),
        ("bfloat16", torch.randn(2 * big).to(torch.bfloat16), True),
        ("odd size", torch.randn(big + 3), True),
        ("a view at an odd offset", torch.randn(big + 1)[1:], True),
        ("transposed", torch.randn(512, 512).t(), False),
        ("conjugate view", torch.randn(big, dtype=torch.complex64).conj(), False),
        ("negative view", torch._neg_view(torch.randn(big, dtype=torch.complex64)), False),
        ("small", torch.randn(100), False),
        ("empty", torch.randn(0), False),
    ]
    for name, src, streams in cases:
        dst = torch.empty(src.shape, dtype=src.dtype)
        before = len(streamed)
        copy_into(dst, src)
        assert torch.equal(dst, src.resolve_conj().resolve_neg()), name
        assert (len(streamed) > before) == streams, name


@pytest.mark.skipif(not staging.STREAMING, reason="checkpoint._streamcopy not built")
def test_copy_all_mixes_both_paths(streamed):
    srcs = [torch.randn(1 << 18), torch.randn(7), torch.randn(300, 300).t(), torch.arange(1 << 20, dtype=torch.int64)]
    dsts = [torch.empty(s.shape, dtype=s.dtype) for s in srcs]
    copy_all(dsts, srcs)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    assert len(streamed) == 2
    fresh = [torch.zeros(s.shape, dtype=s.dtype) for s in srcs]
    with pytest.raises(ValueError):  # a layout mismatch is a bug: nothing is copied
        copy_all(fresh, srcs[:3])
    assert not any(d.any() for d in fresh) and len(streamed) == 2


class Wrapper(torch.Tensor):
    """A wrapper subclass (as DTensor and quantized tensor types are): CPU, contiguous, the
    right dtype and shape, and data_ptr() 0; torch's copy unwraps it."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, Wrapper) else t  # noqa: E731
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


@pytest.mark.skipif(not staging.STREAMING, reason="checkpoint._streamcopy not built")
def test_tensors_without_their_own_bytes_go_to_torch(streamed):
    """A pointer of 0 would be read by the C copy (SIGSEGV): subclasses and zero tensors go to
    torch's copy, which knows what they hold."""
    inner = torch.randn(1 << 18)
    wrapped = Wrapper(inner)
    assert wrapped.data_ptr() == 0
    zeros = torch._efficientzerotensor(1 << 18)
    for src, expected in ((wrapped, inner), (zeros, torch.zeros(1 << 18))):
        dst = torch.empty(1 << 18)
        copy_into(dst, src)
        assert torch.equal(dst, expected)
        copy_all([dst], [src])
        assert torch.equal(dst, expected)
    assert streamed == []


@pytest.mark.skipif(not staging.STREAMING, reason="checkpoint._streamcopy not built")
def test_several_torch_threads_keep_torch_copy(streamed, monkeypatch):
    """torch splits a large copy over its threads; one streaming thread would be slower there."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    src, dst = torch.randn(1 << 18), torch.empty(1 << 18)
    copy_into(dst, src)
    assert torch.equal(dst, src) and streamed == []


@pytest.mark.skipif(not staging.STREAMING, reason="checkpoint._streamcopy not built")
def test_stager_stages_the_same_bytes_either_way(monkeypatch, streamed):
    state = {"model": {"w": torch.randn(1024, 1024), "b": torch.randn(10)},
             "optim": {"state": {0: {"exp_avg": torch.randn(1024, 1024).t(), "step": torch.tensor(3.0)}}}}
    staged = Stager().stage(state)
    assert len(streamed) == 1  # "w"; the transposed one and the small ones go to torch
    monkeypatch.setattr(staging, "STREAMING", False)
    copied = Stager().stage(state)
    for path in (("model", "w"), ("model", "b"), ("optim", "state", 0, "exp_avg"), ("optim", "state", 0, "step")):
        a, b, live = staged, copied, state
        for key in path:
            a, b, live = a[key], b[key], live[key]
        assert torch.equal(a, live) and torch.equal(b, live), path
        assert a.data_ptr() != live.data_ptr()  # a copy, not the live tensor


@pytest.mark.skipif(not staging.STREAMING, reason="checkpoint._streamcopy not built")
def test_a_storage_shorter_than_its_view_or_a_conjugate_destination_go_to_torch(streamed):
    src = torch.randn((1 << 18) + 16)
    view = src[16:]
    assert staging._streamable(torch.empty(view.shape), view)
    src.untyped_storage().resize_(4096)  # the view now claims bytes past the storage's end
    assert not staging._streamable(torch.empty(view.shape), view)  # (not copied: torch would read past it too)

    src = torch.randn(1 << 18, dtype=torch.complex64)
    dst = torch.empty(1 << 18, dtype=torch.complex64).conj()  # a conjugate view as the destination
    copy_into(dst, src)
    assert torch.equal(dst, src) and streamed == []


@pytest.mark.skipif(not staging.STREAMING, reason="checkpoint._streamcopy not built")
def test_memory_tier_snapshot_streams_and_reads_back_bit_exact(tmp_path, streamed):
    from checkpoint.memory import MemorySnapshots

    snapshots = MemorySnapshots(str(tmp_path / "shm"), "/nonexistent-root", "run", 0, 1, "id")
    for step in (1, 2, 3):  # both slots, then the first again (its cached views)
        live = {"step": step, "w": torch.randn(1 << 19), "odd": torch.randn(1 << 18, dtype=torch.float64)[1:],
                "b": torch.randn(10), "t": torch.randn(600, 600).t()}
        snapshots.snapshot(step, live)
        back = snapshots.read(step)
        assert back["step"] == step
        for key in ("w", "odd", "b", "t"):
            assert torch.equal(back[key], live[key]), (step, key)
    assert len(streamed) == 6  # "w" and "odd" at each step; the small and transposed ones by torch
