"""JAX fast path of the divergence family: one cached ``jax.jit`` per member.

Eagerly, the generic kernels dispatch a few dozen small XLA operations, each with its own
full-size result; under ``jax.jit`` XLA fuses the log-softmax, the masks and the terms into a
few loops over the data. The input spaces, the temperature and ``beta`` are static arguments
(one compilation per combination, cached by JAX). Inside a user's ``jax.jit``, ``jax.grad``
or ``jax.vmap`` the inner ``jit`` is inlined into the user's trace, so every transformation
keeps working; the gradients are those of the generic kernels (finite at ``-inf`` logits and
at zero probabilities: the kernels' "double where").
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from .._divergence import MEMBERS
from .._spaces import to_log_space

__all__ = ["js", "kl", "reverse_kl"]


@functools.partial(jax.jit, static_argnames=("op", "spaces", "temperature", "beta"))
def _divergence(y_true: jax.Array, y_pred: jax.Array, *, op: str, spaces: tuple[str, str],
                temperature: float, beta: float) -> jax.Array:
    lp = to_log_space(jnp, y_true, spaces[0], temperature)
    lq = to_log_space(jnp, y_pred, spaces[1], temperature)
    params = {"beta": beta} if op == "js" else {}
    out: jax.Array = MEMBERS[op].generic(jnp, lp, lq, **params)
    return out


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
