"""NumPy fast path of the Keras KL: its terms and their gradient, on the NumPy engine.

The generic kernel makes about six passes over the data and allocates five full-size
temporaries. Here :mod:`kldiv.backends.numpy_engine` cuts the rows into blocks of about
:data:`~kldiv.backends.numpy_engine.BLOCK_BYTES` per operand and spreads them over its thread
pool; this module gives it the terms of one block (:func:`_terms`: clipped into two small
per-thread scratch buffers, ``t / p``, ``log`` and ``t * ...`` in place there while the block
is still in cache) and their gradient (:func:`_grad_terms`).

For C-like layouts (see :func:`_c_like`: C order, row slices, reversed axes, broadcasting)
the result is **bitwise identical** to the generic kernel, at any size: every element goes
through the same ufuncs (clipping, division, ``log`` and multiplication are element-wise, so
the blocking does not change them), and every row is summed by ``np.add.reduce`` over a
contiguous buffer of the row's full length, which is NumPy's pairwise summation, exactly as
in the generic path (a row longer than the scratch budget is split along NumPy's own
pairwise tree by the engine, so the sum is still the same to the last bit).

Other layouts (Fortran order, transposes, swapped axes, one C and one F input): NumPy lays
the formula's temporaries out in the inputs' order and sums their rows in another order (for
Fortran order: element after element, not pairwise). Up to :data:`AS_WRITTEN_MAX_BYTES` per
full-size temporary they run the formula as written (:func:`_as_written`), bitwise the
generic kernel; above it, the blocked kernel, in bounded memory, bitwise the generic kernel
on C-ordered copies of the inputs (the last bits of a row's sum may then differ from the
generic kernel on the inputs as given).

Extra peak memory (the output excluded): ``2 * BLOCK_BYTES`` per thread working on the call
(three buffers and a boolean mask in the backward pass used by the PyTorch CPU path), i.e. at
most ``3.25 * 1 MiB * MAX_THREADS = 26 MiB``, whatever the input size (plus as much again for
each call that re-enters one of these threads, e.g. from a signal handler). Fork, interpreter
shutdown and re-entry: see :mod:`kldiv.backends.numpy_engine`.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from .._kernel import EPSILON
from . import numpy_engine as engine
from ._common import broadcast_floats

__all__ = ["backward", "forward", "keras_kl"]

SMALL_ELEMENTS = 1 << 14
"""Inputs of at most this many elements skip the blocking (see :func:`_small`)."""
AS_WRITTEN_MAX_BYTES = 16 * 1024 * 1024
"""Fortran-ordered/transposed inputs whose full-size temporary (the broadcast shape) is at most
this many bytes go through :func:`_as_written`; larger ones through the memory-bounded blocked
kernel."""


def _terms(t_src: np.ndarray, p_src: np.ndarray, tb: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """``t * log(t / p)`` of one block, computed in the scratch buffers; returns ``pb``."""
    np.clip(t_src, EPSILON, 1.0, out=tb)
    np.clip(p_src, EPSILON, 1.0, out=pb)
    np.divide(tb, pb, out=pb)
    np.log(pb, out=pb)
    np.multiply(tb, pb, out=pb)
    return pb


def _grad_terms(full: list[np.ndarray | None], columns: list[np.ndarray],
                scratch: list[np.ndarray]) -> None:
    """Gradients of one block: ``-t/p * g`` and ``(log(t/p) + 1) * g``, 0 where clipped."""
    t_src, p_src, gt, gp = full
    assert t_src is not None and p_src is not None
    gcol = columns[0]
    tb, pb, rb, mb = scratch
    np.clip(t_src, EPSILON, 1.0, out=tb)
    np.clip(p_src, EPSILON, 1.0, out=pb)
    np.divide(tb, pb, out=rb)
    if gp is not None:
        np.multiply(rb, gcol, out=gp)
        np.negative(gp, out=gp)
        np.not_equal(pb, p_src, out=mb)  # clipped (or NaN): gradient 0
        np.copyto(gp, 0, where=mb)
    if gt is not None:
        np.log(rb, out=rb)
        np.add(rb, 1, out=rb)
        np.multiply(rb, gcol, out=gt)
        np.not_equal(tb, t_src, out=mb)
        np.copyto(gt, 0, where=mb)


def _prepare(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if not (type(y_true) is np.ndarray and type(y_pred) is np.ndarray):
        return None  # subclasses (masked arrays, np.matrix) keep their own ufunc semantics
    return broadcast_floats(np, y_true, y_pred)


def forward(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray | None:
    """The per-sample loss as an ndarray (0-d for 1-d inputs), or ``None`` to decline."""
    tp = _prepare(y_true, y_pred)
    if tp is None:
        return None
    return engine.row_sums(_terms, *tp)


def backward(
    y_true: np.ndarray, y_pred: np.ndarray, grad: np.ndarray, need_true: bool, need_pred: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Gradients of ``sum(loss * grad)`` with respect to both inputs, of the broadcast shape.

    ``d/dp = -t / p * grad`` and ``d/dt = (log(t / p) + 1) * grad`` where the input is
    inside ``[eps, 1]``, 0 where it was clipped (or is NaN). The caller reduces a broadcast
    input's gradient to its own shape.
    """
    tp = _prepare(y_true, y_pred)
    if tp is None:
        raise ValueError("backward needs float32/float64 ndarrays of a non-empty shape")
    t, p = tp
    g = np.broadcast_to(np.asarray(grad, dtype=t.dtype), t.shape[:-1])
    gt = np.empty(t.shape, t.dtype) if need_true else None
    gp = np.empty(t.shape, t.dtype) if need_pred else None
    if gt is not None or gp is not None:
        engine.map_blocks(_grad_terms, [t, p, gt, gp], [g], scratch=3, mask=True)
    return gt, gp


