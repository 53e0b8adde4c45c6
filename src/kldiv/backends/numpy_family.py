"""NumPy fast path of the divergence family: the generic formulas, a block of rows at a time.

The generic kernel, run on whole arrays, allocates about a dozen full-size temporaries (the
log-softmax of each side, the masks, the products). Here the rows are cut into blocks of
about :data:`BLOCK_ELEMENTS` elements: each block is brought to log space and reduced while it
sits in cache, and only one value per row is written. Extra memory is a few blocks, whatever
the input size (plus one broadcast copy when the inputs' shapes differ and cannot be viewed
as rows). The formulas are the generic kernels' (:mod:`kldiv._divergence`), so results agree
to rounding; NumPy has no autograd, so there is no backward pass to write.

Every function takes arrays already converted (same dtype, float32 or float64, broadcastable)
and returns the per-row divergence, or ``NotImplemented`` to let the generic kernel run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .._kernel import EPSILON

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
    out = x / temperature if temperature != 1.0 else x.copy()
    m = out.max(axis=-1, keepdims=True)
    m[m == -_INF] = 0.0  # a row of all -inf: the zero measure
    out -= m
    s = np.exp(out).sum(axis=-1, keepdims=True)
    s[s == 0.0] = 1.0
    out -= np.log(s, out=s)
    return out


def _kl_block(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    pa = np.exp(la)
    d = la - lb
    # pa == 0: a -inf entry of la (contributes 0) or an underflow (0, or +inf against lb = -inf)
    t = np.where(pa == 0.0, np.where(d == _INF, d, 0.0), pa * d)
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
    shape = np.broadcast_shapes(y_true.shape, y_pred.shape)
    if len(shape) == 0 or 0 in shape:
        return NotImplemented
    a, b = _as_rows(y_true, shape), _as_rows(y_pred, shape)
    n, c = a.shape
    out = np.empty(n, dtype=dtype)
    step = max(1, BLOCK_ELEMENTS // c)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            la = _log_block(a[r0:r1], spaces[0], temperature)
            lb = _log_block(b[r0:r1], spaces[1], temperature)
            out[r0:r1] = block(la, lb)
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
