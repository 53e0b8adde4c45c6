"""NumPy's adapter: its file target and its row in ``kldiv show``.

(NumPy's fast paths are :mod:`kldiv.backends.numpy_` and :mod:`kldiv.backends.numpy_family`.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

from .._libraries import WrongDevice
from .._targets import Target

__all__ = ["cpu_target", "estimator_ops", "show_devices", "target"]


def cpu_target(backend: str, device: str | None) -> Target:
    """A :class:`~kldiv._targets.Target` for a CPU-only backend working on NumPy arrays."""
    if device not in (None, "cpu"):
        raise WrongDevice(f"backend {backend!r} runs on the CPU; got device {device!r} "
                          "(use backend='cupy', 'torch', 'jax' or 'tensorflow' for a GPU).")
    return Target(backend, np.asarray, np.asarray, lambda x: isinstance(x, np.ndarray))


def estimator_ops(xp: ModuleType) -> tuple[Any, ...]:
    """The estimators' ``(where, expm1, isfinite, isnan, stop_gradient, quiet)``: nothing to
    stop (no autodiff); ``-inf - -inf`` in an unused ``where`` branch is expected, no warning."""
    return (xp.where, xp.expm1, xp.isfinite, xp.isnan, None,
            lambda: np.errstate(invalid="ignore"))


def target(device: str | None) -> Target:
    """NumPy's file target: the CPU only."""
    return cpu_target("numpy", device)


def show_devices() -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
    """``kldiv show``'s row: NumPy on the CPU."""
    yield "cpu", lambda v: np.asarray(v, dtype=np.float32), ""
