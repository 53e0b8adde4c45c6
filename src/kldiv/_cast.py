"""A result cast to its dtype: a value beyond the dtype's range is ``inf`` (as Keras' cast
gives it), with no warning from any library (NumPy's, or Dask's at ``compute()``)."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from ._libraries import library

__all__ = ["cast_quietly", "cast_result"]


def cast_result(xp: ModuleType, x: Any, dtype: Any) -> Any:
    """``x`` cast to ``dtype`` (a result's dtype), a value beyond ``dtype``'s range becoming
    ``inf`` as Keras' cast gives it, with no warning from any library (lazily for Dask).

    NumPy warns "overflow encountered in cast" when a float64 mean above 65504 is cast to
    float16, and Dask warns at compute time: such values are set to ``inf`` first (of their
    sign), which every library casts silently; NaN stays NaN."""
    if x.dtype == dtype:
        return x
    try:
        source, target = xp.finfo(x.dtype), xp.finfo(dtype)
    except (TypeError, ValueError, AttributeError):  # not floating (or no finfo): a plain cast
        return xp.astype(x, dtype)
    top, eps = float(target.max), float(target.eps)
    if float(source.max) > top:  # a narrowing cast: find what rounds beyond the top
        # the largest finite value is (2 - eps) * 2**emax and the spacing there eps * 2**emax:
        # from halfway to the next power of two on, round-to-nearest gives inf
        limit = top + eps * top / (2 * (2 - eps))
        big = xp.full_like(x, math.inf)
        x = xp.where(xp.abs(x) >= limit, xp.where(x > 0, big, -big), x)
    return xp.astype(x, dtype)


def cast_quietly(xp: ModuleType, x: Any, dtype: Any) -> Any:
    """``x`` cast to a result's ``dtype``, a value beyond its range becoming ``inf`` (as
    documented) without a warning: NumPy's "overflow encountered in cast" is silenced with
    ``np.errstate``; Dask, which warns at ``compute()`` out of its reach, goes through
    :func:`cast_result`; every other library casts silently, and its autodiff sees the plain
    cast (``np.errstate`` would also break a ``torch.compile`` trace)."""
    if isinstance(x, (np.ndarray, np.generic)):
        with np.errstate(over="ignore"):
            return xp.astype(x, dtype)
    if library(xp).lazy:
        return cast_result(xp, x, dtype)
    return xp.astype(x, dtype)
