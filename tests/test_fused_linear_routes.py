"""The fused linear divergence's route choices on torch: how the weight gradient is formed
(``KLDIV_FUSED_WEIGHT_GRAD``: chunks, lowp, slabs, auto; CUDA's half-precision route emulated
on CPU, and on a real GPU where there is one) and the automatic chunk sizes, against the
float64 oracle (``fused_linear_oracle.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fused_linear_oracle import (
    BETA,
    DIVS,
    H,
    V,
    _call,
    _close,
    _data,
    _teacher,
    plain,
    reduce,
)
from kldiv import _fused_linear_math, fused_linear_divergence


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("form,masked,tile_bytes", [("logits", "both", None),
                                                     ("hidden", "", 3 * 8 * 24),
                                                     ("hidden", "both", None)])
def test_torch_weight_grad_by_slabs(torch: Any, monkeypatch: pytest.MonkeyPatch, div: str,
                                    form: str, masked: str, tile_bytes: int | None) -> None:
    """The weight gradient by vocabulary slabs (CUDA's route for half-precision weights,
    forced here): values and all gradients against the float64 formula, with slabs (8
    entries) that do not divide V, token tiles (3 rows) that do not divide the tokens, -inf
    logits, masks, temperatures, the per-token (recomputing) route."""
    import array_api_compat

    from kldiv.backends import torch_fused_slabs

    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", "slabs")
    monkeypatch.setattr(torch_fused_slabs, "SLAB_COLUMNS", 8)
    monkeypatch.setattr(torch_fused_slabs, "SLAB_TILE_BYTES", tile_bytes)
    slab_calls: list[int] = []
    real = torch_fused_slabs._weight_grad_slabs
    monkeypatch.setattr(torch_fused_slabs, "_weight_grad_slabs",
                        lambda *a: slab_calls.append(1) or real(*a))
    d = _data(22, masked=masked)
    tt = torch.tensor
    for reduction, temp in (("mean_with_sample_weight", 1.0), ("none", 1.8)):
        h, w, b = (tt(d[k], requires_grad=True) for k in ("h", "w", "b"))
        teacher = _teacher(d, form, tt)
        sw = tt(d["sw"])
        out = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=temp,
                    sample_weight=sw, reduction=reduction, chunk_size=4)
        cot = tt(np.random.default_rng(3).random(out.shape))
        got = torch.autograd.grad(out, (h, w, b), cot)
        d64 = [x.detach().requires_grad_() for x in (h, w, b)]
        xp = array_api_compat.array_namespace(d64[0])
        ref = reduce(xp, plain(xp, *d64, teacher, div, BETA, temp), sw, reduction)
        want = torch.autograd.grad(ref, d64, cot)
        _close(out.detach(), ref.detach(), 1e-10)
        for g, e in zip(got, want, strict=True):
            assert torch.isfinite(g).all()
            _close(g, e, 1e-10)
    # only the weight needs a gradient: the chunk pass computes no gradient, only statistics
    h, w = tt(d["h"]), tt(d["w"], requires_grad=True)
    out = _call(h, w, None, _teacher(d, form, tt), divergence=div, beta=BETA, sample_weight=sw,
                chunk_size=4)
    (got,) = torch.autograd.grad(out, (w,))
    w64 = w.detach().requires_grad_()
    ref = reduce(xp, plain(xp, h, w64, None, _teacher(d, form, tt), div, BETA, 1.0), sw,
                 "mean_with_sample_weight")
    _close(got, torch.autograd.grad(ref, (w64,))[0], 1e-10)
    assert len(slab_calls) == 3


def test_torch_weight_grad_mode(torch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` with half-precision weights in the products (CUDA): the weight gradient is
    accumulated in the weight's dtype over at most ``LOWP_MAX_CHUNKS`` token chunks, formed
    by slabs beyond (bounded rounding); float32 weights: chunks. Forced modes are obeyed
    (``lowp`` is ``chunks`` for float32 weights); a bad ``KLDIV_FUSED_WEIGHT_GRAD`` is a
    clear error."""
    from kldiv.backends import torch_fused_chunks, torch_fused_slabs

    f32, bf = torch.float32, torch.bfloat16
    # CUDA's half route on CPU: half operands kept half in the products
    monkeypatch.setattr(torch_fused_chunks, "_operand",
                        lambda x, cd: x if x is None or x.dtype in (bf, cd) else x.to(cd))
    cap = torch_fused_chunks.LOWP_MAX_CHUNKS

    def mode(dtype: Any, chunks: int = 1) -> str | None:  # as the chunk pass decides it
        h, w = torch.zeros((chunks * 2, 2), dtype=dtype), torch.zeros((3, 2), dtype=dtype)
        setup = torch_fused_chunks.Setup(
            h, w, None, ("logits", torch.zeros(chunks * 2, 3)),
            _fused_linear_math.Plan("kl", 0.5, 1.0, 2),
            weight_grad=torch_fused_slabs.weight_grad_mode())
        return setup.weight_grad

    assert mode(bf) == "lowp" and mode(bf, cap) == "lowp" and mode(bf, cap + 1) == "slabs"
    assert mode(f32) == "chunks" and mode(f32, cap + 1) == "chunks"
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", "chunks")
    assert mode(bf) == "chunks"
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", "lowp")
    assert mode(bf, cap + 1) == "lowp" and mode(f32) == "chunks"
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", "slabs")
    assert mode(f32) == "slabs" and mode(bf) == "slabs"
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", "slab")
    with pytest.raises(ValueError, match="KLDIV_FUSED_WEIGHT_GRAD must be 'auto', 'chunks'"):
        mode(f32)
    # the Triton route's own chunk rule (auto chunk size): lowp's cap counts the chunks;
    # beyond LOWP_MAX_CHUNKS the slab pass's smaller cap gives the rows
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", "auto")
    monkeypatch.setattr(torch_fused_chunks, "FORCE_ROUTE", "triton")
    per_row = torch_fused_chunks.TRITON_CHUNK_BUFFERS * 3 * 4  # V = 3, float32
    monkeypatch.setattr(torch_fused_chunks, "TRITON_CHUNK_BYTES", 4 * per_row)
    monkeypatch.setattr(torch_fused_chunks, "SLAB_CHUNK_BYTES", 2 * per_row)

    def triton_setup(n: int) -> Any:
        return torch_fused_chunks.Setup(
            torch.zeros((n, 2), dtype=bf), torch.zeros((3, 2), dtype=bf), None,
            ("logits", torch.zeros(n, 3)),
            _fused_linear_math.Plan("kl", 0.5, 1.0, n, auto_chunk=True),
            weight_grad=torch_fused_slabs.weight_grad_mode())

    few, many = triton_setup(4 * cap), triton_setup(4 * cap + 1)
    assert (few.weight_grad, few.plan.chunk_size) == ("lowp", 4)
    assert (many.weight_grad, many.plan.chunk_size) == ("slabs", 2)
    monkeypatch.setattr(torch_fused_chunks, "FORCE_ROUTE", None)
    # auto over more chunks than the cap: by slabs, no V x H accumulator at all
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", "auto")
    monkeypatch.setattr(torch_fused_chunks, "LOWP_MAX_CHUNKS", 1)
    zeros = torch.zeros
    big: list[tuple[Any, Any]] = []

    def spy_zeros(*shape: Any, **kw: Any) -> Any:
        big.append((shape, kw.get("dtype")))
        return zeros(*shape, **kw)

    monkeypatch.setattr(torch_fused_chunks.torch, "zeros", spy_zeros)
    d = _data(23)
    h, w = (torch.tensor(d[k]).to(bf) for k in ("h", "w"))
    n = h.reshape(-1, H).shape[0]
    plan = _fused_linear_math.Plan("js", BETA, 1.0, 3)
    _, dh, dW, _ = torch_fused_slabs.chunks(
        h.reshape(n, H), w, None, ("logits", torch.tensor(d["tl"]).reshape(n, V)), plan,
        torch.ones(n), (True, True, False))
    monkeypatch.undo()
    assert dW.dtype == bf and dh.dtype == f32
    assert not any(shape == ((V, H),) for shape, _ in big)  # no accumulator
    h64, w64 = (torch.tensor(d[k]).to(bf).double().requires_grad_() for k in ("h", "w"))
    import array_api_compat

    xp = array_api_compat.array_namespace(h64)
    ref = plain(xp, h64.reshape(n, H), w64, None, {"logits": torch.tensor(d["tl"]).reshape(n, V)},
                "js", BETA, 1.0).sum()
    eh, ew = torch.autograd.grad(ref, (h64, w64))
    np.testing.assert_allclose(dW.double().numpy(), ew.numpy(), rtol=2e-2,
                               atol=2e-2 * float(ew.abs().max()))
    np.testing.assert_allclose(dh.double().numpy(), eh.reshape(n, H).numpy(), rtol=2e-2,
                               atol=2e-2 * float(eh.abs().max()))


