"""TensorFlow's adapter: an array-API namespace shim for ``tf.Tensor`` / ``tf.Variable``
inputs, its device scope, file targets and ``kldiv show`` rows.

TensorFlow tensors are not array-API objects, so kldiv gives them :data:`namespace`, a small
module holding exactly what the core (``_functional``, ``_kernel``, ``_reduction`` and
``_namespace``) calls on a namespace, written with TensorFlow ops. Everything therefore
works eagerly, inside ``tf.function`` (symbolic tensors, unknown batch sizes) and under
``tf.GradientTape``; the clip is ``tf.clip_by_value``, whose gradient is 1 inside the closed
interval ``[eps, 1]`` and 0 outside it, as in tf.keras.

Eagerly, every op runs on the device of its first tensor argument (``tf.device`` scope), so
the result stays on the input's device even where TensorFlow would place the op elsewhere
(e.g. a CPU tensor on a machine with a GPU). In a graph, placement is TensorFlow's.

This module imports TensorFlow; kldiv imports it only after it has seen a TensorFlow tensor
(the libraries table, :mod:`kldiv._libraries`, looks for it in ``sys.modules`` and never
imports it).
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from .._targets import Target

__all__ = ["device_scope", "estimator_ops", "namespace", "show_devices", "target"]

_DTYPES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
)  # fmt: skip


def _eager_device(x: Any) -> str | None:
    """The device an eager tensor lives on; ``None`` in a graph or for non-tensors."""
    if not isinstance(x, (tf.Tensor, tf.Variable)) or not tf.executing_eagerly():
        return None
    return x.device or None


def _on_input_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` on the device of its first argument (eagerly; a no-op in graphs)."""

    @functools.wraps(fn)
    def wrapper(x: Any, *args: Any, **kwargs: Any) -> Any:
        device = _eager_device(x)
        if device is None:
            return fn(x, *args, **kwargs)
        with tf.device(device):
            return fn(x, *args, **kwargs)

    return wrapper


def _dtype(dtype: Any) -> Any:
    return None if dtype is None else tf.as_dtype(dtype)


def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: bool | None = None) -> Any:
    """``obj`` (tensor, NumPy array, list, scalar) as a tensor, on ``device`` if given."""
    dtype = _dtype(dtype)
    if isinstance(obj, (tf.Tensor, tf.Variable)):
        out = tf.convert_to_tensor(obj)
        if dtype is not None and out.dtype != dtype:
            out = tf.cast(out, dtype)
        return out if device is None else to_device(out, device)
    if device is None:
        return tf.convert_to_tensor(obj, dtype=dtype)
    with tf.device(device):
        return tf.identity(tf.convert_to_tensor(obj, dtype=dtype))


@_on_input_device
def astype(x: Any, dtype: Any, /, *, copy: bool = True) -> Any:
    dtype = tf.as_dtype(dtype)
    if x.dtype == dtype:
        # tf.identity shares the buffer (which may be another library's, through DLPack)
        return tf.raw_ops.DeepCopy(x=x) if copy else x
    return tf.cast(x, dtype)


def _match(a: Any, b: Any) -> tuple[Any, Any]:
    """Python scalars take the dtype of the tensor on the other side (TF does not promote)."""
    a_tensor = isinstance(a, (tf.Tensor, tf.Variable))
    b_tensor = isinstance(b, (tf.Tensor, tf.Variable))
    if a_tensor and not b_tensor:
        b = tf.convert_to_tensor(b, dtype=a.dtype)
    elif b_tensor and not a_tensor:
        a = tf.convert_to_tensor(a, dtype=b.dtype)
    return a, b


@_on_input_device
def where(condition: Any, x1: Any, x2: Any, /) -> Any:
    x1, x2 = _match(x1, x2)
    return tf.where(condition, x1, x2)


@_on_input_device
def clip(x: Any, /, min: Any = None, max: Any = None) -> Any:
    lo = x.dtype.min if min is None else min
    hi = x.dtype.max if max is None else max
    # convert_to_tensor, not cast: tf.cast(1e-7, tf.float64) goes through float32 first and
    # would move the bound to 1.0000000117e-07
    return tf.clip_by_value(x, _bound(lo, x.dtype), _bound(hi, x.dtype))


def _bound(value: Any, dtype: Any) -> Any:
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, dtype)
    return tf.convert_to_tensor(value, dtype=dtype)


@_on_input_device
def sum(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: bool = False) -> Any:
    if dtype is not None:
        x = tf.cast(x, tf.as_dtype(dtype))
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


