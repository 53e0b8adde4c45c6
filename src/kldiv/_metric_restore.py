"""How a metric class is named to its users, and how a pickled metric comes back.

:func:`public_name` names a class in messages as users know it (``kldiv.metrics.KLDivergence``,
not the private module that defines it, nor a Keras-aware subclass). :func:`restore_metric`
rebuilds a pickled (or deep-copied) metric; pickles name it ``kldiv.metrics._restore_metric``
(where :mod:`kldiv.metrics` re-exports it), as they did before it moved here.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ._accumulate import RunningSum, qualified

__all__ = ["public_name", "restore_metric"]


def public_name(tp: type) -> str:
    """The name a user knows a class by: ``kldiv.metrics.KLEstimator`` (where kldiv exports it),
    ``kldiv.losses.KLDivergence``, ``numpy.ndarray``, ``int``."""
    plain = getattr(tp, "_kldiv_class", tp)  # a Keras-aware class: its kldiv class
    name = getattr(plain, "__name__", "")
    for module in ("kldiv.metrics", "kldiv.losses"):
        if getattr(sys.modules.get(module), name, None) is plain:
            return f"{module}.{name}"
    return qualified(plain)


def restore_metric(cls: Any, config: dict[str, Any], mode: str | None, state: Any) -> Any:
    """Unpickle (or deep-copy) a metric: constructed anew, so it is Keras-aware exactly when a
    Keras is loaded here, then given its state (Keras variables' values become kldiv's own
    NumPy float64 state in a process without Keras)."""
    obj = cls.from_config(config)
    if mode == "keras" and not hasattr(obj, "_kldiv_keras_engine"):
        total, count = (np.asarray(v, dtype=np.float64) for v in state)
        mode, state = "plain", (RunningSum(total, False), RunningSum(count, False))
    obj._kldiv_set_state(mode, state)
    return obj


# Pickles name it as they always have (``kldiv.metrics`` re-exports it under this name).
restore_metric.__module__, restore_metric.__qualname__ = "kldiv.metrics", "_restore_metric"
