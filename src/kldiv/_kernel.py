"""The generic kernel, written against the Python array API standard only."""

from __future__ import annotations

from types import ModuleType
from typing import Any

EPSILON = 1e-7
"""Keras' ``backend.epsilon()``: the lower clip bound of both inputs."""


def clip_unit(xp: ModuleType, x: Any) -> Any:
    """Clip ``x`` to ``[EPSILON, 1]``; NaN passes through.

    Written with ``where`` rather than ``clip`` so that every backend has the same gradient:
    1 inside the closed interval, 0 outside it (what TensorFlow's and PyTorch's clips give;
    JAX's ``clip`` would halve it at the bounds).
    """
    lo = xp.asarray(EPSILON, dtype=x.dtype)
    hi = xp.asarray(1.0, dtype=x.dtype)
    return xp.where(x < lo, lo, xp.where(x > hi, hi, x))


def kl_divergence_generic(xp: ModuleType, y_true: Any, y_pred: Any) -> Any:
    """``sum(t * log(t / p), axis=-1)`` on the clipped inputs, in namespace ``xp``.

    Inputs are already in ``xp``, on one device, of one floating dtype, and broadcastable.
    """
    t = clip_unit(xp, y_true)
    p = clip_unit(xp, y_pred)
    return xp.sum(t * xp.log(t / p), axis=-1)