def test_torch_weight_grad_lowp(torch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``KLDIV_FUSED_WEIGHT_GRAD=lowp`` (Liger's accumulation): with the products taking a
    half weight (CUDA's route, emulated), the accumulator over token chunks is a ``V x H``
    buffer of the weight's dtype, not float32, and the gradient is the float64 formula's
    within that dtype's rounding per chunk; with float32 weights it is the ``chunks`` mode,
    bit for bit."""
    from kldiv.backends import torch_fused_chunks, torch_fused_slabs

    f32, bf = torch.float32, torch.bfloat16
    d = _data(23)
    n = np.asarray(d["h"]).reshape(-1, H).shape[0]
    plan = _fused_linear_math.Plan("js", BETA, 1.0, 3)
    teacher = ("logits", torch.tensor(d["tl"]).reshape(n, V))

    def grads(dtype: Any, mode: str) -> tuple[Any, Any]:
        monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", mode)
        h, w = (torch.tensor(d[k]).to(dtype) for k in ("h", "w"))
        _, dh, dW, _ = torch_fused_slabs.chunks(h.reshape(n, H), w, None, teacher, plan,
                                                torch.ones(n), (True, True, False))
        return dh, dW

    dh32, dW32 = grads(f32, "chunks")
    dh_l, dW_l = grads(f32, "lowp")
    assert torch.equal(dW32, dW_l) and torch.equal(dh32, dh_l)
    monkeypatch.setattr(torch_fused_chunks, "_operand",
                        lambda x, cd: x if x is None or x.dtype in (bf, cd) else x.to(cd))
    zeros = torch.zeros
    big: list[Any] = []

    def spy_zeros(*shape: Any, **kw: Any) -> Any:
        if shape == ((V, H),):
            big.append(kw.get("dtype"))
        return zeros(*shape, **kw)

    monkeypatch.setattr(torch_fused_chunks.torch, "zeros", spy_zeros)
    dh, dW = grads(bf, "lowp")
    _, dW_c = grads(bf, "chunks")
    monkeypatch.undo()
    assert big == [bf, f32]  # lowp: a bfloat16 accumulator; chunks: float32
    assert dW.dtype == bf and dh.dtype == f32
    h64, w64 = (torch.tensor(d[k]).to(bf).double().requires_grad_() for k in ("h", "w"))
    import array_api_compat

    xp = array_api_compat.array_namespace(h64)
    ref = plain(xp, h64.reshape(n, H), w64, None, {"logits": teacher[1]}, "js", BETA,
                1.0).sum()
    eh, ew = torch.autograd.grad(ref, (h64, w64))
    for got in (dW, dW_c):
        np.testing.assert_allclose(got.double().numpy(), ew.numpy(), rtol=2e-2,
                                   atol=2e-2 * float(ew.abs().max()))
    np.testing.assert_allclose(dh.double().numpy(), eh.reshape(n, H).numpy(), rtol=2e-2,
                               atol=2e-2 * float(eh.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["chunks", "slabs", "lowp", "auto"])
@pytest.mark.parametrize("div", DIVS)
def test_torch_cuda_bfloat16_weight_grad_modes(torch: Any, monkeypatch: pytest.MonkeyPatch,
                                               mode: str, div: str) -> None:
    """On a real CUDA device (Triton route where Triton is installed), bfloat16 operands:
    the value and the gradients of every weight-gradient mode against the float64 formula
    on the same bfloat16 inputs, with slabs and chunks that divide neither V nor N."""
    import array_api_compat

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from kldiv.backends import torch_fused_slabs

    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", mode)
    g = torch.Generator().manual_seed(11)
    n, hid, v = 300, 64, 5000
    cpu = [torch.randn(s, generator=g).to(torch.bfloat16) for s in ((n, hid), (v, hid),
                                                                      (n, hid), (v, hid))]
    cpu[1] = cpu[1] * 0.3
    h, w, th, tw = (x.cuda() for x in cpu)
    h.requires_grad_()
    w.requires_grad_()
    out = fused_linear_divergence(h, w, teacher_hidden=th, teacher_weight=tw, divergence=div,
                                  beta=BETA, temperature=1.5, chunk_size=128)
    gh, gw = torch.autograd.grad(out, (h, w))
    assert gw.dtype == torch.bfloat16 and gh.dtype == torch.bfloat16
    h64, w64 = (cpu[i].double().requires_grad_() for i in (0, 1))
    xp = array_api_compat.array_namespace(h64)
    ref = plain(xp, h64, w64, None, {"hidden": cpu[2].double(), "weight": cpu[3].double()},
                div, BETA, 1.5).mean()
    eh, ew = torch.autograd.grad(ref, (h64, w64))
    np.testing.assert_allclose(float(out.detach()), float(ref.detach()), rtol=1.6e-2, atol=1e-4)
    for got, want in ((gh, eh), (gw, ew)):
        np.testing.assert_allclose(got.double().cpu().numpy(), want.numpy(), rtol=3e-2,
                                   atol=3e-2 * float(want.abs().max()))


def test_auto_chunk_size() -> None:
    """Powers of two within the budget; independent of the token count once it is large."""
    auto_chunk_size = _fused_linear_math.auto_chunk_size
    kw = {"itemsize": 4, "buffers": 7, "on_gpu": False}
    big = auto_chunk_size(10**6, 32768, available=None, **kw)
    assert big == 256 and big * 7 * 32768 * 4 <= 256 * 2**20
    assert auto_chunk_size(10**7, 32768, available=None, **kw) == big
    assert auto_chunk_size(50, 32768, available=None, **kw) == 50  # one chunk: all tokens
    assert auto_chunk_size(10**6, 262144, available=None, **kw) == 32
    assert auto_chunk_size(10**6, 32768, available=160 * 2**20, **kw) == 8  # 1/16 of free
    assert auto_chunk_size(10**6, 10**9, available=None, **kw) == 1
    assert auto_chunk_size(10**6, 128256, available=None, itemsize=4, buffers=5,
                           on_gpu=True) == 256


def test_triton_route_chooses_its_own_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """An automatic chunk size is chosen again by the Triton route (three buffers, a 2 GiB
    cap: 1024 tokens at V=128256); a chunk size given by the caller is kept."""
    torch = pytest.importorskip("torch")
    from kldiv.backends import torch_fused, torch_fused_chunks, torch_fused_slabs

    auto_chunk_size = _fused_linear_math.auto_chunk_size
    assert auto_chunk_size(10**6, 128256, itemsize=4, buffers=3, on_gpu=True, available=None,
                           cap=torch_fused_chunks.TRITON_CHUNK_BYTES) == 1024
    plans: list[Any] = []
    real = torch_fused.chunks
    monkeypatch.setattr(torch_fused, "chunks", lambda *a, **k: plans.append(a[4]) or real(*a, **k))
    h, w, tl = torch.randn(40, 8), torch.randn(64, 8), torch.randn(40, 64)
    fused_linear_divergence(h, w, tl)
    fused_linear_divergence(h, w, tl, chunk_size=3)
    assert [p.auto_chunk for p in plans] == [True, False]
    assert plans[1].chunk_size == 3
    monkeypatch.setattr(torch_fused_chunks, "FORCE_ROUTE", "triton")
    auto_plan = dataclasses.replace(plans[0], chunk_size=1)  # as a smaller budget would give
    for plan, want in ((auto_plan, auto_chunk_size(
            40, 64, itemsize=4, buffers=torch_fused_chunks.TRITON_CHUNK_BUFFERS, on_gpu=True,
            available=_fused_linear_math.available_memory(h.device),
            cap=torch_fused_chunks.TRITON_CHUNK_BYTES)), (plans[1], 3)):
        setup = torch_fused_chunks.Setup(h, w, None, ("logits", tl), plan)
        assert setup.route == "triton" and setup.plan.chunk_size == want
    # the weight gradient by slabs: no per-chunk V x H accumulation, a smaller cap
    assert auto_chunk_size(10**6, 128256, itemsize=4, buffers=3, on_gpu=True, available=None,
                           cap=torch_fused_chunks.SLAB_CHUNK_BYTES) == 256
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", "slabs")
    monkeypatch.setattr(torch_fused_chunks, "SLAB_CHUNK_BYTES", 64 * 3 * 4 * 4)  # 4 rows
    setup = torch_fused_chunks.Setup(h, w, None, ("logits", tl), auto_plan, weight_grad="slabs")
    assert setup.slabs and setup.plan.chunk_size == 4


def test_available_memory_reads_the_device() -> None:
    available_memory = _fused_linear_math.available_memory

    class CupyLike:
        mem_info = (3 * 2**30, 16 * 2**30)

    class JaxGpuLike:
        platform = "gpu"

        def memory_stats(self) -> dict[str, int]:
            return {"bytes_limit": 10 * 2**30, "bytes_in_use": 2**30}

    assert available_memory(CupyLike()) == 3 * 2**30
    assert available_memory(JaxGpuLike()) == 9 * 2**30
    host = available_memory(None)
    assert host is None or host > 0
