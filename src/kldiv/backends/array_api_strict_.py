"""array-api-strict's adapter: its file target and its row in ``kldiv show``.

array-api-strict has no fast path: it exists to check the generic kernel against the array
API standard alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import array_api_strict as xps
import numpy as np

from .._targets import Target

__all__ = ["show_devices", "target"]


def target(device: str | None) -> Target:
    """A target on one of array-api-strict's devices (``CPU_DEVICE``, ``no_float64``...)."""
    sdev = xps.Device(device) if device is not None else None
    info = xps.__array_namespace_info__()
    names = set(info.dtypes(device=sdev))  # no float16; no float64 on "no_float64" devices

    def from_numpy(a: np.ndarray) -> Any:
        return xps.asarray(a, device=sdev)

    def from_native(x: Any) -> Any:
        return x if sdev is None or x.device == sdev else x.to_device(sdev)

    return Target("array_api_strict", from_numpy, from_native,
                  lambda x: type(x).__module__.startswith("array_api_strict"),
                  lambda dt: dt.name in names)


def show_devices() -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
    """``kldiv show``'s row: the default device."""
    yield "CPU_DEVICE", lambda v: xps.asarray(v, dtype=xps.float32), ""
