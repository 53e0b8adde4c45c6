"""kldiv.fused_linear_divergence / FusedLinearDivergence (issue 13): the divergence from hidden
states, chunked, against the plain formula in float64 (values and gradients).

The oracle materialises the logits and is written from the definitions (issue 12):
temperature divides the logits, log-softmax, then KL(teacher || student), KL(student ||
teacher) or the generalized Jensen-Shannon divergence, ``0 log 0 = 0``. It is written once
against the array API, so the same code differentiates under torch autograd and ``jax.grad``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from conftest import Backend
from kldiv import FusedLinearDivergence, _fused_linear, _fused_linear_math, fused_linear_divergence

DIVS = ["kl", "reverse_kl", "js"]
BETA = 0.3
TOKENS = (2, 5)  # 10 tokens: chunk sizes 3 and 4 do not divide them
H, HT, V = 6, 5, 11


# ------------------------------------------------------------------------------ the oracle
def _lse(xp: Any, x: Any) -> Any:
    m = xp.max(x, axis=-1, keepdims=True)
    return m + xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True))


def _xlogy(xp: Any, a: Any, d: Any) -> Any:
    zero = a == 0  # the inner where keeps NaN (0 * inf) out of the gradient too
    return xp.where(zero, xp.zeros_like(a), a * xp.where(zero, xp.zeros_like(d), d))


def plain(xp: Any, h: Any, w: Any, b: Any, teacher: dict[str, Any], div: str, beta: float,
          temp: float) -> Any:
    """Per-token divergence with the logits materialised (float64 when the inputs are)."""
    s = h @ w.T + (b if b is not None else 0)
    if "logits" in teacher:
        t = teacher["logits"]
    else:
        t = teacher["hidden"] @ teacher["weight"].T
        if teacher.get("bias") is not None:
            t = t + teacher["bias"]
    s, t = s / temp, t / temp
    lq, lp = s - _lse(xp, s), t - _lse(xp, t)
    p, q = xp.exp(lp), xp.exp(lq)
    if div == "kl":
        return xp.sum(_xlogy(xp, p, lp - lq), axis=-1)
    if div == "reverse_kl":
        return xp.sum(_xlogy(xp, q, lq - lp), axis=-1)
    ninf = -math.inf
    both = (lp == ninf) & (lq == ninf)
    a = xp.where(both, xp.zeros_like(lp), lp + math.log(beta))
    c = xp.where(both, xp.zeros_like(lq), lq + math.log1p(-beta))
    lm = xp.where(both, xp.full_like(lp, ninf), xp.logaddexp(a, c))
    return beta * xp.sum(_xlogy(xp, p, lp - lm), axis=-1) + (1 - beta) * xp.sum(
        _xlogy(xp, q, lq - lm), axis=-1)


def reduce(xp: Any, per: Any, w: Any, reduction: str) -> Any:
    """The loss classes' reductions (plus batchmean), from their definitions."""
    lw = per if w is None else per * w
    if reduction == "none":
        return lw
    total = xp.sum(lw)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / per.shape[0]
    if reduction == "mean_with_sample_weight" and w is not None:
        return total / xp.sum(w * xp.ones_like(per))
    return total / math.prod(per.shape)


def _data(seed: int = 0, tokens: tuple[int, ...] = TOKENS, masked: str = "") -> dict[str, Any]:
    """Float64 NumPy inputs. ``masked``: "both" / "teacher" / "student": -inf logits on some
    vocabulary entries of those sides (where the divergence stays finite)."""
    rng = np.random.default_rng(seed)
    d = {"h": rng.standard_normal((*tokens, H)), "w": rng.standard_normal((V, H)) / 2,
         "b": rng.standard_normal(V), "tl": 2 * rng.standard_normal((*tokens, V)),
         "th": rng.standard_normal((*tokens, HT)), "tw": rng.standard_normal((V, HT)) / 2,
         "tb": rng.standard_normal(V), "sw": rng.random(tokens)}
    if masked in ("both", "student"):
        d["b"][[1, 7]] = -np.inf
    if masked in ("both", "teacher"):
        d["tl"][..., [1, 7] if masked == "both" else [2, 4]] = -np.inf
        d["tb"][[1, 7] if masked == "both" else [2, 4]] = -np.inf
    return d


def _teacher(d: dict[str, Any], form: str, conv: Any) -> dict[str, Any]:
    if form == "logits":
        return {"logits": conv(d["tl"])}
    return {"hidden": conv(d["th"]), "weight": conv(d["tw"]), "bias": conv(d["tb"])}


def _kwargs(teacher: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "logits" in teacher:
        return (teacher["logits"],), {}
    return (), {"teacher_hidden": teacher["hidden"], "teacher_weight": teacher["weight"],
                "teacher_bias": teacher["bias"]}


def _call(h: Any, w: Any, b: Any, teacher: dict[str, Any], **kw: Any) -> Any:
    args, tkw = _kwargs(teacher)
    return fused_linear_divergence(h, w, *args, student_bias=b, **tkw, **kw)


def _close(a: Any, b: Any, tol: float = 1e-10) -> None:
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               rtol=tol, atol=tol)


# --------------------------------------------------------------------------------- torch
@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


CASES = [(div, form, bias, temp, chunk) for div in DIVS for form in ("logits", "hidden")
         for bias, temp, chunk in ((True, 1.0, 3), (False, 2.5, 4), (True, 0.7, None))]


@pytest.mark.parametrize("div,form,bias,temp,chunk", CASES)
def test_torch_values_and_gradients(torch: Any, div: str, form: str, bias: bool, temp: float,
                                    chunk: int | None) -> None:
    import array_api_compat

    d = _data(1)
    tt = torch.tensor
    h, w, b = (tt(d[k], requires_grad=True) for k in ("h", "w", "b"))
    teacher = _teacher(d, form, tt)
    sw = tt(d["sw"])
    out = _call(h, w, b if bias else None, teacher, divergence=div, beta=BETA, temperature=temp,
                sample_weight=sw, chunk_size=chunk)
    xp = array_api_compat.array_namespace(h)
    ref = reduce(xp, plain(xp, h, w, b if bias else None, teacher, div, BETA, temp), sw,
                 "mean_with_sample_weight")
    _close(out.detach(), ref.detach())
    assert out.dtype == torch.float64 and out.shape == ()
    wrt = (h, w, b) if bias else (h, w)
    got = torch.autograd.grad(out, wrt)
    want = torch.autograd.grad(ref, wrt)
    for g, e in zip(got, want, strict=True):
        _close(g, e)
    if not bias:
        assert b.grad is None


@pytest.mark.parametrize("reduction", ["none", "sum", "sum_over_batch_size", "auto", "mean",
                                       "mean_with_sample_weight", "batchmean"])
@pytest.mark.parametrize("weight", ["none", "tokens", "rows", "scalar"])
def test_torch_reductions_and_weights(torch: Any, reduction: str, weight: str) -> None:
    """Every reduction, with per-token, per-row (Keras 2's rank rule: a (B,) weight scales
    each row of a (B, T) loss) and scalar weights; 'none' gives per-token values."""
    import array_api_compat

    d = _data(2)
    h, w = torch.tensor(d["h"], requires_grad=True), torch.tensor(d["w"], requires_grad=True)
    teacher = _teacher(d, "logits", torch.tensor)
    sw = {"none": None, "tokens": torch.tensor(d["sw"]), "rows": torch.tensor([0.3, 1.5]),
          "scalar": 2.0}[weight]
    out = _call(h, w, None, teacher, divergence="js", beta=BETA, sample_weight=sw,
                reduction=reduction, chunk_size=3)
    xp = array_api_compat.array_namespace(h)
    wref = None if sw is None else (torch.tensor(sw) if weight == "scalar" else
                                    sw[:, None] if weight == "rows" else sw)
    ref = reduce(xp, plain(xp, h, w, None, teacher, "js", BETA, 1.0), wref, reduction)
    assert tuple(out.shape) == (TOKENS if reduction == "none" else ())
    _close(out.detach(), ref.detach())
    cot = torch.rand(out.shape, dtype=out.dtype)
    for g, e in zip(torch.autograd.grad(out, (h, w), cot), torch.autograd.grad(ref, (h, w), cot),
                    strict=True):
        _close(g, e)


