"""The fused linear divergence under every torch autograd mode (issue 9): call-time values,
forward-mode AD, dual cotangents, batched backward, ``torch.func`` transforms, double
backward, against the float64 oracle (``fused_linear_oracle.py``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fused_linear_oracle import (
    BETA,
    DIVS,
    _call,
    _close,
    _data,
    _teacher,
    plain,
)
from kldiv import fused_linear_divergence

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
