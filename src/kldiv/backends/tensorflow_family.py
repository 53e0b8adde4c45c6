"""TensorFlow: the few extra namespace functions the divergence family's generic kernels call.

kldiv's TensorFlow shim (:mod:`kldiv.backends.tensorflow_`) holds what the Keras KL needs;
the family's kernels also call ``exp``, ``max`` (a row maximum, for log-softmax) and
``logaddexp``, and select with ``where`` on tensors of the inputs' rank, which TensorFlow's
``tf.where`` (``SelectV2``) refuses beyond rank :data:`SELECT_MAX_RANK` ("Broadcast between
[...] is not supported yet"), even for operands of one shape. :data:`namespace` is the shim
plus those three, and a ``where`` and a ``clip`` of any rank, each run on its first argument's device like the
shim's own functions. Imported only once a TensorFlow tensor has been seen (the shim imports
TensorFlow).
"""

from __future__ import annotations

import types
from typing import Any

import tensorflow as tf

from . import tensorflow_
from .tensorflow_ import _match, _on_input_device

__all__ = ["SELECT_MAX_RANK", "namespace"]

SELECT_MAX_RANK = 8
"""The highest rank ``tf.where`` selects at (TensorFlow 2.x: its broadcasting kernels stop at 8
dimensions); above it :func:`where` selects on flattened operands."""


def _high(*values: Any) -> bool:
    """Whether a tensor among ``values`` has a rank beyond :data:`SELECT_MAX_RANK` (where
    ``tf.where``, and the gradients of ``tf.maximum`` and ``tf.clip_by_value``, which select
    with it, fail)."""
    return any((getattr(v, "shape", None) is not None and v.shape.rank is not None
                and v.shape.rank > SELECT_MAX_RANK) for v in values)


def _select(condition: Any, x1: Any, x2: Any) -> Any:
    """``tf.where(condition, x1, x2)`` at any rank: above :data:`SELECT_MAX_RANK` the operands
    are broadcast to the result's shape and selected as 1-D tensors (a reshape and a broadcast:
    both differentiable, also in graphs), then reshaped back."""
    if not _high(condition, x1, x2):
        return tf.where(condition, x1, x2)
    shape = tf.broadcast_dynamic_shape(
        tf.broadcast_dynamic_shape(tf.shape(condition), tf.shape(x1)), tf.shape(x2))
    flat = [tf.reshape(tf.broadcast_to(v, shape), [-1]) for v in (condition, x1, x2)]
    return tf.reshape(tf.where(*flat), shape)


@_on_input_device
def where(condition: Any, x1: Any, x2: Any, /) -> Any:
    """The shim's ``where`` (Python scalars take the other operand's dtype), at any rank."""
    x1, x2 = _match(x1, x2)
    return _select(tf.convert_to_tensor(condition), x1, x2)


@_on_input_device
def exp(x: Any, /) -> Any:
    return tf.math.exp(x)


@_on_input_device
def max(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    return tf.reduce_max(x, axis=axis, keepdims=keepdims)


@_on_input_device
def clip(x: Any, /, min: Any = None, max: Any = None) -> Any:
    """The shim's ``clip``; beyond :data:`SELECT_MAX_RANK` two selections (the same values,
    NaN passes, and the same gradient: 1 inside the closed interval, 0 outside)."""
    if not _high(x) or min is None or max is None:
        return tensorflow_.namespace.clip(x, min, max)
    lo = tf.convert_to_tensor(min, dtype=x.dtype)
    hi = tf.convert_to_tensor(max, dtype=x.dtype)
    return _select(x < lo, lo, _select(x > hi, hi, x))


@_on_input_device
def logaddexp(x1: Any, x2: Any, /) -> Any:
    """``log(exp(x1) + exp(x2))``, stable; ``x1 + x2`` where both are ``-inf`` (or NaN)."""
    big = _select(x1 >= x2, x1, x2) if _high(x1, x2) else tf.maximum(x1, x2)
    delta = x1 - x2
    stable = big + tf.math.log1p(tf.math.exp(-tf.math.abs(delta)))
    return _select(tf.math.is_nan(delta), x1 + x2, stable)


def _build() -> types.ModuleType:
    base = tensorflow_.namespace
    ns = types.ModuleType(
        "kldiv.backends.tensorflow_family.namespace",
        "kldiv's TensorFlow namespace, with the divergence family's extra functions.",
    )
    ns.__dict__.update({k: v for k, v in vars(base).items() if not k.startswith("__")})
    for fn in (exp, max, logaddexp, where, clip):
        setattr(ns, fn.__name__, fn)
    ns.__kldiv_name__ = "tensorflow"  # type: ignore[attr-defined]
    return ns


namespace: types.ModuleType = _build()
"""The namespace the family's generic kernels use for TensorFlow tensors."""
