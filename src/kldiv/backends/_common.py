"""Helpers shared by the NumPy-like fast paths (NumPy, CuPy)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def broadcast_floats(mod: ModuleType, y_true: Any, y_pred: Any) -> tuple[Any, Any] | None:
    """Both inputs broadcast to one shape (views), or ``None`` to decline.

    Declines unless both share a dtype that is ``mod.float32`` or ``mod.float64``, and for
    0-d or empty results. ``mod`` is ``numpy`` or ``cupy``.
    """
    dtype = y_pred.dtype
    if dtype != y_true.dtype or dtype not in (mod.float32, mod.float64):
        return None
    shape = np.broadcast_shapes(y_true.shape, y_pred.shape)
    if len(shape) == 0 or 0 in shape:
        return None
    return mod.broadcast_to(y_true, shape), mod.broadcast_to(y_pred, shape)
