"""CuPy fast path: one fused ``cupy.ReductionKernel``.

The clipping, the ratio, the logarithm, the product and the row sum run in a single kernel
that reads each input element once and writes one value per row: no temporaries at all.
Broadcast inputs are read through their strides. CuPy has no autograd, so there is no
backward pass to fuse.
"""

from __future__ import annotations

from typing import Any

import cupy as cp

from ._common import broadcast_floats

__all__ = ["kl_divergence"]

_PREAMBLE = r"""
template <typename T> __device__ __forceinline__ T kldiv_clip(T x) {
    // [1e-7, 1]; NaN fails both comparisons and passes through, as in the generic kernel
    return x < (T)1e-7 ? (T)1e-7 : (x > (T)1 ? (T)1 : x);
}
template <typename T> __device__ __forceinline__ T kldiv_term(T t, T p) {
    t = kldiv_clip(t);
    p = kldiv_clip(p);
    return t * log(t / p);
}
"""

_kernel = cp.ReductionKernel(
    "T t, T p",  # inputs (float32 or float64)
    "T y",  # output
    "kldiv_term(t, p)",  # map
    "a + b",  # reduce
    "y = a",  # post-map
    "0",  # identity
    "kldiv_kl_divergence",
    preamble=_PREAMBLE,
)


def kl_divergence(y_true: Any, y_pred: Any) -> Any:
    """Fused ``sum(t * log(t / p), axis=-1)`` on clipped CuPy arrays.

    Parameters
    ----------
    y_true, y_pred : cupy.ndarray
        Same floating dtype (float32 or float64), same device, broadcastable shapes.

    Returns
    -------
    cupy.ndarray or NotImplemented
        The per-sample loss, or ``NotImplemented`` for other dtypes and empty inputs.
    """
    tp = broadcast_floats(cp, y_true, y_pred)
    if tp is None:
        return NotImplemented
    return _kernel(*tp, axis=-1)