def test_torch_all_masked_is_zero_with_zero_gradients(torch: Any) -> None:
    d = _data(3)
    h, w, b = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w", "b"))
    out = _call(h, w, b, _teacher(d, "hidden", torch.tensor), sample_weight=torch.zeros(TOKENS))
    assert float(out.detach()) == 0.0
    for g in torch.autograd.grad(out, (h, w, b)):
        assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("masked,divs", [("both", DIVS), ("teacher", ["kl", "js"]),
                                         ("student", ["reverse_kl", "js"])])
def test_torch_minus_inf_logits(torch: Any, masked: str, divs: list[str]) -> None:
    """-inf logits (a masked vocabulary) on either side, where the divergence is finite:
    values as the oracle's, gradients finite and equal to the oracle's."""
    import array_api_compat

    d = _data(4, masked=masked)
    for div in divs:
        for form in ("logits", "hidden"):
            h, w, b = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w", "b"))
            teacher = _teacher(d, form, torch.tensor)
            out = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=1.3,
                        chunk_size=4)
            xp = array_api_compat.array_namespace(h)
            ref = plain(xp, h, w, b, teacher, div, BETA, 1.3).mean()
            assert math.isfinite(float(out.detach()))
            _close(out.detach(), ref.detach())
            for g, e in zip(torch.autograd.grad(out, (h, w, b)),
                            torch.autograd.grad(ref, (h, w, b)), strict=True):
                assert torch.isfinite(g).all()
                _close(g, e)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_precision_in_float32(torch: Any, dtype: str) -> None:
    """Half inputs: computed in float32, returned (value and gradients) in the input dtype."""
    import array_api_compat

    half = getattr(torch, dtype)
    d = _data(5)
    h, w = (torch.tensor(d[k]).to(half).requires_grad_() for k in ("h", "w"))
    tl = torch.tensor(d["tl"]).to(half)
    for reduction in ("mean_with_sample_weight", "none"):
        out = fused_linear_divergence(h, w, tl, divergence="js", beta=BETA, chunk_size=3,
                                      reduction=reduction)
        assert out.dtype == half
        h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
        xp = array_api_compat.array_namespace(h64)
        ref = plain(xp, h64, w64, None, {"logits": tl.double()}, "js", BETA, 1.0)
        ref = ref.mean() if reduction != "none" else ref
        # float32 arithmetic on half inputs: only the final rounding to half is lost
        tol = {"float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
        np.testing.assert_allclose(out.detach().double().numpy(), ref.detach().numpy(),
                                   rtol=tol, atol=1e-5)
        cot = torch.ones(out.shape, dtype=out.dtype)
        gh, gw = torch.autograd.grad(out, (h, w), cot)
        eh, ew = torch.autograd.grad(ref, (h64, w64), cot.double())
        assert gh.dtype == half and gw.dtype == half
        for g, e in ((gh, eh), (gw, ew)):
            np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=4 * tol, atol=4 * tol *
                                       float(e.abs().max()))


def test_torch_half_operands_route(torch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's half-precision route (half operands kept half in the matrix products, no
    workspace), run on CPU: the same values and gradients as the float32 route."""
    from kldiv.backends import torch_fused_chunks

    d = _data(17)
    bf = torch.bfloat16
    results = []
    half_products = []
    real_mm = torch_fused_chunks._mm

    def spy(a: Any, b: Any, cd: Any) -> Any:
        half_products.append(bf in (a.dtype, b.dtype))
        return real_mm(a, b, cd)

    monkeypatch.setattr(torch_fused_chunks, "_mm", spy)
    for keep_half in (False, True):
        if keep_half:
            monkeypatch.setattr(torch_fused_chunks, "_operand",
                                lambda x, cd: x if x is None or x.dtype in (bf, cd) else x.to(cd))
            half_products.clear()
        h, w = (torch.tensor(d[k]).to(bf).requires_grad_() for k in ("h", "w"))
        th, tw = (torch.tensor(d[k]).to(bf) for k in ("th", "tw"))
        out = fused_linear_divergence(h, w, teacher_hidden=th, teacher_weight=tw,
                                      divergence="js", beta=BETA, chunk_size=3)
        results.append((out, *torch.autograd.grad(out, (h, w))))
    assert half_products and all(half_products)  # every product took half operands
    for a, e in zip(*results, strict=True):
        assert a.dtype == bf
        np.testing.assert_allclose(a.detach().double().numpy(), e.detach().double().numpy(),
                                   rtol=2e-2, atol=1e-3)


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


def test_torch_gradient_modes_agree(torch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients computed in the forward pass and recomputed in the backward are the same."""
    from kldiv.backends import torch_fused

    d = _data(6)
    grads = {}
    for mode in ("forward", "recompute"):
        monkeypatch.setattr(torch_fused, "GRAD_MODE", mode)
        h, w, b = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w", "b"))
        out = _call(h, w, b, _teacher(d, "hidden", torch.tensor), divergence="reverse_kl",
                    sample_weight=torch.tensor(d["sw"]), chunk_size=4)
        grads[mode] = torch.autograd.grad(out, (h, w, b))
    for a, e in zip(grads["forward"], grads["recompute"], strict=True):
        _close(a, e, 1e-12)


def test_torch_backward_twice_and_scaled(torch: Any) -> None:
    """A unit incoming gradient takes the stored gradients as they are; a second backward
    through the same result (``retain_graph=True``) accumulates the same gradients again,
    also after ``zero_grad(set_to_none=False)`` changed ``.grad`` in place; other incoming
    gradients scale them, any number of times; torch's ``gradcheck`` passes."""
    d = _data(16)
    h = torch.tensor(d["h"], requires_grad=True)
    w = torch.tensor(d["w"], requires_grad=True)

    def loss() -> Any:
        return fused_linear_divergence(h, w, torch.tensor(d["tl"]), chunk_size=3)

    out = loss()
    out.backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    out.backward(retain_graph=True)
    _close(h.grad, 2 * first[0], 1e-12)
    _close(w.grad, 2 * first[1], 1e-12)
    h.grad.zero_()
    w.grad.zero_()
    out.backward()
    _close(h.grad, first[0], 1e-12)
    _close(w.grad, first[1], 1e-12)
    with pytest.raises(RuntimeError, match="second time"):  # torch's own, graph released
        out.backward()
    out = loss()
    for _ in range(2):
        gh, gw = torch.autograd.grad(3.5 * out, (h, w), retain_graph=True)
        _close(gh, 3.5 * first[0], 1e-12)
        _close(gw, 3.5 * first[1], 1e-12)
    gh, gw = torch.autograd.grad(out, (h, w), retain_graph=True)
    gh.mul_(0)  # a returned gradient changed in place: the stored ones are intact
    gh, gw = torch.autograd.grad(out, (h, w))
    _close(gh, first[0], 1e-12)
    _close(gw, first[1], 1e-12)