@_on_input_device
def mean(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    return tf.reduce_mean(x, axis=axis, keepdims=keepdims)


@_on_input_device
def log(x: Any, /) -> Any:
    return tf.math.log(x)


@_on_input_device
def isnan(x: Any, /) -> Any:
    return tf.math.is_nan(x)


@_on_input_device
def reshape(x: Any, /, shape: tuple[Any, ...], *, copy: bool | None = None) -> Any:
    return tf.reshape(x, [-1 if d is None else d for d in shape])


@_on_input_device
def expand_dims(x: Any, /, *, axis: int = 0) -> Any:
    return tf.expand_dims(x, axis=axis)


@_on_input_device
def squeeze(x: Any, /, axis: Any) -> Any:
    return tf.squeeze(x, axis=axis)


@_on_input_device
def broadcast_to(x: Any, /, shape: tuple[Any, ...]) -> Any:
    return tf.broadcast_to(x, shape)


@_on_input_device
def ones_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.ones_like(x, dtype=_dtype(dtype))


@_on_input_device
def zeros_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.zeros_like(x, dtype=_dtype(dtype))


def concat(arrays: Any, /, *, axis: int | None = 0) -> Any:
    """The tensors joined along ``axis`` (``None``: flattened first), on the first's device."""
    arrays = list(arrays)
    if axis is None:
        arrays, axis = [tf.reshape(a, [-1]) for a in arrays], 0
    device = _eager_device(arrays[0]) if arrays else None
    if device is None:
        return tf.concat(arrays, axis=axis)
    with tf.device(device):
        return tf.concat(arrays, axis=axis)


def device(x: Any, /) -> Any:
    """The tensor's device string (``None`` in a graph, where TensorFlow places ops)."""
    return x.device or None


def to_device(x: Any, device: Any, /) -> Any:
    """A copy of ``x`` on ``device`` (eagerly; in a graph, placement is TensorFlow's)."""
    if device is None or not tf.executing_eagerly() or x.device == device:
        return x
    with tf.device(device):
        return tf.identity(x)


def from_dlpack(x: Any, /) -> Any:
    """Another library's array as a tensor, zero-copy through DLPack where TF can do it.

    NumPy arrays are copied (``tf.convert_to_tensor``): TF tensors are immutable, and a NumPy
    array may be changed by its owner afterwards. In a graph there is no DLPack: an error,
    and the caller falls back to a copy through NumPy.
    """
    if isinstance(x, np.ndarray):
        return tf.convert_to_tensor(x)
    if not tf.executing_eagerly():
        raise TypeError("DLPack import needs eager execution")
    capsule = x.__dlpack__() if hasattr(x, "__dlpack__") else x
    return tf.experimental.dlpack.from_dlpack(capsule)


def _build() -> types.ModuleType:
    ns = types.ModuleType("kldiv.backends.tensorflow_.namespace", "kldiv's TensorFlow namespace.")
    for fn in (asarray, astype, where, clip, sum, mean, log, isnan, reshape, expand_dims,
               squeeze, broadcast_to, ones_like, zeros_like, concat, device, to_device, from_dlpack):
        setattr(ns, fn.__name__, fn)
    for name in _DTYPES:
        setattr(ns, name, tf.as_dtype(name))
    ns.__kldiv_name__ = "tensorflow"  # type: ignore[attr-defined]
    return ns


namespace: types.ModuleType = _build()
"""The namespace kldiv uses for TensorFlow tensors (``kldiv._namespace.array_namespace``)."""


def estimator_ops(xp: types.ModuleType) -> tuple[Any, ...]:
    """The estimators' ``(where, expm1, isfinite, isnan, stop_gradient, quiet)``: what the
    shim does not hold comes from ``tf.math``."""
    return (xp.where, tf.math.expm1, tf.math.is_finite, tf.math.is_nan, tf.stop_gradient,
            contextlib.nullcontext)


def device_scope(device: Any) -> Any:
    """``tf.device(device)`` eagerly, so the operators between the shim's ops stay there too."""
    if not device or not tf.executing_eagerly():
        return None
    return tf.device(device)


def target(device: str | None) -> Any:
    """A file target on ``device`` (``"gpu"``, ``"cuda:1"``, ``"/device:CPU:0"``...)."""
    name = None
    if device is not None:
        kind, _, index = device.lstrip("/").removeprefix("device:").partition(":")
        kind = {"cuda": "GPU", "rocm": "GPU"}.get(kind.lower(), kind.upper())
        name = f"/device:{kind}:{int(index or 0)}"
        listed = [d.name for d in tf.config.list_logical_devices()]
        if name not in listed:
            raise RuntimeError(f"TensorFlow lists {', '.join(listed)}")

    def place(make: Callable[[], Any]) -> Any:
        if name is None:
            return make()
        with tf.device(name):
            return tf.identity(make())

    return Target("tensorflow", lambda a: place(lambda: tf.convert_to_tensor(a)),
                  lambda x: place(lambda: x), lambda x: isinstance(x, tf.Tensor))


def show_devices() -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
    """``kldiv show``'s rows: each CPU and GPU TensorFlow lists."""
    for dev in tf.config.list_logical_devices():
        if dev.device_type not in ("CPU", "GPU"):
            continue

        def to_tf(v: Any, name: str = dev.name) -> Any:
            with tf.device(name):
                return tf.identity(tf.constant(v, dtype=tf.float32))

        yield dev.name.removeprefix("/device:"), to_tf, ""
