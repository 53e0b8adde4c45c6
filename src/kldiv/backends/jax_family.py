"""JAX fast path of the divergence family: one cached ``jax.jit`` per member, closed-form JVPs.

Eagerly, the generic kernels dispatch a few dozen small XLA operations, each with its own
full-size result; under ``jax.jit`` XLA fuses the log-softmax, the masks and the terms into a
few loops over the data. The input spaces, the temperature and ``beta`` are static arguments
(one compilation per combination, cached by JAX). Inside a user's ``jax.jit``, ``jax.grad``
or ``jax.vmap`` the inner ``jit`` is inlined into the user's trace, so every transformation
keeps working.

Derivatives. Autodiff of the generic kernels' "double where" (the masks that keep gradients
finite at ``-inf`` logits and zero probabilities) costs many extra full-size passes. When
each side is ``"logits"`` or ``"log_probs"``, the per-row divergence is a ``jax.custom_jvp``
whose value is the generic kernel's and whose JVP is the closed form, written with ordinary
``jnp`` operations, linear in the tangents: JAX transposes it for reverse mode
(``jax.grad``), and differentiates it again for forward mode over anything (``jacfwd``,
``hessian``). With ``lp``/``lq`` the log-probabilities,
``p``/``q`` the probabilities, ``T`` the temperature, the derivatives of the row's value:

- ``kl`` = ``sum p (lp - lq)``: w.r.t. ``lp``: ``p (lp - lq + 1)``; w.r.t. ``lq``: ``-p``;
- ``reverse_kl``: the same with the sides swapped;
- ``js`` with ``lm = log(beta p + (1 - beta) q)``: w.r.t. ``lp``: ``beta p (lp - lm)``;
  w.r.t. ``lq``: ``(1 - beta) q (lq - lm)``;
- a logits side ``x`` (``l = log_softmax(x / T)``) takes ``(G - softmax * sum(G)) / T`` of
  its log-space derivative ``G``: for the forward KL ``(q - p) / T`` w.r.t. the student and
  ``p ((lp - lq) - KL) / T`` w.r.t. the teacher.

Primal results are computed once inside the rule and reused: the log-softmaxes, the terms
(the value is the generic kernel's, same operations) and their row sums, which give the
``sum(G)`` the log-softmax needs at no extra pass where the closed form allows (the JSD's two
halves; ``KL + 1`` w.r.t. the weighing side of a KL); a side that is not differentiated (a
constant teacher: a symbolic zero tangent) costs nothing.

An entry with probability 0 (``-inf``) contributes 0 to the value and to both derivatives;
every mask selects a safe operand *before* the arithmetic, so that no NaN reaches a
transposed or second derivative. The corner cases follow what ``jax.grad`` of the generic
kernel gives, computed op by op, NaN for NaN (``jax.jit`` of the generic kernel itself
places NaN differently in such rows: XLA rewrites its ``0 * inf``): a row of all ``-inf``
logits is the zero measure (derivative ``G / T``); an entry whose probability underflows to 0
against ``-inf`` (or NaN) on the other side gives NaN w.r.t. its own side and ``-1`` w.r.t.
the other (the kernel's ``where(d < inf, 0, d)``); an overflowing or ``+inf`` log-probability gives
the kernel's uncancelled ``inf - inf``; a logits row whose log-space derivative is not finite
(NaN or ``+inf`` inputs, an infinite divergence where ``-inf`` meets mass on the other side)
gives NaN over the whole row. A ``"probs"`` side, an empty class axis and 0-d inputs take the
generic kernels' own derivatives.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .._divergence import MEMBERS
from .._spaces import to_log_space
from .._temperature import temperature_flat, temperature_limit

__all__ = ["js", "kl", "reverse_kl"]

_INF = math.inf
_RULE_SPACES = ("logits", "log_probs")
"""Input spaces the closed-form JVP covers (per side)."""


# ------------------------------------------------------------------------------ log space
def _log_softmax(x: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """``(log_softmax(x / T), s)``: the operations of :func:`kldiv._spaces.log_softmax` (the
    same values, bit for bit), with the row sum ``s`` of ``exp(z)`` (0: a row of all ``-inf``,
    the zero measure; NaN: NaN or ``+inf`` in the row)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(m == -_INF, 0.0, m)
    z = x - m
    if temperature != 1.0:
        z = z / temperature
    s = jnp.sum(jnp.exp(z), axis=-1, keepdims=True)
    lse = jnp.log(jnp.where(s == 0.0, 1.0, s))
    return z - lse, s


