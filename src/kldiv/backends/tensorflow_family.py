"""TensorFlow: the few extra namespace functions the divergence family's generic kernels call.

kldiv's TensorFlow shim (:mod:`kldiv.backends.tensorflow_`) holds what the Keras KL needs;
the family's kernels also call ``exp``, ``max`` (a row maximum, for log-softmax) and
``logaddexp``. :data:`namespace` is the shim plus those three, each run on its first
argument's device like the shim's own functions. Imported only once a TensorFlow tensor has
been seen (the shim imports TensorFlow).
"""

from __future__ import annotations

import types
from typing import Any

import tensorflow as tf

from . import tensorflow_
from .tensorflow_ import _on_input_device

__all__ = ["namespace"]


@_on_input_device
def exp(x: Any, /) -> Any:
    return tf.math.exp(x)


@_on_input_device
def max(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    return tf.reduce_max(x, axis=axis, keepdims=keepdims)


@_on_input_device
def logaddexp(x1: Any, x2: Any, /) -> Any:
    """``log(exp(x1) + exp(x2))``, stable; ``x1 + x2`` where both are ``-inf`` (or NaN)."""
    big = tf.maximum(x1, x2)
    delta = x1 - x2
    stable = big + tf.math.log1p(tf.math.exp(-tf.math.abs(delta)))
    return tf.where(tf.math.is_nan(delta), x1 + x2, stable)


def _build() -> types.ModuleType:
    base = tensorflow_.namespace
    ns = types.ModuleType(
        "kldiv.backends.tensorflow_family.namespace",
        "kldiv's TensorFlow namespace, with the divergence family's extra functions.",
    )
    ns.__dict__.update({k: v for k, v in vars(base).items() if not k.startswith("__")})
    for fn in (exp, max, logaddexp):
        setattr(ns, fn.__name__, fn)
    ns.__kldiv_name__ = "tensorflow"  # type: ignore[attr-defined]
    return ns


namespace: types.ModuleType = _build()
"""The namespace the family's generic kernels use for TensorFlow tensors."""