def test_torch_unit_gradient_handed_over_without_copy(torch: Any) -> None:
    """``loss.backward()`` (graph released) takes the stored gradients as ``.grad`` without
    a copy: the weight gradient of a large vocabulary is not duplicated."""
    d = _data(3)
    h = torch.tensor(d["h"], requires_grad=True)
    w = torch.tensor(d["w"], requires_grad=True)
    out = fused_linear_divergence(h, w, torch.tensor(d["tl"]), chunk_size=3)
    stored = out.grad_fn.saved_tensors[1].data_ptr()
    out.backward()
    assert w.grad.data_ptr() == stored


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "js"])
@pytest.mark.parametrize("reduction", ["sum", "mean_with_sample_weight", "batchmean", "none"])
def test_torch_gradcheck(torch: Any, divergence: str, reduction: str) -> None:
    """torch's own ``gradcheck`` (it differentiates the same result several times)."""
    d = _data(5)
    h, w, b = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w", "b"))
    sw = torch.tensor(d["sw"])

    def f(h: Any, w: Any, b: Any) -> Any:
        out = fused_linear_divergence(h, w, torch.tensor(d["tl"]), student_bias=b,
                                      divergence=divergence, temperature=1.7,
                                      sample_weight=sw, reduction=reduction, chunk_size=2)
        return out.sum() if reduction == "none" else out

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_torch_teacher_is_constant(torch: Any) -> None:
    d = _data(7)
    h, w = torch.tensor(d["h"], requires_grad=True), torch.tensor(d["w"], requires_grad=True)
    tl = torch.tensor(d["tl"], requires_grad=True)
    th, tw = (torch.tensor(d[k], requires_grad=True) for k in ("th", "tw"))
    for reduction in ("mean_with_sample_weight", "none"):
        fused_linear_divergence(h, w, tl, reduction=reduction).sum().backward()
        fused_linear_divergence(h, w, teacher_hidden=th, teacher_weight=tw,
                                reduction=reduction).sum().backward()
    assert tl.grad is None and th.grad is None and tw.grad is None
    assert h.grad is not None and w.grad is not None


def test_torch_sample_weight_is_constant(torch: Any) -> None:
    d = _data(15)
    h = torch.tensor(d["h"], requires_grad=True)
    for reduction in ("mean_with_sample_weight", "none", "sum"):
        sw = torch.tensor(d["sw"], requires_grad=True)
        out = fused_linear_divergence(h, torch.tensor(d["w"]), torch.tensor(d["tl"]),
                                      sample_weight=sw, reduction=reduction)
        out.sum().backward()
        assert sw.grad is None and h.grad is not None


def test_torch_mixed_precision_products(torch: Any) -> None:
    """The half-operand matrix product (CUDA's route) accumulates and returns float32."""
    from kldiv.backends import torch_fused_chunks

    _mm = torch_fused_chunks._mm

    a, b = torch.randn(5, 300), torch.randn(300, 7)
    for lo in (torch.bfloat16, torch.float16):
        got = _mm(a.to(lo), b.to(lo), torch.float32)
        want = a.to(lo).double() @ b.to(lo).double()
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-3)
        got = _mm(a, b.to(lo), torch.float32)  # a float32 gradient against a half weight
        assert got.dtype == torch.float32
        # the float32 side may be rounded to half (CUDA) or not (the fallback): either way
        # the output is not
        want = a.double() @ b.to(lo).double()
        np.testing.assert_allclose(got.double().numpy(), want.numpy(),
                                   atol=2e-2 * float(want.abs().max()))


