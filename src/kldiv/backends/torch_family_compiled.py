"""Compiled (inductor) kernels of the divergence family's CPU fast path.

:mod:`kldiv.backends.torch_family` works large CPU inputs through these functions instead of
its blocks of eager torch ops: each is written in ordinary torch ops on ``(rows, classes)``
tensors and compiled by ``torch.compile(fn, dynamic=True, fullgraph=True)`` the first time it
is needed, one compiled function per (op, the sides' spaces) for the forward pass and per
(op, spaces, which gradients) for the backward pass. Inductor turns each into one vectorised
C++ loop over the rows: the log-sum-exp of a logits side, then the terms, then their row sums,
with no full-size temporary; the backward pass writes the gradient(s) and nothing else.

The closed forms are :mod:`kldiv.backends.torch_family`'s. The forward pass returns per-row
tensors only: the divergence's statistics ``r1, r2`` (``KL, mass of P`` for ``"kl"``, the
mass ``None`` when P comes from logits; ``KL(P||M), KL(Q||M)`` for ``"js"``) and each logits
side's normaliser, the row maximum ``m`` of ``x / T`` and ``log(sum(exp(x / T - m)))``
(``None`` for a log-probabilities side), so that the backward pass recomputes each side's
log-probabilities as ``(x / T - m) - logsum`` without a reduction. The sides' spaces are
``"logits"`` or ``"log_probs"`` here (a ``"probs"`` side is brought to log space before). The temperature (its inverse ``1 / T``), ``beta`` and its logarithms travel
in one small tensor, an input of the compiled graphs, and the shapes are dynamic: another
temperature, ``beta`` or shape reuses the compiled code (another dtype, or a broadcast
input's zero strides, compile once more).

A row of all ``-inf`` logits (or with a NaN, or an infinite KL) has non-finite statistics
here; the forward pass counts such rows and the caller recomputes them with the generic
formula.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["backward", "compiler_on", "forward"]

_INF = math.inf
Stats = tuple[Any, Any, Any, Any, Any, Any]
"""``(r1, r2, max_a, logsum_a, max_b, logsum_b)``: per-row tensors (or ``None``) from
:func:`forward`."""
Forward = tuple[Stats, Any, Any]
"""``(stats, bad, value)`` from :func:`forward`."""
Side = tuple[Any, Any]
"""A logits side's normaliser ``(max, logsum)`` (``None, None`` for log-probabilities)."""

_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"cpp.dynamic_threads": True}
"""Inductor's options. ``cpp.dynamic_threads``: every kernel gets a parallel loop, the
threads chosen when it runs. Without it inductor decides from the sizes of the inputs it
compiles for (a serial loop for small ones), and its cache, shared between processes, hands
that kernel to later calls of every size: compiled first for a small input, the gradient
of an 8192x32768 one took 600 ms on one core instead of 350 ms on two."""

_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
"""Compiled functions by key (see :func:`_compiled`)."""


# ---------------------------------------------------------------------------- the formulas
def _normaliser(x: torch.Tensor, logits: bool, inv_t: torch.Tensor) -> Side:
    """``(m, logsum)``, ``(rows, 1)`` each, of ``s = x / T``: its row maximum and
    ``log(sum(exp(s - m)))`` (NaN for a row of ``-inf``). Kept apart rather than summed into
    one log-sum-exp: ``m`` can be large, and ``s - (m + logsum)`` would round at ``m``'s
    magnitude where ``(s - m) - logsum`` (torch's ``log_softmax``) keeps the precision."""
    if not logits:
        return None, None
    s = x * inv_t
    m = torch.amax(s, dim=-1, keepdim=True)
    return m, torch.log(torch.sum(torch.exp(s - m), dim=-1, keepdim=True))


def _logs(x: torch.Tensor, inv_t: torch.Tensor, norm: Side) -> torch.Tensor:
    """One side in log space: ``(x / T - m) - logsum`` for logits, ``x`` for
    log-probabilities (``norm`` is ``(None, None)``)."""
    m, logsum = norm
    if m is None:
        return x
    return (x * inv_t - m) - logsum


def _rows(norm: Side) -> tuple[Any, Any]:
    """A normaliser as per-row vectors (what :func:`forward` returns)."""
    m, logsum = norm
    return (None if m is None else m.squeeze(-1),
            None if logsum is None else logsum.squeeze(-1))


def _cols(m: Any, logsum: Any) -> Side:
    """Per-row vectors as a normaliser (what the backward functions take)."""
    return (None if m is None else m.unsqueeze(-1),
            None if logsum is None else logsum.unsqueeze(-1))


