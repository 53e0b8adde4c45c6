"""Where :func:`kldiv.evaluate_files` runs: a backend on a device, and the moves there.

Each library's adapter (:mod:`kldiv.backends`) makes its targets (``target(device)``); the
table (:func:`kldiv._libraries.target`) finds the adapter and checks the device. A
:class:`Target` moves one batch, a NumPy array (a memory-mapped window of a file) or an
array of any library, to the backend's device. NumPy data is first converted on the host
(:func:`kldiv._npyio.host_ready`) to the machine's byte order and to a dtype the backend has
on that device, so big-endian files and dtypes a library lacks (float16 on
array-api-strict, float64 on a device without it) arrive as the values of the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._npyio import host_ready, to_host

__all__ = ["Target"]


@dataclass(frozen=True)
class Target:
    """Moves a batch (a NumPy array, or an array of any library) to the backend's device."""

    backend: str
    from_numpy: Callable[[np.ndarray], Any]  # native byte order, a dtype the target has
    from_native: Callable[[Any], Any]  # an array of the target library, to the device
    is_native: Callable[[Any], bool]
    supported: Callable[[np.dtype[Any]], bool] | None = None

    def __call__(self, x: Any) -> Any:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return x  # a scalar weight: broadcast by the loss
        if isinstance(x, np.ndarray):
            return self.from_numpy(host_ready(np.asarray(x), self.supported))
        if self.is_native(x):
            return self.from_native(x)
        return self.from_numpy(host_ready(to_host(x), self.supported))
