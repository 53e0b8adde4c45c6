"""NumPy fast path of the divergence family: its per-block terms, on the NumPy engine.

The generic kernel, run on whole arrays, allocates about a dozen full-size temporaries (the
log-softmax of each side, the masks, the products). Here the engine
(:func:`kldiv.backends.numpy_engine.row_blocks`) cuts the rows into blocks of about
:data:`BLOCK_ELEMENTS` elements: each block is brought to log space (:func:`_log_block`) and
reduced by the member's terms (:func:`_kl_block`, :func:`_js_block`) while it sits in cache,
and only one value per row is written. A new member's NumPy fast path is its block function
and nothing else. Extra memory is a few blocks, whatever the input size (plus one broadcast
copy when the inputs' shapes differ and cannot be viewed as rows); the blocks run in the
calling thread, so that bound holds for the whole call. The formulas are the generic
kernels' (:mod:`kldiv._divergence`), so results agree to rounding; NumPy has no autograd,
so there is no backward pass to write.

Every function takes arrays already converted (same dtype, float32 or float64, broadcastable)
and returns the per-row divergence, or ``NotImplemented`` to let the generic kernel run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .._kernel import EPSILON
from .._spaces import broadcast_shapes
from .._temperature import temperature_flat, temperature_limit
from . import numpy_engine as engine

__all__ = ["BLOCK_ELEMENTS", "js", "kl", "reverse_kl"]

BLOCK_ELEMENTS = 1 << 16
"""Elements of one block of rows (256 KiB in float32): a handful of them fit in L2 cache."""

_INF = np.inf


def _as_rows(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``x`` broadcast to ``shape`` as ``(rows, classes)``: a view where one exists."""
    return np.broadcast_to(x, shape).reshape(-1, shape[-1])


def _log_block(x: np.ndarray, space: str, temperature: float) -> np.ndarray:
    """A block of rows in log space (a new array; ``x`` is never written)."""
    if space == "log_probs":
        return x
    if space == "probs":
        out = np.clip(x, EPSILON, 1.0)
        return np.log(out, out=out)
    m = x.max(axis=-1, keepdims=True)
    m[m == -_INF] = 0.0  # a row of all -inf: the zero measure
    out = x - m  # shifted before the division: a tiny temperature cannot overflow it
    if temperature_limit(temperature, x.dtype):  # T is 0 in the dtype: the T -> 0 limit
        out = np.where(out == 0.0, 0.0, np.where(out < 0.0, -_INF, out))
    elif temperature_flat(temperature, x.dtype):  # 1 / T is 0 in the dtype: the T -> inf limit
        out = np.where(out == -_INF, -_INF, np.where(out == out, 0.0, out))
    elif temperature != 1.0:
        out /= temperature
    s = np.exp(out).sum(axis=-1, keepdims=True)
    s[s == 0.0] = 1.0
    out -= np.log(s, out=s)
    return out


def _kl_block(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    pa = np.exp(la)
    d = la - lb
    # pa == 0: a -inf entry of la (contributes 0) or an underflow (0; +inf against lb = -inf,
    # NaN against a NaN: the probability is not 0 there)
    t = np.where(pa == 0.0, np.where((d < _INF) | (la == -_INF), 0.0, d), pa * d)
    return t.sum(axis=-1)


def _js_block(beta: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    log_b, log_1mb = math.log(beta), math.log1p(-beta)

    def block(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
        lm = np.logaddexp(lp + log_b, lq + log_1mb)
        p = np.exp(lp)
        kl_pm = np.where(p == 0.0, 0.0, p * (lp - lm)).sum(axis=-1)
        q = np.exp(lq)
        kl_qm = np.where(q == 0.0, 0.0, q * (lq - lm)).sum(axis=-1)
        return beta * kl_pm + (1.0 - beta) * kl_qm

    return block


def _run(block: Callable[[np.ndarray, np.ndarray], np.ndarray], y_true: Any, y_pred: Any,
         spaces: tuple[str, str], temperature: float) -> Any:
    if type(y_true) is not np.ndarray or type(y_pred) is not np.ndarray:
        return NotImplemented  # subclasses (masked arrays, matrices): the generic kernel
    dtype = y_pred.dtype
    if y_true.dtype != dtype or dtype not in (np.float32, np.float64):
        return NotImplemented
    # kldiv's own broadcast: NumPy's broadcast_shapes stops at 32 dimensions (arrays go to 64)
    shape = broadcast_shapes(y_true.shape, y_pred.shape, what="y_true and y_pred")
    if len(shape) == 0 or 0 in shape:
        return NotImplemented

    def rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        la = _log_block(a, spaces[0], temperature)
        lb = _log_block(b, spaces[1], temperature)
        return block(la, lb)

    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = engine.row_blocks(rows, _as_rows(y_true, shape), _as_rows(y_pred, shape),
                                elements=BLOCK_ELEMENTS, threaded=False)
    return out.reshape(shape[:-1])


def kl(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float) -> Any:
    """``KL(P || Q)`` per row (P from ``y_true``), or ``NotImplemented``."""
    return _run(_kl_block, y_true, y_pred, spaces, temperature)


def reverse_kl(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float) -> Any:
    """``KL(Q || P)`` per row, or ``NotImplemented``."""
    return _run(_kl_block, y_pred, y_true, (spaces[1], spaces[0]), temperature)


def js(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float,
       beta: float) -> Any:
    """The generalized Jensen-Shannon divergence per row, or ``NotImplemented``."""
    return _run(_js_block(beta), y_true, y_pred, spaces, temperature)