def _whole(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The clipped inputs for the whole-array kernels, or ``None`` to decline (dtypes other
    than float32/float64, mixed dtypes, empty or 0-d inputs)."""
    dtype = y_pred.dtype
    if dtype != y_true.dtype or dtype not in (np.float32, np.float64):
        return None
    if y_true.size == 0 or y_pred.size == 0 or max(y_true.ndim, y_pred.ndim) == 0:
        return None
    return np.clip(y_true, EPSILON, 1.0), np.clip(y_pred, EPSILON, 1.0)


def _small(y_true: np.ndarray, y_pred: np.ndarray) -> Any:
    """Small inputs (per-call overhead matters more than memory): the formula in place.

    Two clipped copies and one C-ordered ratio buffer that the logarithm and the product
    overwrite; the same ufuncs and the same row sums as the generic kernel.
    """
    clipped = _whole(y_true, y_pred)
    if clipped is None:
        return NotImplemented
    t, p = clipped
    q = np.divide(t, p, order="C")
    np.log(q, out=q)
    np.multiply(t, q, out=q)
    return np.add.reduce(q, axis=-1)


def _c_like(x: np.ndarray) -> bool:
    """True when NumPy's elementwise results for ``x`` are laid out in C order: the strides of
    its non-broadcast axes (extent > 1) do not grow from the first axis to the last. Then
    every row of ``t * log(t / p)`` is contiguous and NumPy sums it pairwise, as the blocked
    kernels do."""
    st = [abs(s) for s, n in zip(x.strides, x.shape, strict=True) if n > 1 and s != 0]
    return all(a >= b for a, b in itertools.pairwise(st))


def _temporaries_fit(y_true: np.ndarray, y_pred: np.ndarray) -> bool:
    """Whether one full-size temporary of the broadcast shape stays within
    :data:`AS_WRITTEN_MAX_BYTES`."""
    shape = np.broadcast_shapes(y_true.shape, y_pred.shape)
    return math.prod(shape) * max(y_true.itemsize, y_pred.itemsize) <= AS_WRITTEN_MAX_BYTES


def _as_written(y_true: np.ndarray, y_pred: np.ndarray) -> Any:
    """Other layouts (Fortran order, transposes): the formula exactly as Keras' docs write it.

    NumPy lays such temporaries out in the inputs' own order and sums their rows in another
    order than pairwise, so only the formula as written gives the documented float64 result
    bit for bit (SPEC §1). It makes the formula's full-size temporaries, so it is used only up
    to :data:`AS_WRITTEN_MAX_BYTES` per temporary; larger inputs of these layouts go through
    the memory-bounded blocked kernel (rows summed pairwise, as for a C-ordered copy).
    """
    clipped = _whole(y_true, y_pred)
    if clipped is None:
        return NotImplemented
    t, p = clipped
    return np.sum(t * np.log(t / p), axis=-1)


def keras_kl(y_true: Any, y_pred: Any) -> Any:
    """Blocked, threaded ``sum(t * log(t / p), axis=-1)`` on the clipped NumPy inputs.

    Parameters
    ----------
    y_true, y_pred : numpy.ndarray
        Same floating dtype (float32 or float64), broadcastable shapes, any strides. Never
        modified.

    Returns
    -------
    numpy.ndarray or NotImplemented
        The per-sample loss, or ``NotImplemented`` (the generic kernel then runs) for dtypes
        other than float32/float64 and empty inputs. Bitwise equal to the generic kernel's
        for C-like layouts at any size, and for other layouts (Fortran order, transposes)
        whose full-size temporary is at most :data:`AS_WRITTEN_MAX_BYTES`; for larger inputs
        of those layouts, bitwise equal to the generic kernel on C-ordered copies of the
        inputs, in bounded memory.
    """
    if type(y_true) is np.ndarray and type(y_pred) is np.ndarray:
        if not (_c_like(y_true) and _c_like(y_pred)) and _temporaries_fit(y_true, y_pred):
            return _as_written(y_true, y_pred)
        if max(y_true.size, y_pred.size) <= SMALL_ELEMENTS:
            return _small(y_true, y_pred)
    out = forward(y_true, y_pred)
    if out is None:
        return NotImplemented
    if out.ndim == 0:
        return out[()]
    return out