def test_torch_chunk_size_bounds_every_chunk(torch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No chunk of logits has more than chunk_size rows, forward and backward."""
    from kldiv.backends import torch_fused_chunks

    rows: list[int] = []
    real = torch_fused_chunks.chunk_terms_

    def spy(s: Any, *args: Any) -> Any:
        rows.append(s.shape[0])
        return real(s, *args)

    monkeypatch.setattr(torch_fused_chunks, "chunk_terms_", spy)
    d = _data(8, tokens=(3, 7))
    h = torch.tensor(d["h"], requires_grad=True)
    out = fused_linear_divergence(h, torch.tensor(d["w"]), torch.tensor(d["tl"]), chunk_size=4,
                                  reduction="none")
    out.sum().backward()
    assert rows == [4, 4, 4, 4, 4, 1] * 2  # 21 tokens: forward, then the backward's recompute


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


def test_torch_leading_axes_and_empty(torch: Any) -> None:
    d = _data(9, tokens=(2, 3, 2))
    h = torch.tensor(d["h"], requires_grad=True)
    out = fused_linear_divergence(h, torch.tensor(d["w"]), torch.tensor(d["tl"]),
                                  reduction="none", chunk_size=5)
    assert tuple(out.shape) == (2, 3, 2)
    empty = torch.zeros((0, 4, H), dtype=torch.float64, requires_grad=True)
    tl = torch.zeros((0, 4, V), dtype=torch.float64)
    w = torch.tensor(d["w"])
    assert fused_linear_divergence(empty, w, tl, reduction="none").shape == (0, 4)
    out = fused_linear_divergence(empty, w, tl)
    assert float(out.detach()) == 0.0
    out.backward()
    assert empty.grad is not None and empty.grad.shape == empty.shape


def test_torch_compile_graph_break(torch: Any) -> None:
    """Under torch.compile the call is one graph break: same values and gradients."""
    torch._dynamo.reset()
    d = _data(10)
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    tl = torch.tensor(d["tl"])

    def step(x: Any) -> Any:
        x = torch.tanh(x) * 2
        return fused_linear_divergence(x, head.weight, tl, student_bias=head.bias,
                                       divergence="js", chunk_size=3)

    x = torch.tensor(d["h"])
    eager = step(x)
    ge = torch.autograd.grad(eager, (head.weight, head.bias))
    compiled = torch.compile(step, backend="aot_eager")(x)
    gc = torch.autograd.grad(compiled, (head.weight, head.bias))
    _close(compiled.detach(), eager.detach(), 1e-12)
    for a, e in zip(gc, ge, strict=True):
        _close(a, e, 1e-12)
    torch._dynamo.reset()


# ------------------------------------------------------------- torch: call-time values (issue 9)
FOREIGN = ["sample_weight", "sample_weight_from_numpy", "teacher_logits", "teacher_hidden",
           "teacher_weight", "teacher_bias", "student_hidden", "student_weight",
           "student_bias"]


@pytest.mark.parametrize("reduction,mode", [("none", "forward"), ("sum", "forward"),
                                            ("mean_with_sample_weight", "forward"),
                                            ("sum", "recompute")])
@pytest.mark.parametrize("foreign", FOREIGN)
def test_torch_gradient_uses_call_time_values(torch: Any, monkeypatch: pytest.MonkeyPatch,
                                              foreign: str, reduction: str, mode: str) -> None:
    """An input over memory torch does not own (a NumPy sample weight, ``torch.from_numpy``)
    refilled between the call and ``backward()`` (a reused loader buffer) does not change the
    gradient: autograd's contract is the values at call time."""
    from kldiv.backends import torch_fused

    monkeypatch.setattr(torch_fused, "GRAD_MODE", mode)
    d = _data(21)
    form = "logits" if foreign == "teacher_logits" else "hidden"
    key = {"sample_weight": "sw", "sample_weight_from_numpy": "sw", "teacher_logits": "tl",
           "teacher_hidden": "th", "teacher_weight": "tw", "teacher_bias": "tb",
           "student_hidden": "h", "student_weight": "w", "student_bias": "b"}[foreign]

    def run(refill: bool) -> tuple[Any, ...]:
        buf = d[key].copy()  # the foreign memory
        arrays = {k: torch.tensor(v) for k, v in d.items()}
        arrays[key] = torch.from_numpy(buf)
        h, w, b = (arrays[k].requires_grad_() for k in ("h", "w", "b"))
        teacher = ({"logits": arrays["tl"]} if form == "logits" else
                   {"hidden": arrays["th"], "weight": arrays["tw"], "bias": arrays["tb"]})
        sw = buf if foreign == "sample_weight" else arrays["sw"]
        out = _call(h, w, b, teacher, divergence="js", beta=BETA, sample_weight=sw,
                    reduction=reduction, chunk_size=4)
        if refill:
            buf[...] = np.random.default_rng(1).random(buf.shape) * 3
        cot = torch.linspace(0.5, 1.5, math.prod(out.shape), dtype=out.dtype).reshape(out.shape)
        return (out.detach(), *torch.autograd.grad(out, (h, w, b), cot))

    for got, want in zip(run(refill=True), run(refill=False), strict=True):
        _close(got, want, 1e-12)


# ------------------------------------------------------ torch: every autograd mode (issue 9)
def _oracle(torch: Any, h: Any, w: Any, tl: Any, reduction: str, div: str = "js") -> Any:
    import array_api_compat

    xp = array_api_compat.array_namespace(tl)
    per = plain(xp, h, w, None, {"logits": tl}, div, BETA, 1.3)
    return per if reduction == "none" else per.mean()


def _fused(h: Any, w: Any, tl: Any, reduction: str, div: str = "js") -> Any:
    return fused_linear_divergence(h, w, tl, divergence=div, beta=BETA, temperature=1.3,
                                   reduction=reduction, chunk_size=3)


REDUCTIONS = ["none", "mean"]


_TORCH_JIT_DEPRECATION = "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
"""torch's own forward-mode decompositions, loaded at their first use, call it."""


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_forward_mode_ad(torch: Any, reduction: str, requires_grad: bool) -> None:
    """``torch.autograd.forward_ad``: the tangent of the result is the oracle's (with or
    without a reverse-mode graph at the same time), for tangents on every student input."""
    import torch.autograd.forward_ad as fwad

    d = _data(22, masked="both")
    tl = torch.tensor(d["tl"])
    h, w = (torch.tensor(d[k]) for k in ("h", "w"))
    th, tw = torch.randn_like(h), torch.randn_like(w)
    results = []
    for f in (lambda h, w: _fused(h, w, tl, reduction),
              lambda h, w: _oracle(torch, h, w, tl, reduction)):
        with fwad.dual_level():
            hd = fwad.make_dual(h.clone().requires_grad_(requires_grad), th)
            value, tangent = fwad.unpack_dual(f(hd, fwad.make_dual(w.clone(), tw)))
            assert tangent is not None
            results.append((value.detach(), tangent.detach()))
            if requires_grad:
                results.append(torch.autograd.grad(value.sum(), hd))
    for got, want in zip(results[: len(results) // 2], results[len(results) // 2:],
                         strict=True):
        for a, e in zip(got, want, strict=True):
            assert torch.isfinite(a).all()
            _close(a, e)


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("mode", ["forward", "recompute"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_backward_of_a_dual_cotangent(torch: Any, monkeypatch: pytest.MonkeyPatch,
                                            reduction: str, mode: str) -> None:
    """A backward pass whose incoming gradient carries a forward-mode tangent gives the
    gradient's tangent (linear in the incoming gradient) as the oracle does."""
    import torch.autograd.forward_ad as fwad

    from kldiv.backends import torch_fused

    monkeypatch.setattr(torch_fused, "GRAD_MODE", mode)
    d = _data(29)
    tl = torch.tensor(d["tl"])
    h, w = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w"))
    results = []
    for out in (_fused(h, w, tl, reduction), _oracle(torch, h, w, tl, reduction)):
        v = torch.linspace(0.2, 1.7, out.numel(), dtype=out.dtype).reshape(out.shape)
        with fwad.dual_level():
            cot = fwad.make_dual(torch.ones_like(out) / 3, v)
            results.append([fwad.unpack_dual(g) for g in torch.autograd.grad(out, (h, w), cot)])
    for (value, tangent), (ref_value, ref_tangent) in zip(*results, strict=True):
        assert tangent is not None
        _close(value, ref_value)
        _close(tangent, ref_tangent)


@pytest.mark.parametrize("mode", ["forward", "recompute"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_batched_backward(torch: Any, monkeypatch: pytest.MonkeyPatch, reduction: str,
                                mode: str) -> None:
    """``autograd.grad(..., is_grads_batched=True)`` and ``jacobian(vectorize=True)``: the
    oracle's batched gradients."""
    from kldiv.backends import torch_fused

    monkeypatch.setattr(torch_fused, "GRAD_MODE", mode)
    d = _data(23)
    tl = torch.tensor(d["tl"])
    h, w = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w"))
    out, ref = _fused(h, w, tl, reduction), _oracle(torch, h, w, tl, reduction)
    cots = torch.rand((4, *out.shape), dtype=out.dtype)
    got = torch.autograd.grad(out, (h, w), cots, is_grads_batched=True, retain_graph=True)
    want = torch.autograd.grad(ref, (h, w), cots, is_grads_batched=True)
    for a, e in zip(got, want, strict=True):
        assert a.shape == (4, *e.shape[1:])
        _close(a, e)
    jac = torch.autograd.functional.jacobian(lambda w: _fused(h.detach(), w, tl, reduction), w,
                                             vectorize=True)
    jref = torch.autograd.functional.jacobian(
        lambda w: _oracle(torch, h.detach(), w, tl, reduction), w, vectorize=True)
    _close(jac, jref)


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_func_transforms(torch: Any, reduction: str) -> None:
    """``torch.func.grad``/``jacrev``/``jvp``/``vmap``/``hessian`` give the oracle's values."""
    from torch import func

    d = _data(24, masked="both")
    tl = torch.tensor(d["tl"])
    h, w = (torch.tensor(d[k]) for k in ("h", "w"))

    def f(h: Any, w: Any, tl: Any = tl) -> Any:
        return _fused(h, w, tl, reduction)

    def g(h: Any, w: Any, tl: Any = tl) -> Any:
        return _oracle(torch, h, w, tl, reduction)

    def total(fn: Any) -> Any:
        return lambda h, w: fn(h, w).sum()

    checks = [
        (func.grad(total(f), argnums=(0, 1))(h, w), func.grad(total(g), argnums=(0, 1))(h, w)),
        (func.jacrev(f, argnums=1)(h, w), func.jacrev(g, argnums=1)(h, w)),
        (func.jvp(f, (h, w), (torch.ones_like(h), w / 3)),
         func.jvp(g, (h, w), (torch.ones_like(h), w / 3))),
        (func.hessian(lambda w: f(h, w).sum())(w), func.hessian(lambda w: g(h, w).sum())(w)),
    ]
    hb = torch.stack([h, 2 * h, -h])
    tlb = torch.stack([tl, tl.flip(0), tl / 2])
    checks.append((func.vmap(f, in_dims=(0, None, 0))(hb, w, tlb),
                   func.vmap(g, in_dims=(0, None, 0))(hb, w, tlb)))
    checks.append((func.vmap(func.grad(total(f)), in_dims=(0, None))(hb, w),
                   func.vmap(func.grad(total(g)), in_dims=(0, None))(hb, w)))
    for got, want in checks:
        got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
        for a, e in zip(got, want, strict=True):
            assert a.shape == e.shape and torch.isfinite(a).all()
            _close(a, e)


@pytest.mark.parametrize("masked,divs", [("both", DIVS), ("teacher", ["kl", "js"]),
                                         ("student", ["reverse_kl", "js"])])
def test_torch_func_grad_every_divergence(torch: Any, masked: str, divs: list[str]) -> None:
    """The differentiable route under ``torch.func.grad``: every divergence, both teacher
    forms, biases, a temperature, ``-inf`` logits on either side: the oracle's finite
    gradients."""
    import array_api_compat
    from torch import func

    d = _data(30, masked=masked)
    args = tuple(torch.tensor(d[k]) for k in ("h", "w", "b"))
    xp = array_api_compat.array_namespace(args[0])
    for div in divs:
        for form in ("logits", "hidden"):
            teacher = _teacher(d, form, torch.tensor)

            def ours(h: Any, w: Any, b: Any, div: str = div, teacher: Any = teacher) -> Any:
                return _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=1.3,
                             chunk_size=4)

            def ref(h: Any, w: Any, b: Any, div: str = div, teacher: Any = teacher) -> Any:
                return plain(xp, h, w, b, teacher, div, BETA, 1.3).mean()

            got = func.grad(ours, argnums=(0, 1, 2))(*args)
            for a, e in zip(got, func.grad(ref, argnums=(0, 1, 2))(*args), strict=True):
                assert torch.isfinite(a).all()
                _close(a, e)


@pytest.mark.parametrize("mode", ["forward", "recompute"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_double_backward_is_a_clear_error(torch: Any, monkeypatch: pytest.MonkeyPatch,
                                                reduction: str, mode: str) -> None:
    """``create_graph=True`` (a second derivative through autograd) is refused clearly,
    never answered with a gradient that silently has no graph (a gradient penalty would lose
    the divergence's second-order terms); the first-order gradient is unaffected."""
    from kldiv.backends import torch_fused

    monkeypatch.setattr(torch_fused, "GRAD_MODE", mode)
    d = _data(25)
    tl = torch.tensor(d["tl"])
    h, w = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w"))
    out = _fused(h, w, tl, reduction).sum() + (h ** 2).sum()
    with pytest.raises(RuntimeError, match=r"create_graph=True.*torch\.func"):
        torch.autograd.grad(out, (h, w), create_graph=True)
    out = _fused(h, w, tl, reduction).sum()
    for a, e in zip(torch.autograd.grad(out, (h, w)),
                    torch.autograd.grad(_oracle(torch, h, w, tl, reduction).sum(), (h, w)),
                    strict=True):
        _close(a, e)


# ------------------------------------------------------------------------------------ JAX
@pytest.fixture
def jax() -> Any:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax


@pytest.mark.parametrize("div,form,bias,temp,chunk", CASES)
def test_jax_values_and_gradients(jax: Any, div: str, form: str, bias: bool, temp: float,
                                  chunk: int | None) -> None:
    jnp = jax.numpy
    d = _data(11)
    teacher = _teacher(d, form, jnp.asarray)
    sw = jnp.asarray(d["sw"])

    def ours(h: Any, w: Any, b: Any) -> Any:
        return _call(h, w, b if bias else None, teacher, divergence=div, beta=BETA,
                     temperature=temp, sample_weight=sw, chunk_size=chunk)

    def ref(h: Any, w: Any, b: Any) -> Any:
        return reduce(jnp, plain(jnp, h, w, b if bias else None, teacher, div, BETA, temp), sw,
                      "mean_with_sample_weight")

    args = tuple(jnp.asarray(d[k]) for k in ("h", "w", "b"))
    _close(ours(*args), ref(*args))
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*args)
    want = jax.grad(ref, argnums=(0, 1, 2))(*args)
    for g, e in zip(got, want, strict=True):
        _close(g, e)
    # per-token results: the backward rescans with the incoming cotangent
    cot = jnp.asarray(np.random.default_rng(0).random(TOKENS))

    def none(f: Any) -> Any:
        return jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1))

    per = jax.jit(none(lambda h, w, b: _call(h, w, b if bias else None, teacher, divergence=div,
                                               beta=BETA, temperature=temp, chunk_size=chunk,
                                               reduction="none")))(*args)
    per_ref = none(lambda h, w, b: plain(jnp, h, w, b if bias else None, teacher, div, BETA,
                                         temp))(*args)
    for g, e in zip(per, per_ref, strict=True):
        _close(g, e)


def test_jax_masks_half_and_minus_inf(jax: Any) -> None:
    jnp = jax.numpy
    d = _data(12, masked="both")
    teacher = _teacher(d, "hidden", jnp.asarray)
    args = tuple(jnp.asarray(d[k]) for k in ("h", "w", "b"))
    # all masked: 0 with zero, finite gradients
    g = jax.grad(lambda h, w, b: _call(h, w, b, teacher, sample_weight=jnp.zeros(TOKENS)),
                 argnums=(0, 1, 2))(*args)
    assert all(bool(jnp.all(x == 0)) for x in g)
    for div in DIVS:
        got = jax.grad(lambda h, w, b, div=div: _call(h, w, b, teacher, divergence=div,
                                                     beta=BETA, chunk_size=4),
                       argnums=(0, 1, 2))(*args)
        want = jax.grad(lambda h, w, b, div=div: plain(jnp, h, w, b, teacher, div, BETA,
                                                       1.0).mean(), argnums=(0, 1, 2))(*args)
        for a, e in zip(got, want, strict=True):
            assert bool(jnp.all(jnp.isfinite(a)))
            _close(a, e)
    h16 = args[0].astype(jnp.bfloat16)
    out = _call(h16, args[1].astype(jnp.bfloat16), None, {"logits": jnp.asarray(d["tl"])},
                divergence="kl", chunk_size=3)
    assert out.dtype == jnp.bfloat16
    ref = plain(jnp, h16.astype(jnp.float64), args[1].astype(jnp.bfloat16).astype(jnp.float64),
                None, {"logits": jnp.asarray(d["tl"])}, "kl", BETA, 1.0).mean()
    np.testing.assert_allclose(float(out), float(ref), rtol=1.6e-2)


def test_jax_temporaries_do_not_grow_with_tokens(jax: Any) -> None:
    """XLA's compiled memory plan: the temporaries of value_and_grad grow with the tokens only
    by the per-token outputs (``dh``, the losses), never by a ``(tokens, V)`` array."""
    jnp = jax.numpy
    v, hid, chunk = 512, 8, 16

    def temp_bytes(n: int) -> int:
        def loss(h: Any, w: Any, t: Any) -> Any:
            return fused_linear_divergence(h, w, t, divergence="js", chunk_size=chunk)

        args = (jnp.zeros((n, hid), jnp.float32), jnp.zeros((v, hid), jnp.float32),
                jnp.zeros((n, v), jnp.float32))
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this JAX backend gives no memory analysis")
        return int(analysis.temp_size_in_bytes)

    small, large = temp_bytes(4 * chunk), temp_bytes(64 * chunk)
    extra_tokens = 60 * chunk
    assert large - small < extra_tokens * v * 4 / 8, (small, large)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean_with_sample_weight"])
@pytest.mark.parametrize("source", ["torch", "numpy"])
def test_jax_sample_weight_keeps_call_time_values(jax: Any, source: str,
                                                  reduction: str) -> None:
    """A torch or NumPy sample weight (the one input that crosses libraries) refilled after
    the call, before ``jax.vjp``'s backward runs, changes neither the value nor the
    gradient: kldiv's conversion copies it into memory JAX owns and waits for the copy
    (JAX dispatches asynchronously; a DLPack import of torch memory aliases it)."""
    torch = pytest.importorskip("torch") if source == "torch" else None
    jnp = jax.numpy
    d = _data(26)
    w, tl = jnp.asarray(d["w"]), jnp.asarray(d["tl"])
    results = []
    for refill in (True, False):
        sw = d["sw"].copy()
        weight = torch.from_numpy(sw) if torch is not None else sw

        def f(h: Any, weight: Any = weight) -> Any:
            return fused_linear_divergence(h, w, tl, sample_weight=weight, divergence="js",
                                           beta=BETA, reduction=reduction, chunk_size=3)

        out, vjp = jax.vjp(f, jnp.asarray(d["h"]))
        if refill:
            sw[...] = 7.0
        results.append((out, *vjp(jnp.ones_like(out))))
    for a, e in zip(*results, strict=True):
        _close(a, e, 1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean_with_sample_weight"])
def test_jax_vmap(jax: Any, reduction: str) -> None:
    """``jax.vmap`` over a batch axis of the inputs (hidden, teacher, weights; the matrix),
    alone and with ``jax.grad`` inside or outside it, gives the oracle's values."""
    jnp = jax.numpy
    d = _data(27)
    rng = np.random.default_rng(27)
    hb = jnp.asarray(rng.standard_normal((3, *TOKENS, H)))
    tlb = jnp.asarray(rng.standard_normal((3, *TOKENS, V)))
    swb = jnp.asarray(rng.random((3, *TOKENS)))
    w = jnp.asarray(d["w"])

    def ours(h: Any, w: Any, tl: Any, sw: Any) -> Any:
        return fused_linear_divergence(h, w, tl, sample_weight=sw, divergence="js", beta=BETA,
                                       reduction=reduction, chunk_size=3)

    def ref(h: Any, w: Any, tl: Any, sw: Any) -> Any:
        return reduce(jnp, plain(jnp, h, w, None, {"logits": tl}, "js", BETA, 1.0), sw,
                      reduction)

    def total(f: Any) -> Any:
        return lambda *a: jnp.sum(f(*a))

    axes = (0, None, 0, 0)
    for f, e in (
        (jax.vmap(ours, axes), jax.vmap(ref, axes)),
        (jax.jit(jax.vmap(jax.grad(total(ours), argnums=(0, 1)), axes)),
         jax.vmap(jax.grad(total(ref), argnums=(0, 1)), axes)),
        (jax.grad(total(jax.vmap(ours, axes)), argnums=(0, 1)),
         jax.grad(total(jax.vmap(ref, axes)), argnums=(0, 1))),
    ):
        for a, b in zip(jax.tree_util.tree_leaves(f(hb, w, tlb, swb)),
                        jax.tree_util.tree_leaves(e(hb, w, tlb, swb)), strict=True):
            assert a.shape == b.shape
            _close(a, b)
    wb = jnp.stack([w, w / 2])  # a batch of output matrices
    _close(jax.vmap(ours, (None, 0, None, None))(hb[0], wb, tlb[0], swb[0]),
           jax.vmap(ref, (None, 0, None, None))(hb[0], wb, tlb[0], swb[0]))


def test_jax_forward_mode_is_a_clear_error(jax: Any) -> None:
    """The JAX route is a ``jax.custom_vjp`` (reverse mode, memory bounded by the chunks):
    ``jax.jvp`` / ``jax.jacfwd`` are refused by JAX with a clear TypeError, never answered
    wrongly; ``jax.hessian`` (forward over reverse) gives the oracle's."""
    jnp = jax.numpy
    d = _data(28)
    h, w, tl = (jnp.asarray(d[k]) for k in ("h", "w", "tl"))

    def f(h: Any) -> Any:
        return fused_linear_divergence(h, w, tl, chunk_size=3)

    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (h,), (jnp.ones_like(h),))
    hess = jax.hessian(f)(h)
    want = jax.hessian(lambda h: plain(jnp, h, w, None, {"logits": tl}, "kl", BETA, 1.0)
                       .mean())(h)
    _close(hess, want)


# ---------------------------------------------------------------------- forward-only libraries
@pytest.mark.parametrize("member", [b.pytest_param() for b in (Backend.NUMPY, Backend.ARRAY_API_STRICT, Backend.CUPY)])
@pytest.mark.parametrize("div", DIVS)
def test_forward_only_libraries(member: Backend, div: str) -> None:
    b_ = member.handle()
    d = _data(13, masked="both")
    for form in ("logits", "hidden"):
        teacher = _teacher(d, form, lambda a: b_.asarray(a, "float64"))
        h, w, b = (b_.asarray(d[k], "float64") for k in ("h", "w", "b"))
        for reduction, chunk in (("none", 3), ("batchmean", 4), ("mean_with_sample_weight", None)):
            out = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=1.8,
                        sample_weight=b_.asarray(d["sw"], "float64"), reduction=reduction,
                        chunk_size=chunk)
            assert b_.is_native(out)
            ref = reduce(np, plain(np, d["h"], d["w"], d["b"], _teacher(d, form, np.asarray),
                                   div, BETA, 1.8), d["sw"], reduction)
            _close(b_.to_numpy(out), ref)
    out32 = _call(b_.asarray(d["h"], "float32"), b_.asarray(d["w"], "float32"), None,
                  {"logits": b_.asarray(d["tl"], "float32")}, chunk_size=3)
    assert out32.dtype == b_.dtype("float32")


def test_numpy_forward_memory_is_one_chunk() -> None:
    """NumPy's traced peak: one chunk's temporaries, no copy of the weight or the teacher's
    logits, nothing of size (tokens, V)."""
    import tracemalloc

    rng = np.random.default_rng(18)
    n, hid, v, chunk = 256, 256, 4096, 8
    h = rng.standard_normal((n, hid), dtype=np.float32)
    w = rng.standard_normal((v, hid), dtype=np.float32) / 16
    t = rng.standard_normal((n, v), dtype=np.float32)
    fused_linear_divergence(h, w, t, divergence="js", chunk_size=chunk)  # warm-up
    tracemalloc.start()
    fused_linear_divergence(h, w, t, divergence="js", chunk_size=chunk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24 * chunk * v * 4 < w.nbytes, peak  # w: 4 MiB, t: 4 MiB


# ---------------------------------------------------------------------------- validation
def _np_inputs() -> dict[str, Any]:
    d = _data(14)
    return {"h": d["h"], "w": d["w"], "tl": d["tl"], "th": d["th"], "tw": d["tw"]}


BAD = [
    ({"w": np.zeros((V, H + 1))}, {}, ValueError, r"student_weight must have shape \(V, H\)"),
    ({"w": np.zeros(V)}, {}, ValueError, r"student_weight must have shape"),
    ({}, {"student_bias": np.zeros(V + 1)}, ValueError, r"student_bias must have shape \(11,\)"),
    ({"tl": np.zeros((2, 5, V + 2))}, {}, ValueError, r"teacher_logits must have shape \(2, 5, 11\)"),
    ({"tl": np.zeros((10, V))}, {}, ValueError, r"got \(10, 11\)"),
    ({"tl": None}, {}, ValueError, "not both and not neither"),
    ({}, {"teacher_hidden": "th", "teacher_weight": "tw"}, ValueError, "not both"),
    ({"tl": None}, {"teacher_hidden": "th"}, ValueError, "go together"),
    ({"tl": None}, {"teacher_hidden": np.zeros((2, 4, HT)), "teacher_weight": "tw"}, ValueError,
     r"teacher_hidden must have shape \(2, 5, H_t\)"),
    ({"tl": None}, {"teacher_hidden": "th", "teacher_weight": np.zeros((V, HT + 1))}, ValueError,
     r"teacher_weight must have shape \(11, 5\)"),
    ({}, {"teacher_bias": np.zeros(V)}, ValueError, "teacher_bias goes with teacher_hidden"),
    ({}, {"divergence": "kld"}, ValueError, "Invalid divergence 'kld'"),
    ({}, {"divergence": "js", "beta": 0.0}, ValueError, "open interval.*reverse_kl"),
    ({}, {"divergence": "js", "beta": 1}, ValueError, "open interval"),
    ({}, {"divergence": "js", "beta": 1.5}, ValueError, "open interval"),
    ({}, {"beta": "half"}, TypeError, "beta must be a real number"),
    ({}, {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({}, {"temperature": -1}, ValueError, "temperature"),
    ({}, {"temperature": math.inf}, ValueError, "temperature"),
    ({}, {"temperature": 10**400}, ValueError, "temperature=1000.*out of the range of a float"),
    ({}, {"divergence": "js", "beta": -10**400}, ValueError, "beta=.*out of the range"),
    ({}, {"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ({}, {"chunk_size": 2.5}, TypeError, "chunk_size must be a positive int"),
    ({}, {"chunk_size": True}, TypeError, "chunk_size"),
    ({}, {"reduction": "avg"}, ValueError, "Invalid reduction 'avg'.*'batchmean'"),
    ({"h": [[1.0] * H]}, {}, TypeError, "student_hidden must be an array"),
    ({"h": np.zeros((2, 5, H), dtype=np.int64)}, {}, TypeError, "floating dtype"),
    ({"h": np.array(1.0)}, {}, ValueError, "at least one axis"),
    ({"h": np.float64(1.0)}, {}, TypeError, "student_hidden must be an array"),
    ({}, {"sample_weight": np.ones(3)}, ValueError, "does not broadcast"),
    ({"w": np.zeros((0, H)), "tl": np.zeros((2, 5, 0))}, {}, ValueError, r"no rows \(V = 0\)"),
    ({}, {"reduction": 3}, ValueError, r"Invalid reduction 3\. Expected one of: 'auto', 'none', "
     r"'sum', 'sum_over_batch_size', 'mean', 'mean_with_sample_weight', 'batchmean' or None\."),
]


@pytest.mark.parametrize("change,kwargs,exc,match", BAD)
def test_validation(change: dict[str, Any], kwargs: dict[str, Any], exc: type, match: str) -> None:
    x = {**_np_inputs(), **change}
    kwargs = {k: x[v] if isinstance(v, str) and v in x else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        fused_linear_divergence(x["h"], x["w"], x["tl"], **kwargs)


def test_validation_mixed_libraries_and_devices(torch: Any) -> None:
    x = _np_inputs()
    with pytest.raises(TypeError, match="one library: student_hidden is torch, teacher_logits "
                                        "is numpy"):
        fused_linear_divergence(torch.tensor(x["h"]), torch.tensor(x["w"]), x["tl"])
    with pytest.raises(TypeError, match="one library"):
        fused_linear_divergence(torch.tensor(x["h"]), x["w"], torch.tensor(x["tl"]))
    with pytest.raises(ValueError, match="one device"):
        fused_linear_divergence(torch.tensor(x["h"]), torch.tensor(x["w"]),
                                torch.tensor(x["tl"], device="meta"))


def test_validation_does_not_depend_on_earlier_calls() -> None:
    """Python and NumPy scalars are refused as arrays the same way whatever kldiv has seen
    before. kldiv's per-type namespace cache is filled by other calls (a metric accumulating
    NumPy totals asks for the namespace of a NumPy scalar); once it held ``np.float64`` (a
    Python float subclass), ``student_hidden=np.float64(1.0)`` passed as an array."""
    from kldiv import _namespace

    array_namespace = _namespace.array_namespace

    x = _np_inputs()
    for scalar in (np.float64(1.0), np.float32(1.0), 1.0):
        array_namespace(np.asarray(scalar)[()])  # what an earlier call may have cached
        with pytest.raises(TypeError, match="student_hidden must be an array"):
            fused_linear_divergence(scalar, x["w"], x["tl"])
        with pytest.raises(TypeError, match="teacher_logits must be an array"):
            fused_linear_divergence(x["h"], x["w"], scalar)
        with pytest.raises(TypeError, match="student_bias must be an array"):
            fused_linear_divergence(x["h"], x["w"], x["tl"], student_bias=scalar)


_TF_SCRIPT = r"""
import importlib.util
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401  (TensorFlow before Triton in one process aborts)
import numpy as np, tensorflow as tf
from kldiv import fused_linear_divergence
rng = np.random.default_rng(0)
h, w, t = rng.random((4, 3)), rng.random((5, 3)), rng.random((4, 5))
for args in ((tf.constant(h), tf.constant(w), tf.constant(t)),
             (tf.Variable(h), tf.constant(w), tf.constant(t))):
    try:
        fused_linear_divergence(*args)
    except TypeError as e:
        assert "does not support tensorflow arrays" in str(e), e
    else:
        raise AssertionError("no error")
# a TensorFlow sample weight with NumPy arrays is converted, as for the loss classes
out = fused_linear_divergence(h, w, t, sample_weight=tf.constant(np.ones(4)))
assert abs(float(out) - float(fused_linear_divergence(h, w, t))) < 1e-12
print("TF-OK")
"""


def test_tensorflow_tensors_are_a_clear_error() -> None:
    """With TensorFlow loaded its tensors pass kldiv's array check (its loss functions take
    them), but the fused path has no TensorFlow route: a clear TypeError, not an
    AttributeError from inside the chunk loop. A subprocess: TensorFlow stays out of this
    one."""
    pytest.importorskip("tensorflow")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(root, "src"),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _TF_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "TF-OK" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- loss class
def test_loss_class_config_pickle_and_call() -> None:
    loss = FusedLinearDivergence("js", beta=0.25, temperature=2.0, reduction="batchmean",
                                 chunk_size=4, name="distill")
    cfg = loss.get_config()
    assert cfg == {"divergence": "js", "beta": 0.25, "temperature": 2.0,
                   "reduction": "batchmean", "chunk_size": 4, "name": "distill"}
    assert FusedLinearDivergence.from_config(cfg) == loss
    assert pickle.loads(pickle.dumps(loss)) == loss
    assert "FusedLinearDivergence(divergence='js'" in repr(loss)
    assert FusedLinearDivergence() != loss
    with pytest.raises(TypeError, match="Unknown FusedLinearDivergence config keys"):
        FusedLinearDivergence.from_config({**cfg, "fn": "x"})
    with pytest.raises(ValueError, match="open interval"):
        FusedLinearDivergence("js", beta=1.0)
    x = _np_inputs()
    _close(loss(x["h"], x["w"], x["tl"], sample_weight=np.ones(TOKENS)),
           fused_linear_divergence(x["h"], x["w"], x["tl"], divergence="js", beta=0.25,
                                   temperature=2.0, reduction="batchmean",
                                   sample_weight=np.ones(TOKENS)))
    _close(loss(x["h"], x["w"], teacher_hidden=x["th"], teacher_weight=x["tw"]),
           reduce(np, plain(np, x["h"], x["w"], None, {"hidden": x["th"], "weight": x["tw"]},
                            "js", 0.25, 2.0), None, "batchmean"))


# -------------------------------------------------------------------- Triton, interpreted
_TRITON_SCRIPT = r"""
import math, numpy as np, torch, triton
from kldiv.backends import torch_fused_chunks, torch_fused_slabs, triton_fused
from kldiv import fused_linear_divergence, _fused_linear_math
from tests.test_fused_linear import _data, _teacher, _call, plain, reduce, BETA, DIVS
import array_api_compat
torch_fused_chunks.FORCE_ROUTE = "triton"
calls = []
real_chunk = triton_fused.chunk
def spy(*a, **k):
    calls.append(1)
    return real_chunk(*a, **k)
triton_fused.chunk = spy
slab_calls = []
real_slab = triton_fused.slab_grad
def slab_spy(*a, **k):
    slab_calls.append(1)
    return real_slab(*a, **k)
triton_fused.slab_grad = slab_spy
torch_fused_slabs.SLAB_COLUMNS = 8  # slabs that do not divide V
for mode, masked in (("chunks", ""), ("chunks", "both"), ("slabs", "both")):
    torch_fused_slabs.WEIGHT_GRAD = mode
    d = _data(20, masked=masked)
    for div in DIVS:
        for form in ("logits", "hidden"):
            for temp, chunk in ((1.0, 3), (1.9, 4)):
                # token tiles of 2 rows for the slab pass (float32: 12 bytes an entry)
                torch_fused_slabs.SLAB_TILE_BYTES = 2 * 8 * 12 if chunk == 4 else None
                f32 = lambda a: torch.tensor(a, dtype=torch.float32)
                h, w, b = (f32(d[k]).requires_grad_() for k in ("h", "w", "b"))
                teacher = _teacher(d, form, f32)
                sw = f32(d["sw"])
                out = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=temp,
                            sample_weight=sw, chunk_size=chunk)
                got = torch.autograd.grad(out, (h, w, b))
                d64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
                t64 = {k: None if v is None else v.double() for k, v in teacher.items()}
                xp = array_api_compat.array_namespace(d64[0])
                ref = reduce(xp, plain(xp, *d64, t64, div, BETA, temp), sw.double(),
                             "mean_with_sample_weight")
                want = torch.autograd.grad(ref, d64)
                assert abs(float(out) - float(ref)) < 1e-5 * (1 + abs(float(ref))), (div, form)
                for g, e in zip(got, want):
                    assert torch.isfinite(g).all(), (div, form, masked)
                    np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=1e-4,
                                               atol=1e-5)
                per = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=temp,
                            reduction="none", chunk_size=chunk)
                per_ref = plain(xp, *d64, t64, div, BETA, temp)
                np.testing.assert_allclose(per.detach().double().numpy(),
                                           per_ref.detach().numpy(), rtol=1e-5, atol=1e-6)
# a batched backward of per-token results (is_grads_batched): linear_backward on this route
d = _data(21)
f32 = lambda a: torch.tensor(a, dtype=torch.float32)
h, w = (f32(d[k]).requires_grad_() for k in ("h", "w"))
tl = f32(d["tl"])
per = _call(h, w, None, {"logits": tl}, divergence="js", beta=BETA, temperature=1.3,
            reduction="none", chunk_size=3)
cots = torch.rand((3, *per.shape))
got = torch.autograd.grad(per, (h, w), cots, is_grads_batched=True)
d64 = [x.detach().double().requires_grad_() for x in (h, w)]
xp = array_api_compat.array_namespace(d64[0])
ref = plain(xp, *d64, None, {"logits": tl.double()}, "js", BETA, 1.3)
want = torch.autograd.grad(ref, d64, cots.double(), is_grads_batched=True)
for g, e in zip(got, want):
    np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=1e-4, atol=1e-5)
# the kernel alone: a strided teacher slice in bfloat16, no gradient
s = torch.randn(5, 300)
t = torch.randn(5, 600, dtype=torch.bfloat16)[:, ::2]
from kldiv import _fused_linear_math
loss = triton_fused.chunk(s.clone(), t, None, None, None, _fused_linear_math.Plan("js", 0.4, 1.0, 5), False)
xp = array_api_compat.array_namespace(s)
want = _fused_linear_math.chunk_terms(xp, s.double(), t.double(), "js", 0.4, False)[0]
np.testing.assert_allclose(loss.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
# per-token scales that are stride-0 views (the gradient of a sum; a scalar sample weight
# with reduction="sum") and a strided bias: the kernels read contiguous copies
for mode in ("chunks", "slabs"):
    torch_fused_slabs.WEIGHT_GRAD = mode
    d = _data(24)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)
    h, w = (f32(d[k]).requires_grad_() for k in ("h", "w"))
    b = f32(np.stack([d["b"], d["b"]], -1))[:, 0].requires_grad_()  # stride 2
    tl = f32(d["tl"])
    d64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    xp = array_api_compat.array_namespace(d64[0])
    ref_per = plain(xp, *d64, {"logits": tl.double()}, "js", BETA, 1.0)
    for kind in ("none-sum", "sum-scalar"):
        if kind == "none-sum":
            out = _call(h, w, b, {"logits": tl}, divergence="js", beta=BETA,
                        reduction="none", chunk_size=3).sum()
            ref = ref_per.sum()
        else:
            out = _call(h, w, b, {"logits": tl}, divergence="js", beta=BETA,
                        reduction="sum", sample_weight=np.float32(0.5), chunk_size=3)
            ref = 0.5 * ref_per.sum()
        got = torch.autograd.grad(out, (h, w, b))
        want = torch.autograd.grad(ref, d64, retain_graph=True)
        assert abs(float(out) - float(ref)) < 1e-4 * (1 + abs(float(ref))), (mode, kind)
        for g, e in zip(got, want):
            np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=1e-4, atol=1e-5)
# bfloat16 weights kept bfloat16 in the products (CUDA's half route): by slabs, the slab
# kernel stores a bfloat16 gradient; the same as by chunks to bfloat16 rounding
bf = torch.bfloat16
real_operand = torch_fused_chunks._operand
torch_fused_chunks._operand = lambda x, cd: x if x is None or x.dtype in (bf, cd) else x.to(cd)
d = _data(25)
h, w = (torch.tensor(d[k]).to(bf) for k in ("h", "w"))
th, tw = (torch.tensor(d[k]).to(bf) for k in ("th", "tw"))
n = 10
for div in DIVS:
    plan = _fused_linear_math.Plan(div, BETA, 1.3, 3)
    res = {}
    for mode in ("chunks", "slabs", "lowp"):
        torch_fused_slabs.WEIGHT_GRAD = mode
        _, dh, dW, _ = torch_fused_slabs.chunks(
            h.reshape(n, -1), w, None, ("hidden", th.reshape(n, -1), tw, None), plan,
            torch.rand(n, generator=torch.Generator().manual_seed(1)), (True, True, False))
        res[mode] = (dh.float(), dW)
    assert res["slabs"][1].dtype == bf and res["chunks"][1].dtype == torch.float32
    assert res["lowp"][1].dtype == bf
    for other in ("slabs", "lowp"):
        for a, e in zip(res[other], res["chunks"]):
            np.testing.assert_allclose(a.float().numpy(), e.float().numpy(), rtol=2e-2,
                                       atol=2e-2 * float(e.abs().max()))
torch_fused_chunks._operand = real_operand
assert len(calls) > 50, len(calls)  # the host code ran the kernel, not the torch ops
assert len(slab_calls) > 50, len(slab_calls)  # and the slab kernel for the weight gradient
print("TRITON-FUSED-OK")
"""


def test_triton_kernel_interpreted(torch: Any) -> None:
    """The Triton route (kernel and host code) on CPU tensors in Triton's interpreter: values
    and gradients of every divergence, both teacher forms, -inf logits, temperatures, chunk
    sizes that do not divide the tokens, the weight gradient by chunks and by vocabulary
    slabs (the slab kernel). A subprocess: TRITON_INTERPRET is read at import."""
    pytest.importorskip("triton")
    from test_triton_family import skip_if_triton_interpreter_defective

    skip_if_triton_interpreter_defective()  # Triton <= 3.6.0 with NumPy >= 2.4: see there
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src"), os.path.join(root, "tests"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "TRITON-FUSED-OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------ docs
def test_public_names() -> None:
    import kldiv

    assert kldiv.fused_linear_divergence is _fused_linear.fused_linear_divergence
    assert kldiv.FusedLinearDivergence is _fused_linear.FusedLinearDivergence
    assert {"fused_linear_divergence", "FusedLinearDivergence"} <= set(kldiv.__all__)


def test_docs_examples_run(torch: Any) -> None:
    """The python blocks of docs/large-vocabulary.md, in order, in one fresh process."""
    pytest.importorskip("jax")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "large-vocabulary.md")) as f:
        text = f.read()
    blocks = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("python\n")]
    assert len(blocks) == 3
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.join(root, "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "\n".join(blocks) + "\nprint('DOCS-OK')"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "DOCS-OK" in proc.stdout, proc.stderr[-3000:]