def _to_log(x: jax.Array, space: str, temperature: float) -> tuple[jax.Array, jax.Array | None]:
    if space == "logits":
        return _log_softmax(x, temperature)
    return x, None


# ------------------------------------------------------------------- log-space derivatives
# Each returns the terms the generic kernel sums (its operations, so the same values) and the
# derivatives w.r.t. each side's log-probabilities asked for, entry by entry, as ``jax.grad``
# of the generic kernel gives them (its NaN and infinities included), and the probabilities
# ``exp(l)`` of each side (0 where ``l = -inf``) for the log-softmax's derivative.
def _kl_parts(la: jax.Array, lb: jax.Array, need_a: bool,
              need_b: bool) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
    """``KL(A || B) = sum exp(la) (la - lb)``: its terms (:func:`kldiv._divergence.kl_terms`
    before the row sum), ``exp(la)`` and d/d``la``, d/d``lb``."""
    zero = la == -_INF
    la_s = jnp.where(zero, 0.0, la)  # safe operand: no -inf - (-inf) below
    pa = jnp.exp(la_s)
    d = la_s - lb
    under = pa == 0.0  # exp underflows (never on a masked entry: exp(0) = 1)
    terms = jnp.where(zero, 0.0, jnp.where(under, jnp.where(d < _INF, 0.0, d), pa * d))
    ga = gb = None
    if need_a:  # p (d + 1), summed as autodiff does (inf - inf is NaN where p overflows)
        ga = jnp.where(zero, 0.0, jnp.where(under, jnp.where(jnp.isfinite(d), 0.0, jnp.nan),
                                            pa * d + pa))
    if need_b:  # -p; -1 where p underflows against lb = -inf or NaN (the kernel's
        # where(d < inf, 0, d))
        gb = jnp.where(zero, 0.0, jnp.where(under & ~(d < _INF), -1.0, -pa))
    return terms, jnp.where(zero, 0.0, pa), ga, gb


