"""JAX: the Keras KL fast path (one cached ``jax.jit`` of the generic kernel) and the adapter
(float64 availability, file targets, ``kldiv show`` rows).

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

import contextlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from .._kernel import kl_divergence_generic
from .._targets import Target

__all__ = ["estimator_ops", "has_float64", "keras_kl", "show_devices", "target"]


_FUSED_MIN = 64
"""Rows of more classes than this run as one fused loop (exact from 33 classes: a margin)."""


@jax.jit
def _kld(y_true: jax.Array, y_pred: jax.Array) -> jax.Array:
    if y_true.shape != y_pred.shape:
        # materialised at the common shape first: XLA would otherwise fuse the broadcast into
        # the row loop, which then sums in another order than the generic kernel's (an ulp)
        y_true, y_pred = jax.lax.optimization_barrier(jnp.broadcast_arrays(y_true, y_pred))
        return kl_divergence_generic(jnp, y_true, y_pred)
    # one fused loop where its row sums are the generic kernel's, bit for bit (rows of more
    # than 32 classes; see _kernel): the gradient in two passes instead of about six
    return kl_divergence_generic(jnp, y_true, y_pred, fused_rows=y_pred.shape[-1] > _FUSED_MIN)


def keras_kl(y_true: Any, y_pred: Any) -> Any:
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


# ------------------------------------------------------------------------------ the adapter
def estimator_ops(xp: ModuleType) -> tuple[Any, ...]:
    """The estimators' ``(where, expm1, isfinite, isnan, stop_gradient, quiet)``."""
    return (xp.where, xp.expm1, xp.isfinite, xp.isnan, jax.lax.stop_gradient,
            contextlib.nullcontext)


def has_float64(xp: ModuleType, device: Any) -> bool:
    """JAX holds float64 only with ``jax_enable_x64``."""
    try:
        return bool(jax.config.read("jax_enable_x64"))
    except Exception:  # older JAX
        return bool(getattr(jax.config, "jax_enable_x64", False))


def target(device: str | None) -> Target:
    """A target on ``device`` (``"gpu"``, ``"cuda:1"``, ``"cpu"``; default JAX's default)."""
    jdev: Any = None
    if device is not None:
        platform, _, index = device.partition(":")
        platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform.lower(), platform.lower())
        jdev = jax.devices(platform)[int(index or 0)]
    # float16 is not in the array API's list, but every JAX backend has it
    names = {"float16", *jnp.__array_namespace_info__().dtypes(device=jdev)}

    def put(x: Any) -> Any:
        return jax.device_put(x, jdev)

    return Target("jax", put, put, lambda x: isinstance(x, jax.Array), lambda dt: dt.name in names)


def show_devices() -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
    """``kldiv show``'s rows: each device JAX sees."""
    for jdev in jax.devices():

        def to_jax(v: Any, d: Any = jdev) -> Any:
            return jax.device_put(jnp.asarray(v, dtype=jnp.float32), d)

        yield str(jdev), to_jax, ""
