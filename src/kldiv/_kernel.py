"""The generic kernel, written against the Python array API standard only."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._libraries import Library, library

EPSILON = 1e-7
"""Keras' ``backend.epsilon()``: the lower clip bound of both inputs."""


def clip_unit(xp: ModuleType, x: Any, *, lib: Library | None = None) -> Any:
    """Clip ``x`` to ``[EPSILON, 1]``; NaN passes through.

    The gradient, where the library has one, is 1 inside the closed interval and 0 outside
    it on every backend: what TensorFlow's and PyTorch's clips give. JAX's ``clip`` would
    split it at the bounds (``x == 1`` is common: one-hot targets), so where the table says
    ``where_clip`` the clip is written with ``where``. ``lib``: ``xp``'s record in the table,
    where the caller has it.
    """
    if not (library(xp) if lib is None else lib).where_clip:
        return xp.clip(x, EPSILON, 1.0)
    # Dask too: array-api-compat's Dask clip fails on chunks of unknown size. Python scalars
    # (weakly typed: x keeps its dtype) rather than 0-d arrays, so that the chunks' own
    # library (NumPy or CuPy under Dask) holds the constants.
    return xp.where(x < EPSILON, EPSILON, xp.where(x > 1.0, 1.0, x))


def kl_divergence_generic(xp: ModuleType, y_true: Any, y_pred: Any, *,
                          fused_rows: bool = False, lib: Library | None = None) -> Any:
    """``sum(t * log(t / p), axis=-1)`` on the clipped inputs, in namespace ``xp``.

    Inputs are already in ``xp``, on one device, of one floating dtype, and broadcastable.
    ``fused_rows`` only matters where the table says ``no_fma`` (JAX), see below. ``lib``:
    ``xp``'s record in the libraries table, where the caller has it (a lookup asks whether
    ``torch.compile`` traces, about 0.1 us).
    """
    if lib is None:
        lib = library(xp)
    t = clip_unit(xp, y_true, lib=lib)
    p = clip_unit(xp, y_pred, lib=lib)
    ratio = t / p
    terms = t * xp.log(ratio)
    if lib.no_fma:
        # JAX: fused by XLA, the product would be contracted into the row sum's addition (one
        # FMA, one rounding instead of two): float32 -3.0809076e-06 for SPEC's -3.0809074e-06,
        # and the jitted fast path would differ from the op-by-op generic kernel. A select
        # between the product and another value (always the product after the clips; a NaN
        # passes through) stops the contraction. Asking ``t > 0`` keeps the whole row loop
        # fused (fast: one pass); its row sums equal the op-by-op ones for full-shape rows of
        # more than 32 classes, while rows of 17-32 classes are summed in another order and a
        # ``t`` broadcast along the class axis makes the select loop-invariant (hoisted, the
        # product contracted after all). Asking ``ratio > 0`` keeps the terms apart from the
        # row sum: equal in every case, but the gradient then takes about six passes. The JAX
        # fast path (``backends/jax_.py``) asks for the fused form where it is exact.
        terms = xp.where(t > 0, terms, t) if fused_rows else xp.where(ratio > 0, terms, ratio)
    return xp.sum(terms, axis=-1)
