"""The eager blocks of PyTorch's family fast path (:mod:`kldiv.backends.torch_family`).

A block of about :data:`BLOCK_ELEMENTS` elements of rows at a time (so that a block's
temporaries stay in cache on CPU): :func:`forward` brings each block to log space with torch's
fused ``log_softmax`` and sums the member's terms, keeping only per-row values;
:func:`backward` recomputes each block's (log-)probabilities and writes the closed-form
gradient (the formulas are in :mod:`kldiv.backends.torch_family`'s docstring) straight into
its output. Blocks whose rows are not defined by the closed forms (all ``-inf`` logits, NaN)
go through the generic formula (:func:`generic_block`, :func:`generic_block_grad`). The route
on CPU for inputs below the compiled kernels' threshold, on devices without Triton, and the
fallback when compiling fails.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._divergence import MEMBERS, js_parts, kl_terms
from .._libraries.torch_traced import array_api
from .._spaces import to_log_space

__all__ = [
    "BLOCK_ELEMENTS",
    "Plan",
    "backward",
    "block_rows",
    "finish",
    "forward",
    "generic_block",
    "generic_block_grad",
    "generic_rows",
    "log_block",
    "prob_block",
]

BLOCK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 24}
"""Elements of one block of rows, per device type (others use the CUDA size)."""

_INF = math.inf


def log_block(x: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """A block in log space: ``log_softmax(x / T)`` (torch's fused kernel) for logits, ``x``
    itself for log-probabilities. A row of all ``-inf`` logits gives NaN here: such blocks
    take the generic route (see :func:`forward`)."""
    if kind == "log_probs":
        return x
    return torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)


def prob_block(x: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if kind == "log_probs":
        return torch.exp(x)
    return torch.softmax(x / temperature if temperature != 1.0 else x, dim=-1)


class Plan:
    """One call's constants: the op, the sides' kinds, the temperature, ``beta``, the Triton
    module when it runs the call, and the compiled kernels' module when they run it."""

    __slots__ = ("beta", "compiled", "kinds", "op", "temperature", "triton")

    def __init__(self, op: str, kinds: tuple[str, str], temperature: float, beta: float,
                 triton: Any = None, compiled: Any = None) -> None:
        self.op, self.kinds, self.temperature, self.beta = op, kinds, temperature, beta
        self.triton, self.compiled = triton, compiled


def block_rows(a: torch.Tensor) -> int:
    c = a.shape[-1]
    return max(1, BLOCK_ELEMENTS.get(a.device.type, BLOCK_ELEMENTS["cuda"]) // max(c, 1))


def forward(plan: Plan, a: torch.Tensor, b: torch.Tensor) -> tuple[Any, ...]:
    """Per-row value and what the backward pass needs: ``(value, r1, r2, generic_blocks)``.

    ``r1, r2`` are ``(KL, mass of P or None)`` for ``kl`` and ``(KL(P||M), KL(Q||M))`` for
    ``js``. A block whose rows come out NaN (a row of all ``-inf`` logits, or NaN inputs) is
    recomputed with the generic formula, which defines those rows exactly; its start is
    listed in ``generic_blocks`` so that the backward pass does the same.
    """
    n, _ = a.shape
    T = plan.temperature
    r1 = torch.empty(n, dtype=a.dtype, device=a.device)
    r2 = torch.empty_like(r1) if plan.op == "js" or plan.kinds[0] == "log_probs" else None
    generic_blocks: set[int] = set()
    step = block_rows(a)
    if plan.op == "js":
        log_b, log_1mb = math.log(plan.beta), math.log1p(-plan.beta)
    for r0 in range(0, n, step):
        s = slice(r0, min(n, r0 + step))
        la = log_block(a[s], plan.kinds[0], T)
        lb = log_block(b[s], plan.kinds[1], T)
        pa = torch.exp(la)
        if plan.op == "kl":
            d = la - lb
            # pa == 0: a -inf entry (0) or an underflow (0; +inf against lb = -inf, NaN
            # against a NaN: the probability is not 0 there)
            t = torch.where(pa == 0.0, torch.where((d < _INF) | (la == -_INF), 0.0, d), pa * d)
            torch.sum(t, dim=-1, out=r1[s])
            if r2 is not None:
                torch.sum(pa, dim=-1, out=r2[s])
        else:
            assert r2 is not None
            lm = torch.logaddexp(la + log_b, lb + log_1mb)
            torch.sum((pa * (la - lm)).masked_fill_(pa == 0.0, 0.0), dim=-1, out=r1[s])
            pb = torch.exp(lb)
            torch.sum((pb * (lb - lm)).masked_fill_(pb == 0.0, 0.0), dim=-1, out=r2[s])
        # NaN rows, and logits rows whose log-softmax is NaN (all -inf, or a NaN logit: NaN
        # reaches every entry through the row maximum, so the first column tells)
        checks = [r1[s]] if r2 is None else [r1[s], r2[s]]
        checks += [x[:, 0] for x, kind in ((la, plan.kinds[0]), (lb, plan.kinds[1]))
                   if kind == "logits"]
        if bool(torch.isnan(torch.stack(checks)).any()):
            generic_blocks.add(r0)
            generic_block(plan, a[s], b[s], r1[s], None if r2 is None else r2[s])
    if plan.op == "kl":
        value = r1
    else:
        assert r2 is not None
        value = torch.add(r1 * plan.beta, r2, alpha=1.0 - plan.beta)
    return value, r1, r2, generic_blocks


def generic_block(plan: Plan, a: torch.Tensor, b: torch.Tensor, r1: torch.Tensor,
                   r2: torch.Tensor | None) -> None:
    """The rows of one block by the generic formula, written into ``r1`` (and ``r2``)."""
    lp = to_log_space(array_api, a, plan.kinds[0], plan.temperature)
    lq = to_log_space(array_api, b, plan.kinds[1], plan.temperature)
    if plan.op == "kl":
        r1.copy_(kl_terms(array_api, lp, lq))
        if r2 is not None:
            r2.copy_(torch.sum(torch.exp(lp), dim=-1))
    else:
        assert r2 is not None
        kl_pm, kl_qm = js_parts(array_api, lp, lq, plan.beta)
        r1.copy_(kl_pm)
        r2.copy_(kl_qm)


def backward(plan: Plan, a: torch.Tensor, b: torch.Tensor, rows: tuple[Any, ...],
              grad: torch.Tensor, need_a: bool, need_b: bool) -> tuple[Any, Any]:
    """The closed-form gradients (module docstring), one block of rows at a time."""
    r1, r2, generic_blocks = rows
    n, _ = a.shape
    T = plan.temperature
    ga = torch.empty_like(a, memory_format=torch.contiguous_format) if need_a else None
    gb = torch.empty_like(b, memory_format=torch.contiguous_format) if need_b else None
    logits_a, logits_b = (k == "logits" for k in plan.kinds)
    beta = plan.beta
    if plan.op == "js":
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
    step = block_rows(a)
    for r0 in range(0, n, step):
        s = slice(r0, min(n, r0 + step))
        g = grad[s].unsqueeze(-1)
        if r0 in generic_blocks:
            generic_block_grad(plan, a[s], b[s], grad[s], None if ga is None else ga[s],
                                None if gb is None else gb[s])
            continue
        if plan.op == "kl":
            kl_ = r1[s].unsqueeze(-1)
            mass = 1.0 if r2 is None else r2[s].unsqueeze(-1)  # P from logits sums to 1
            if ga is not None:
                la = log_block(a[s], plan.kinds[0], T)
                lb = log_block(b[s], plan.kinds[1], T)
                pa = torch.exp(la)
                # G = p (lp - lq + 1), sum(G) = KL + mass: (G - p sum G) = p (lp - lq + 1 - KL - mass)
                shift = (1.0 - kl_ - mass) if logits_a else 1.0
                t = (pa * (la - lb + shift)).masked_fill_(pa == 0.0, 0.0)
                finish(t, g, logits_a, T, out=ga[s])
            if gb is not None:
                pa = prob_block(a[s], plan.kinds[0], T)
                # G = -p, sum(G) = -mass: (G - q sum G) = q mass - p
                if logits_b:
                    q = prob_block(b[s], "logits", T)
                    t = (q if r2 is None else q.mul_(mass)).sub_(pa)
                else:
                    t = pa.neg_()
                finish(t, g, logits_b, T, out=gb[s])
        else:
            assert r2 is not None
            la = log_block(a[s], plan.kinds[0], T)
            lb = log_block(b[s], plan.kinds[1], T)
            lm = torch.logaddexp(la + log_b, lb + log_1mb)
            if ga is not None:
                pa = torch.exp(la)
                shift = r1[s].unsqueeze(-1) if logits_a else 0.0
                t = (pa * (la - lm - shift)).masked_fill_(pa == 0.0, 0.0).mul_(beta)
                finish(t, g, logits_a, T, out=ga[s])
            if gb is not None:
                pb = torch.exp(lb)
                shift = r2[s].unsqueeze(-1) if logits_b else 0.0
                t = (pb * (lb - lm - shift)).masked_fill_(pb == 0.0, 0.0).mul_(1.0 - beta)
                finish(t, g, logits_b, T, out=gb[s])
    return ga, gb


def finish(t: torch.Tensor, g: torch.Tensor, logits: bool, temperature: float,
            out: torch.Tensor) -> None:
    """``out = t * g`` (``/ T`` on a logits side)."""
    if logits and temperature != 1.0:
        g = g / temperature
    torch.mul(t, g, out=out)


def generic_rows(plan: Plan, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The generic formula with differentiable torch ops."""
    lp = to_log_space(array_api, a, plan.kinds[0], plan.temperature)
    lq = to_log_space(array_api, b, plan.kinds[1], plan.temperature)
    div = MEMBERS[plan.op]
    params = {"beta": plan.beta} if plan.op == "js" else {}
    out: torch.Tensor = div.generic(array_api, lp, lq, **params)
    return out


def generic_block_grad(plan: Plan, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor,
                        ga: torch.Tensor | None, gb: torch.Tensor | None) -> None:
    """One block's gradients by autograd through the generic formula (rows the closed forms
    do not cover: all ``-inf`` logits, NaN)."""
    with torch.enable_grad():
        x = a.detach().requires_grad_(ga is not None)
        y = b.detach().requires_grad_(gb is not None)
        wanted = [v for v in (x, y) if v.requires_grad]
        grads = iter(torch.autograd.grad(generic_rows(plan, x, y), wanted, grad))
    if ga is not None:
        ga.copy_(next(grads))
    if gb is not None:
        gb.copy_(next(grads))
