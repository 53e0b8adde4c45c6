"""JAX fast path: one cached ``jax.jit`` of the generic kernel.

Eagerly, the generic kernel dispatches about six XLA operations, each with its own full-size
result; under ``jax.jit`` XLA fuses the clips, the division, the logarithm, the product and
the row sum into one loop. The jitted function is built once and cached by JAX per input
shape and dtype. Inside a user's ``jax.jit``, ``jax.grad`` or ``jax.vmap`` the inner ``jit`` is
simply inlined into the user's trace, so every transformation keeps working; the gradients
are those of the generic kernel (``where``-based clipping: 1 inside ``[eps, 1]``, 0 outside).

Values: bitwise those of the generic kernel run op by op (the kernel keeps XLA from
contracting the product and the row sum into fused multiply-adds, see
:func:`kldiv._kernel.kl_divergence_generic`), so SPEC's float32 seed values hold exactly. JAX
is not bitwise NumPy in general: XLA's ``log`` is its own approximation (about one float32
element in five differs from NumPy's by an ulp) and XLA sums rows in its own order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .._kernel import kl_divergence_generic

__all__ = ["kl_divergence"]


@jax.jit
def _kld(y_true: jax.Array, y_pred: jax.Array) -> jax.Array:
    return kl_divergence_generic(jnp, y_true, y_pred)


def kl_divergence(y_true: Any, y_pred: Any) -> Any:
    """Jitted ``sum(t * log(t / p), axis=-1)`` on the clipped JAX arrays (or tracers).

    Parameters
    ----------
    y_true, y_pred : jax.Array
        Same floating dtype, broadcastable shapes; tracers are fine.

    Returns
    -------
    jax.Array
        The per-sample loss, shape ``broadcast(y_true, y_pred).shape[:-1]``.
    """
    return _kld(y_true, y_pred)
