"""The functional API: ``kl_divergence`` and its aliases."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from . import backends
from ._kernel import kl_divergence_generic
from ._namespace import (
    array_namespace,
    as_pred_array,
    device_scope,
    dtype_kind,
    get_device,
    is_dask,
    is_low_precision,
    namespace_name,
    native_namespace,
    numpy_result,
    to_namespace,
    torch_compiling,
)

__all__ = ["KLD", "kl_divergence", "kld", "kullback_leibler_divergence", "prepare"]


class Prepared(NamedTuple):
    """Inputs brought to one library, device and dtype, ready for a kernel."""

    xp: ModuleType
    y_true: Any
    y_pred: Any
    out_dtype: Any  # the dtype the caller gets back
    device: Any


def _shape_str(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def broadcast_shapes(a: tuple[Any, ...], b: tuple[Any, ...], *, what: str) -> tuple[Any, ...]:
    """NumPy broadcasting of two shapes, with a ``ValueError`` naming both when it fails.

    Unknown sizes (``None``, or NaN from Dask) are accepted against anything.
    """
    if a == b and None not in a:
        return a
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        da = None if da is None or da != da else da  # NaN from Dask
        db = None if db is None or db != db else db
        if da == 1:
            out.append(db)
        elif db == 1 or db is None or da is None or da == db:
            out.append(da if da is not None else db)
        else:
            raise ValueError(f"{what}: shapes {_shape_str(a)} and {_shape_str(b)} do not broadcast.")
    return tuple(reversed(out))


def _given(shapes: tuple[tuple[Any, ...], tuple[Any, ...]]) -> str:
    return f"y_true of shape {_shape_str(shapes[0])} and y_pred of shape {_shape_str(shapes[1])}"


def _squeeze_last(xp: ModuleType, x: Any) -> Any:
    return xp.reshape(x, tuple(x.shape[:-1]))


def prepare(y_true: Any, y_pred: Any, *, squeeze: bool = True) -> Prepared:
    """Validate and convert both inputs (SPEC §1-2). Never modifies them.

    With ``squeeze=True`` (the loss class, the metric and the streaming evaluation), Keras 2's
    ``squeeze_or_expand_dimensions`` runs first: when the ranks differ by one and the larger
    has a trailing axis of 1, that axis is dropped. The function ``kl_divergence`` passes
    ``squeeze=False``: like ``tf.keras.losses.kld`` it broadcasts the inputs as given.
    """
    if y_pred is None or y_true is None:
        raise TypeError("y_true and y_pred must be arrays, lists or numbers, not None.")
    y_pred = as_pred_array(y_pred)
    if is_dask(y_true) and isinstance(y_pred, np.ndarray):
        # Dask is NumPy's chunked container: as with ``dask_array + ndarray``, a Dask y_true
        # against a NumPy y_pred keeps the call lazy rather than computing y_true. Against
        # any other library, y_true is computed and moved to y_pred's library and device.
        import dask.array as da

        y_pred = da.asarray(y_pred)
    try:
        xp = array_namespace(y_pred)
    except TypeError as exc:
        raise TypeError(f"y_pred of type {type(y_pred).__name__} is not a supported array: {exc}") from None

    pred_dtype = y_pred.dtype
    kind = dtype_kind(pred_dtype)
    if kind in {"int", "bool"}:
        out_dtype = xp.float32
    elif kind == "float":
        out_dtype = pred_dtype
    elif kind == "complex":
        raise TypeError(f"y_pred has complex dtype {pred_dtype}; KL divergence needs real values.")
    else:
        raise TypeError(f"y_pred has dtype {pred_dtype}, which is not a numeric dtype.")
    compute_dtype = xp.float32 if is_low_precision(out_dtype) else out_dtype

    device = get_device(y_pred)
    if y_pred.dtype != compute_dtype:
        y_pred = xp.astype(y_pred, compute_dtype)
    y_true = to_namespace(y_true, xp, device, compute_dtype, what="y_true")

    given = (tuple(y_true.shape), tuple(y_pred.shape))
    squeezed = ""  # which input lost its trailing axis (messages are built only on errors:
    # formatting symbolic shapes would break a torch.compile graph)
    if squeeze:
        # Keras 2's squeeze_or_expand_dimensions: ranks differing by one with a trailing axis
        # of 1 on the larger -> that axis is squeezed.
        if y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
            y_true = _squeeze_last(xp, y_true)
            squeezed = "y_true"
        elif y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
            y_pred = _squeeze_last(xp, y_pred)
            squeezed = "y_pred"

    if y_true.ndim == 0 and y_pred.ndim == 0:
        # A scalar broadcasts against an array (Python scalars are accepted), but with no
        # array at all there is no class axis to sum over.
        raise ValueError(
            f"kl_divergence needs a class axis (an input of at least 1-d); got {_given(given)}."
        )
    try:
        broadcast_shapes(tuple(y_true.shape), tuple(y_pred.shape), what="y_true and y_pred")
    except ValueError:
        note = ""
        if squeezed:
            now = tuple((y_true if squeezed == "y_true" else y_pred).shape)
            note = (f" (after Keras' rank rule for losses and metrics: {squeezed}'s trailing axis "
                    f"of 1 squeezed, giving {_shape_str(now)})")
        raise ValueError(f"{_given(given)} do not broadcast{note}.") from None
    return Prepared(xp, y_true, y_pred, out_dtype, device)


def compute(prep: Prepared, *, cast: bool = True) -> Any:
    """Run the fast path for ``prep.xp`` if there is one, else the generic kernel.

    With ``cast=False`` the loss stays in the compute dtype (float32 for float16/bfloat16
    inputs), for a reduction that must not overflow before the final cast.
    """
    scope = device_scope(prep.xp, prep.device)
    if scope is None:
        return _compute(prep, cast)
    with scope:
        return _compute(prep, cast)


def _compute(prep: Prepared, cast: bool) -> Any:
    xp = prep.xp
    kernel_xp = xp
    if torch_compiling():
        # dynamo traces the generic kernel; with torch's own functions, as array-api-compat's
        # wrappers hold Python checks that break the graph (clip's isnan on symbolic bounds)
        kernel = None
        if namespace_name(xp) == "torch":
            kernel_xp = sys.modules["torch"]
    else:
        kernel = backends.fast_path(namespace_name(xp))
        kernel_xp = native_namespace(xp)
    loss = NotImplemented
    if kernel is not None:
        loss = kernel(prep.y_true, prep.y_pred)
    if loss is NotImplemented:
        loss = kl_divergence_generic(kernel_xp, prep.y_true, prep.y_pred)
    if cast and loss.dtype != prep.out_dtype:
        loss = xp.astype(loss, prep.out_dtype)
    return loss


def kl_divergence(y_true: Any, y_pred: Any, /) -> Any:
    """Keras' Kullback-Leibler divergence loss, in the inputs' own library and device.

    ``loss = sum(t * log(t / p), axis=-1)`` with ``t = clip(y_true, 1e-7, 1)`` and
    ``p = clip(y_pred, 1e-7, 1)``, exactly as ``tf.keras.losses.kl_divergence``.

    Parameters
    ----------
    y_true : array_like
        True distributions, shape ``(..., C)``. Any supported library (NumPy, PyTorch, JAX,
        CuPy, Dask, array-API), a Python list or a number; converted to ``y_pred``'s library,
        device and dtype (through DLPack where it can be).
    y_pred : array_like
        Predicted distributions, broadcastable with ``y_true``. Its library and device are
        where the computation runs.

    Returns
    -------
    array
        The per-sample loss, of shape ``broadcast(y_true, y_pred).shape[:-1]``: an array of
        ``y_pred``'s library on its device, with its floating dtype (integer and bool
        ``y_pred`` give float32; float16/bfloat16 are computed in float32 and rounded back).
        On NumPy a 0-d result (1-d inputs) is a NumPy scalar, as NumPy's own reductions
        give. A Dask input gives a lazy Dask array.

    Raises
    ------
    TypeError
        If ``y_true`` cannot be cast to ``y_pred``'s dtype (strings, objects, complex), an
        input is not an array, or it is a sparse array.
    ValueError
        If both inputs are 0-d (there is no class axis) or the shapes do not broadcast (the
        message names the shapes as given).

    Notes
    -----
    The inputs broadcast as given, like ``tf.keras.losses.kld`` and
    ``keras.losses.kl_divergence``: ``y_true`` of shape ``(3, 1)`` against ``y_pred`` of shape
    ``(3,)`` gives shape ``(3,)``. Keras' rank squeeze (a trailing axis of 1 dropped when the
    ranks differ by one) belongs to the loss class, :class:`kldiv.KLDivergence`.

    Values outside ``[0, 1]`` are clipped silently, as in Keras; NaN propagates. The
    gradient is that of the formula inside the clip range and 0 for clipped elements, and is
    finite for zeros in either input.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> kldiv.kl_divergence([.4, .9, .2], [.5, .8, .12])
    np.float32(0.11891246)
    >>> kldiv.kld(np.array([[0., 1.], [0., 0.]]), np.array([[.6, .4], [.4, .6]]))
    array([ 9.16289171e-01, -3.08090749e-06])
    >>> kldiv.kld(np.full((3, 1), 0.5), np.full(3, 0.25)).shape   # broadcast, no squeeze
    (3,)
    """
    return numpy_result(compute(prepare(y_true, y_pred, squeeze=False)))


kld = kl_divergence
KLD = kl_divergence
kullback_leibler_divergence = kl_divergence
