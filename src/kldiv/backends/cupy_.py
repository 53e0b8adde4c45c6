"""CuPy: the Keras KL fast path (one fused ``cupy.ReductionKernel``) and the adapter (file
targets, ``kldiv show`` rows).

The clipping, the ratio, the logarithm, the product and the row sum run in a single kernel
that reads each input element once and writes one value per row: no temporaries at all.
Broadcast inputs are read through their strides. CuPy has no autograd, so there is no
backward pass to fuse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import cupy as cp

from .._targets import Target
from ._common import broadcast_floats

__all__ = ["keras_kl", "show_devices", "target"]

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


def keras_kl(y_true: Any, y_pred: Any) -> Any:
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


# ------------------------------------------------------------------------------ the adapter
def target(device: str | None) -> Target:
    """A target on a CUDA device (``"cuda"``, ``"cuda:1"``; default ``cuda:0``)."""
    platform, _, index = (device or "cuda:0").partition(":")
    if platform.lower() not in ("cuda", "gpu"):
        raise RuntimeError(f"CuPy runs on CUDA devices ('cuda', 'cuda:1'), not {platform!r}")
    gpu = int(index or 0)

    def to_cupy(x: Any) -> Any:
        with cp.cuda.Device(gpu):
            return cp.asarray(x)

    return Target("cupy", to_cupy, to_cupy, lambda x: isinstance(x, cp.ndarray))


def show_devices() -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
    """``kldiv show``'s rows: each CUDA device (none: why)."""
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # installed, but no driver / GPU
        yield "-", None, f"installed but unusable here: {type(exc).__name__}: {exc}"
        return
    for i in range(n):
        def conv(v: Any, i: int = i) -> Any:
            with cp.cuda.Device(i):
                return cp.asarray(v, dtype=cp.float32)
        yield f"cuda:{i}", conv, ""