def _js_parts(lp: jax.Array, lq: jax.Array, beta: float, need_p: bool, need_q: bool,
              overflow: bool) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array | None]]:
    """The generalized JSD: the terms of ``KL(P || M)`` and ``KL(Q || M)``
    (:func:`kldiv._divergence.js_parts` before the row sums), ``[p, q]`` and d/d``lp``,
    d/d``lq`` (the ``+1`` terms cancel through ``M``).

    With ``overflow`` (a log-probabilities side, whose ``exp`` may be ``+inf``), an entry where
    ``P`` or ``Q`` is ``+inf`` takes the generic kernel's backward pass as autodiff computes
    it, terms not cancelled (``inf - inf`` is NaN there, not the closed form's ``+-inf``).
    """
    zp = lp == -_INF
    zq = lq == -_INF
    lp_s = jnp.where(zp, 0.0, lp)
    lq_s = jnp.where(zq, 0.0, lq)
    sp = lp_s + math.log(beta)
    sq = lq_s + math.log1p(-beta)
    lae = jnp.logaddexp(sp, sq)
    lm = jnp.where(zp, sq, jnp.where(zq, sp, lae))
    big_p, big_q = jnp.exp(lp_s), jnp.exp(lq_s)
    terms = [jnp.where(zp, 0.0, big_p * (lp_s - lm)), jnp.where(zq, 0.0, big_q * (lq_s - lm))]
    gp = beta * (big_p * (lp_s - lm)) if need_p else None
    gq = (1.0 - beta) * (big_q * (lq_s - lm)) if need_q else None
    if overflow and (need_p or need_q):
        ct_p = jnp.where(zp, 0.0, beta)
        ct_q = jnp.where(zq, 0.0, 1.0 - beta)
        ct_lm = -(ct_p * big_p) - ct_q * big_q
        ct_inner = jnp.where(zp, 0.0, ct_lm)
        ct_lae = jnp.where(zq, 0.0, ct_inner)
        # logaddexp's JVP: exp(x - out) with +inf replaced by 0 (in x too, which changes
        # nothing here: x = +inf makes its own entry NaN anyway)
        lae_f = jnp.where(lae == _INF, 0.0, lae)
        inf = jnp.isinf(big_p) | jnp.isinf(big_q)
        if gp is not None:
            ct_sp = jnp.where(zq, ct_inner, 0.0) + ct_lae * jnp.exp(sp - lae_f)
            gp = jnp.where(inf, (ct_p * (lp_s - lm)) * big_p + ct_p * big_p + ct_sp, gp)
        if gq is not None:
            ct_sq = jnp.where(zp, ct_lm, 0.0) + ct_lae * jnp.exp(sq - lae_f)
            gq = jnp.where(inf, (ct_q * (lq_s - lm)) * big_q + ct_q * big_q + ct_sq, gq)
    grads = [None if g is None else jnp.where(z, 0.0, g) for g, z in ((gp, zp), (gq, zq))]
    return terms, [jnp.where(zp, 0.0, big_p), jnp.where(zq, 0.0, big_q)], grads


def _through_log_softmax(g: jax.Array, prob: jax.Array, s: jax.Array | None,
                         total: jax.Array | None, temperature: float) -> jax.Array:
    """A side's derivative from its log-space one ``g``: ``g`` itself for log-probabilities;
    for logits ``(g - prob * total) / T`` with ``total = sum(g)`` per row (``g / T`` on a
    zero-measure row; NaN over a row whose ``total`` is not finite: what autodiff of the
    log-softmax gives)."""
    if s is None:
        return g
    assert total is not None
    total, empty = total[..., None], s == 0.0
    out = g - prob * jnp.where(empty, 0.0, total)
    out = jnp.where(empty | jnp.isfinite(total), out, jnp.nan)
    return out / temperature if temperature != 1.0 else out


# ------------------------------------------------------------------------------ the rule
@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _closed(x: jax.Array, y: jax.Array, op: str, spaces: tuple[str, str], temperature: float,
            beta: float) -> jax.Array:
    lp, _ = _to_log(x, spaces[0], temperature)
    lq, _ = _to_log(y, spaces[1], temperature)
    return _generic(op, lp, lq, beta)