def _logaddexp(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log(exp(x) + exp(y))``; NaN where both are ``-inf`` (such entries are masked)."""
    m = torch.maximum(x, y)
    return m + torch.log1p(torch.exp(-torch.abs(x - y)))


def _checked(stats: Stats, value: Any = None) -> Forward:
    """``(stats, bad, value)``: ``bad`` counts the rows with a non-finite statistic (0-d)."""
    finite = [torch.isfinite(x) for x in stats if x is not None]
    ok = finite[0]
    for f in finite[1:]:
        ok = ok & f
    return stats, torch.sum(~ok), value


def _kl_forward(a: torch.Tensor, b: torch.Tensor, params: torch.Tensor, *, logits_a: bool,
                logits_b: bool) -> Forward:
    inv_t = params[0]
    norm_a = _normaliser(a, logits_a, inv_t)
    norm_b = _normaliser(b, logits_b, inv_t)
    la = _logs(a, inv_t, norm_a)
    lb = _logs(b, inv_t, norm_b)
    pa = torch.exp(la)
    d = la - lb
    # pa == 0: a -inf entry (0) or an underflow (0; +inf against lb = -inf, NaN against a
    # NaN: the probability is not 0 there)
    term = torch.where(pa == 0.0, torch.where((d < _INF) | (la == -_INF), 0.0, d), pa * d)
    kl = torch.sum(term, dim=-1)
    mass = None if logits_a else torch.sum(pa, dim=-1)
    return _checked((kl, mass, *_rows(norm_a), *_rows(norm_b)))


def _js_forward(a: torch.Tensor, b: torch.Tensor, params: torch.Tensor, *, logits_a: bool,
                logits_b: bool) -> Forward:
    inv_t, beta, log_b, log_1mb = params[0], params[1], params[2], params[3]
    norm_a = _normaliser(a, logits_a, inv_t)
    norm_b = _normaliser(b, logits_b, inv_t)
    la = _logs(a, inv_t, norm_a)
    lb = _logs(b, inv_t, norm_b)
    lm = _logaddexp(la + log_b, lb + log_1mb)
    pa = torch.exp(la)
    pb = torch.exp(lb)
    kl_pm = torch.sum(torch.where(pa == 0.0, 0.0, pa * (la - lm)), dim=-1)
    kl_qm = torch.sum(torch.where(pb == 0.0, 0.0, pb * (lb - lm)), dim=-1)
    value = kl_pm * beta + kl_qm * (1.0 - beta)
    return _checked((kl_pm, kl_qm, *_rows(norm_a), *_rows(norm_b)), value)


def _kl_backward(a: torch.Tensor, b: torch.Tensor, kl: torch.Tensor, mass: torch.Tensor | None,
                 max_a: Any, logsum_a: Any, max_b: Any, logsum_b: Any, grad: torch.Tensor,
                 params: torch.Tensor, *, logits_a: bool, logits_b: bool, need_a: bool,
                 need_b: bool) -> tuple[Any, Any]:
    inv_t = params[0]
    g = grad.unsqueeze(-1)
    la = _logs(a, inv_t, _cols(max_a, logsum_a))
    lb = _logs(b, inv_t, _cols(max_b, logsum_b))
    pa = torch.exp(la)
    ga = gb = None
    if need_a:
        # G = p (lp - lq + 1); a logits side: G - p sum(G), sum(G) = KL + 1
        shift = -kl.unsqueeze(-1) if logits_a else 1.0
        ta = torch.where(pa == 0.0, 0.0, pa * (la - lb + shift))
        ga = ta * (g * inv_t if logits_a else g)
    if need_b:
        # G = -p, sum(G) = -mass; a logits side: q mass - p
        if logits_b:
            q = torch.exp(lb)
            tb = (q if mass is None else q * mass.unsqueeze(-1)) - pa
            gb = tb * (g * inv_t)
        else:
            gb = -pa * g
    return ga, gb


def _js_backward(a: torch.Tensor, b: torch.Tensor, kl_pm: torch.Tensor, kl_qm: torch.Tensor,
                 max_a: Any, logsum_a: Any, max_b: Any, logsum_b: Any, grad: torch.Tensor,
                 params: torch.Tensor, *, logits_a: bool, logits_b: bool, need_a: bool,
                 need_b: bool) -> tuple[Any, Any]:
    inv_t, beta, log_b, log_1mb = params[0], params[1], params[2], params[3]
    g = grad.unsqueeze(-1)
    la = _logs(a, inv_t, _cols(max_a, logsum_a))
    lb = _logs(b, inv_t, _cols(max_b, logsum_b))
    lm = _logaddexp(la + log_b, lb + log_1mb)
    ga = gb = None
    if need_a:
        pa = torch.exp(la)
        shift = kl_pm.unsqueeze(-1) if logits_a else 0.0
        ta = torch.where(pa == 0.0, 0.0, pa * (la - lm - shift))
        ga = ta * ((g * inv_t if logits_a else g) * beta)
    if need_b:
        pb = torch.exp(lb)
        shift = kl_qm.unsqueeze(-1) if logits_b else 0.0
        tb = torch.where(pb == 0.0, 0.0, pb * (lb - lm - shift))
        gb = tb * ((g * inv_t if logits_b else g) * (1.0 - beta))
    return ga, gb


# --------------------------------------------------------------------------- compiling
def compiler_on() -> bool:
    """False when torch.compile would run the functions eagerly (``TORCHDYNAMO_DISABLE=1``,
    ``torch._dynamo.config.disable``, ``torch.compiler.set_stance("force_eager")``): the
    formulas, unfused, would keep several full-size temporaries."""
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is None or getattr(dynamo.config, "disable", False):
        return False
    stance = getattr(getattr(dynamo, "eval_frame", None), "_stance", None)
    return getattr(stance, "stance", "default") != "force_eager"


def _own_code(fn: Callable[..., Any], name: str, **static: Any) -> Callable[..., Any]:
    """``fn`` with ``static`` keyword arguments bound, as a function with its own code object.

    Dynamo keeps its compiled code (and counts recompiles, up to
    ``torch._dynamo.config.recompile_limit``) per code object; a closure per key would share
    one code object between all keys, so that each key would count as a recompile of the
    others. The wrapper's code is copied under a name of its own for each key.
    """

    def wrapper(*args: Any) -> Any:
        return fn(*args, **static)

    code = wrapper.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):  # Python 3.11 and later
        code = code.replace(co_qualname=name)
    out = types.FunctionType(code, wrapper.__globals__, name, None, wrapper.__closure__)
    out.__qualname__ = name
    return out


def _compiled(key: tuple[Any, ...]) -> Callable[..., Any]:
    """The compiled function for ``key`` = ``("forward", op, logits_a, logits_b)`` or
    ``("backward", op, logits_a, logits_b, need_a, need_b)``, compiled lazily, once."""
    fn = _COMPILED.get(key)
    if fn is None:
        kind, op, logits_a, logits_b = key[:4]
        static: dict[str, Any] = {"logits_a": logits_a, "logits_b": logits_b}
        if kind == "forward":
            body: Callable[..., Any] = _kl_forward if op == "kl" else _js_forward
        else:
            body = _kl_backward if op == "kl" else _js_backward
            static.update(need_a=key[4], need_b=key[5])
        name = "kldiv_" + "_".join(str(k).lower() for k in key)
        fn = torch.compile(_own_code(body, name, **static), dynamic=True, fullgraph=True,
                           options=_OPTIONS)
        _COMPILED[key] = fn
    return fn


def _params(a: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """``[1 / T, beta, log(beta), log1p(-beta)]``: one small tensor in ``a``'s dtype, a graph
    input whatever ``torch._dynamo.config.specialize_float`` says (a Python float can be a
    constant of the graph: each new value would recompile)."""
    return torch.tensor([1.0 / temperature, beta, math.log(beta), math.log1p(-beta)],
                        dtype=a.dtype)


def forward(op: str, a: torch.Tensor, b: torch.Tensor, logits: tuple[bool, bool],
            temperature: float, beta: float) -> Forward:
    """``(stats, bad, value)`` of two ``(rows, classes)`` tensors: the statistics ``(r1, r2,
    max_a, logsum_a, max_b, logsum_b)`` (module docstring), the number of rows with a
    non-finite statistic (a 0-d tensor) and, for ``"js"``, the per-row value
    ``beta r1 + (1 - beta) r2`` (``None`` for ``"kl"``: the value is ``r1``)."""
    fn = _compiled(("forward", op, *logits))
    with torch.no_grad():
        out: Forward = fn(a.detach(), b.detach(), _params(a, temperature, beta))
    return out


def backward(op: str, a: torch.Tensor, b: torch.Tensor, stats: Stats, grad: torch.Tensor,
             logits: tuple[bool, bool], temperature: float, beta: float, need_a: bool,
             need_b: bool) -> tuple[Any, Any]:
    """The gradients w.r.t. ``a`` and ``b`` (``None`` where not needed) of the per-row
    divergence, given :func:`forward`'s statistics and the incoming per-row gradient."""
    fn = _compiled(("backward", op, *logits, need_a, need_b))
    grad = grad.detach().contiguous()  # a .sum()'s gradient is an expanded (stride 0) scalar
    with torch.no_grad():
        out: tuple[Any, Any] = fn(a.detach(), b.detach(), *stats, grad,
                                  _params(a, temperature, beta))
    return out
