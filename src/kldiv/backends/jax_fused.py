"""JAX route of :func:`kldiv.fused_linear_divergence`: a ``lax.scan`` over chunks of tokens.

Each step slices ``chunk_size`` rows (``lax.dynamic_slice``: no padded or reshaped copy of
the inputs), forms both sides' logits, and runs the array-API chunk math
(:func:`kldiv._fused_linear_math.chunk_terms`). When the token count is not a multiple of the
chunk size the last chunk is shifted back to end at the last token; the rows it shares with
the chunk before are written again with the same values and left out of the weight and bias
gradients. The loss (and ``dh``) are written into carried buffers in place, ``dW`` and ``db``
accumulate in the carry, so XLA holds one chunk of ``(rows, V)`` temporaries at a time.

Differentiation is a ``jax.custom_vjp``: for a reduced result the forward rule computes the
gradients (the per-token weights are known) and the backward rule scales them; for
per-token results the backward rule rescans with the incoming cotangent. The teacher and the
per-token weights get no gradient. Works under ``jax.jit`` and ``jax.grad``; inputs are
converted to float32 (float64 stays float64) before the matrix products.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from .._fused_linear_math import Plan, chunk_terms, divide_by_temperature

__all__ = ["GRAD_MODE", "fused_linear", "run", "stop_gradient"]

GRAD_MODE = "forward"
"""``"forward"``: gradients computed in the forward rule (reduced results); ``"recompute"``:
the backward rule rescans."""


def _compute_dtype(*arrays: Any) -> Any:
    return jnp.float64 if any(x is not None and x.dtype == jnp.float64 for x in arrays) \
        else jnp.float32


def _scan(plan: Plan, h2: Any, w: Any, b: Any, teacher: dict[str, Any], scale: Any,
          need_grad: bool) -> tuple[Any, Any, Any, Any]:
    """``(loss, dh, dW, db)`` in the compute dtype (gradients of ``sum(loss * scale)``)."""
    n, hid = h2.shape
    v = w.shape[0]
    cd = _compute_dtype(h2, w)
    c = max(1, min(plan.chunk_size, n))
    k = -(-n // c)
    w_ = w.astype(cd)
    b_ = None if b is None else b.astype(cd)
    logits_given = "logits" in teacher
    if not logits_given:
        tw = teacher["weight"].astype(cd)
        tb = None if teacher.get("bias") is None else teacher["bias"].astype(cd)

    def body(carry: tuple[Any, ...], i: Any) -> tuple[tuple[Any, ...], None]:
        loss, dh, dw, db = carry
        start = jnp.minimum(i * c, n - c)
        hc = lax.dynamic_slice_in_dim(h2, start, c, 0).astype(cd)
        s = hc @ w_.T
        if b_ is not None:
            s = s + b_
        if logits_given:
            t = lax.dynamic_slice_in_dim(teacher["logits"], start, c, 0).astype(cd)
        else:
            t = lax.dynamic_slice_in_dim(teacher["hidden"], start, c, 0).astype(cd) @ tw.T
            if tb is not None:
                t = t + tb
        s = divide_by_temperature(jnp, s, plan.temperature)
        t = divide_by_temperature(jnp, t, plan.temperature)
        loss_c, g = chunk_terms(jnp, s, t, plan.divergence, plan.beta, need_grad)
        loss = lax.dynamic_update_slice_in_dim(loss, loss_c, start, 0)
        if need_grad:
            sc = lax.dynamic_slice_in_dim(scale, start, c, 0).astype(cd)
            g = g * (sc / plan.temperature)[:, None]
            dh = lax.dynamic_update_slice_in_dim(dh, g @ w_, start, 0)
            fresh = (start + jnp.arange(c)) >= i * c  # rows not done by the chunk before
            g = jnp.where(fresh[:, None], g, jnp.zeros_like(g))
            dw = dw + g.T @ hc
            if db is not None:
                db = db + jnp.sum(g, axis=0)
        return (loss, dh, dw, db), None

    zeros = functools.partial(jnp.zeros, dtype=cd)
    carry = (zeros((n,)), zeros((n, hid)) if need_grad else None,
             zeros((v, hid)) if need_grad else None,
             zeros((v,)) if need_grad and b is not None else None)
    if n == 0:
        return carry
    carry, _ = lax.scan(body, carry, jnp.arange(k))
    return carry


def _zero_teacher(teacher: dict[str, Any]) -> dict[str, Any]:
    return {key: None for key in teacher}


def _grads(h2: Any, w: Any, b: Any, dh: Any, dw: Any, db: Any, g: Any) -> tuple[Any, ...]:
    return ((dh * g).astype(h2.dtype), (dw * g).astype(w.dtype),
            None if b is None else (db * g).astype(b.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_token(plan: Plan, h2: Any, w: Any, b: Any, teacher: dict[str, Any]) -> Any:
    return _scan(plan, h2, w, b, teacher, None, False)[0]


def _per_token_fwd(plan: Plan, h2: Any, w: Any, b: Any, teacher: dict[str, Any]) -> Any:
    # the scan itself, not ``_per_token``: a rule that calls the custom_vjp function cannot be
    # differentiated forward (``jax.hessian`` = forward over this reverse rule)
    return _scan(plan, h2, w, b, teacher, None, False)[0], (h2, w, b, teacher)


def _per_token_bwd(plan: Plan, res: Any, g: Any) -> tuple[Any, ...]:
    h2, w, b, teacher = res
    _, dh, dw, db = _scan(plan, h2, w, b, teacher, g, True)
    return (*_grads(h2, w, b, dh, dw, db, 1), _zero_teacher(teacher))


_per_token.defvjp(_per_token_fwd, _per_token_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reduced(plan: Plan, h2: Any, w: Any, b: Any, teacher: dict[str, Any], scale: Any) -> Any:
    loss = _scan(plan, h2, w, b, teacher, None, False)[0]
    return jnp.sum(loss * scale.astype(loss.dtype))


def _reduced_fwd(plan: Plan, h2: Any, w: Any, b: Any, teacher: dict[str, Any],
                 scale: Any) -> Any:
    loss, dh, dw, db = _scan(plan, h2, w, b, teacher, scale, True)
    return jnp.sum(loss * scale.astype(loss.dtype)), (h2, w, b, dh, dw, db, teacher)


def _reduced_bwd(plan: Plan, res: Any, g: Any) -> tuple[Any, ...]:
    h2, w, b, dh, dw, db, teacher = res
    return (*_grads(h2, w, b, dh, dw, db, g), _zero_teacher(teacher), None)


_reduced.defvjp(_reduced_fwd, _reduced_bwd)


def run(h2: Any, w: Any, b: Any, teacher: dict[str, Any], plan: Plan, scale: Any) -> Any:
    """Per-token losses (``scale is None``) or ``sum(loss * scale)``, in the compute dtype."""
    teacher = {key: None if x is None else lax.stop_gradient(x) for key, x in teacher.items()}
    if scale is None:
        return _per_token(plan, h2, w, b, teacher)
    scale = lax.stop_gradient(scale)
    if GRAD_MODE == "forward":
        return _reduced(plan, h2, w, b, teacher, scale)
    loss = _per_token(plan, h2, w, b, teacher)
    return jnp.sum(loss * scale.astype(loss.dtype))


fused_linear = run
"""The fused linear divergence's JAX route (the libraries table's op ``fused_linear``)."""

stop_gradient = lax.stop_gradient
"""``x`` cut off from differentiation (sample weights are constants)."""