def _closed_jvp(op: str, spaces: tuple[str, str], temperature: float, beta: float,
                primals: tuple[jax.Array, jax.Array],
                tangents: tuple[Any, Any]) -> tuple[jax.Array, jax.Array]:
    x, y = primals
    dx, dy = tangents
    # a side not differentiated (a constant teacher) comes as a symbolic zero: skipped
    need = (not isinstance(dx, SymbolicZero), not isinstance(dy, SymbolicZero))
    lp, s_p = _to_log(x, spaces[0], temperature)  # the log-softmaxes, once
    lq, s_q = _to_log(y, spaces[1], temperature)
    logits = s_p is not None and s_q is not None
    # the row sums of the logits sides' log-space derivatives (see _through_log_softmax)
    totals: list[jax.Array | None] = [None, None]
    grads: list[jax.Array | None]
    if op == "js":
        terms, probs, grads = _js_parts(lp, lq, beta, need[0], need[1], not logits)
        kl_pm, kl_qm = jnp.sum(terms[0], axis=-1), jnp.sum(terms[1], axis=-1)
        out = beta * kl_pm + (1.0 - beta) * kl_qm  # js_terms' operations
        if logits:  # the sums are the two halves (no pass of their own)
            totals = [beta * kl_pm, (1.0 - beta) * kl_qm]
    else:
        a, b = (0, 1) if op == "kl" else (1, 0)  # KL(A || B)
        kl_terms, prob_a, ga, gb = _kl_parts((lp, lq)[a], (lp, lq)[b], need[a], need[b])
        out = jnp.sum(kl_terms, axis=-1)  # kl_terms' operations
        grads = [ga, gb]
        probs = [prob_a, jnp.exp((lp, lq)[b])]
        if a == 1:
            grads.reverse()
            probs.reverse()
        if logits and ga is not None:
            # sum(d/dla) = KL + 1, no pass of its own: not finite exactly where the summed
            # derivatives are not (B being logits too); for a zero-measure A it only meets
            # probabilities 0 (so NaN for a row of NaN and 0 for the zero measure need not
            # be told apart from 1)
            totals[a] = out + 1.0
        # sum(d/dlb) is -(mass of A), less 1 per entry where A's probability underflows
        # against -inf in B (rows of +inf only; summed, as such a row cannot be told apart
        # from the others without a pass of its own)
    for i, (g, s) in enumerate(zip(grads, (s_p, s_q), strict=True)):
        if g is not None and s is not None and totals[i] is None:
            totals[i] = jnp.sum(g, axis=-1)
    tangent = jnp.zeros_like(out)
    for g, prob, s, total, t in zip(grads, probs, (s_p, s_q), totals, (dx, dy), strict=True):
        if g is not None:
            coef = _through_log_softmax(g, prob, s, total, temperature)
            tangent = tangent + jnp.sum(coef * t, axis=-1)
    return out, tangent


_closed.defjvp(_closed_jvp, symbolic_zeros=True)


def _generic(op: str, lp: jax.Array, lq: jax.Array, beta: float) -> jax.Array:
    params = {"beta": beta} if op == "js" else {}
    out: jax.Array = MEMBERS[op].generic(jnp, lp, lq, **params)
    return out


@functools.partial(jax.jit, static_argnames=("op", "spaces", "temperature", "beta"))
def _divergence(y_true: jax.Array, y_pred: jax.Array, *, op: str, spaces: tuple[str, str],
                temperature: float, beta: float) -> jax.Array:
    if (spaces[0] in _RULE_SPACES and spaces[1] in _RULE_SPACES and y_true.ndim > 0
            and y_pred.ndim > 0 and jnp.broadcast_shapes(y_true.shape, y_pred.shape)[-1] > 0
            and not temperature_limit(temperature, y_pred.dtype)
            and not temperature_flat(temperature, y_pred.dtype)):
        # (a temperature that is 0 in the dtype, or whose reciprocal is: the generic kernel's
        # T -> 0 or T -> inf limit, below, whose derivative is 0; the rule's would divide by
        # it, and XLA multiplies by the reciprocal, flushed to 0: NaN at -inf logits)
        # no broadcast here: the rule's formulas broadcast (and reverse mode sums the
        # derivative over the broadcast axes); a logits input holds its whole class axis
        return _closed(y_true, y_pred, op, spaces, temperature, beta)
    lp = to_log_space(jnp, y_true, spaces[0], temperature)
    lq = to_log_space(jnp, y_pred, spaces[1], temperature)
    return _generic(op, lp, lq, beta)


def kl(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float) -> Any:
    """Jitted ``KL(P || Q)`` per row (P from ``y_true``); tracers are fine."""
    return _divergence(y_true, y_pred, op="kl", spaces=spaces, temperature=temperature, beta=0.5)


def reverse_kl(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float) -> Any:
    """Jitted ``KL(Q || P)`` per row."""
    return _divergence(y_true, y_pred, op="reverse_kl", spaces=spaces, temperature=temperature,
                       beta=0.5)


def js(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float,
       beta: float) -> Any:
    """Jitted generalized Jensen-Shannon divergence per row."""
    return _divergence(y_true, y_pred, op="js", spaces=spaces, temperature=temperature, beta=beta)
