"""PyTorch's adapter: float64 availability, its file target and its rows in ``kldiv show``.

(PyTorch's fast paths are :mod:`kldiv.backends.torch_` and :mod:`kldiv.backends.torch_family`.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import partial
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .._namespace import is_low_precision
from .._targets import Target

__all__ = ["call_time_values", "estimator_ops", "free_memory", "has_float64", "host_numpy", "show_devices",
           "target"]


def _detach(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def estimator_ops(xp: ModuleType) -> tuple[Any, ...]:
    """The estimators' ``(where, expm1, isfinite, isnan, stop_gradient, quiet)``: torch's own
    functions (no compat wrapper in a ``torch.compile`` graph)."""
    return (torch.where, torch.expm1, torch.isfinite, torch.isnan, _detach, contextlib.nullcontext)


def host_numpy(x: torch.Tensor) -> np.ndarray:
    """A tensor's values in NumPy: detached, on the CPU, low precision as float32."""
    x = x.detach().cpu()
    if is_low_precision(x.dtype):
        x = x.float()
    return x.numpy()


def call_time_values(x: torch.Tensor, peer: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy in memory torch owns where autograd may save it for ``peer``'s backward
    pass and its memory is not torch's own (see :func:`kldiv._convert.call_time_values`), or
    it is an inference tensor (made under ``torch.inference_mode()``), which autograd cannot
    save at all: its clone, made outside inference mode, it can."""
    if not peer.requires_grad or not torch.is_grad_enabled():
        return x
    try:
        own = x.layout != torch.strided or x.untyped_storage().resizable()
    except (RuntimeError, NotImplementedError):  # no storage to ask (functorch wrappers)
        return x
    return x if own and not x.is_inference() else x.clone()


def free_memory(device: Any) -> int | None:
    """Free bytes on a CUDA device (``None`` for another device, or where CUDA cannot tell)."""
    if getattr(device, "type", None) != "cuda":
        return None
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except Exception:
        return None


def has_float64(xp: ModuleType, device: Any) -> bool:
    """Every torch device but Apple's MPS holds float64."""
    return getattr(device, "type", str(device)) != "mps"


def target(device: str | None) -> Target:
    """A target on ``device`` (``"cpu"``, ``"cuda:1"``, ``"mps"``...; default the CPU)."""
    tdev = torch.device(device or "cpu")
    ok: dict[np.dtype[Any], bool] = {}

    def supported(dt: np.dtype[Any]) -> bool:
        if dt not in ok:
            try:
                torch.from_numpy(np.empty(0, dtype=dt))
                ok[dt] = not (tdev.type == "mps" and dt == np.float64)  # MPS has no float64
            except TypeError:  # a torch without this dtype (unsigned 16-64 bit before 2.3)
                ok[dt] = False
        return ok[dt]

    def from_numpy(a: np.ndarray) -> Any:
        if not a.flags.writeable or not a.flags.c_contiguous:
            a = np.array(a)  # torch wants a writable buffer; a memory-mapped window is not
        return torch.from_numpy(a).to(tdev)

    return Target("torch", from_numpy, lambda x: x.detach().to(tdev),
                  lambda x: isinstance(x, torch.Tensor), supported)


def show_devices() -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
    """``kldiv show``'s rows: the CPU and each CUDA device."""
    yield "cpu", lambda v: torch.tensor(v, dtype=torch.float32), ""
    if not torch.cuda.is_available():
        yield "cuda", None, "no CUDA device visible to torch"
        return
    for i in range(torch.cuda.device_count()):
        dev = f"cuda:{i}"
        yield dev, partial(torch.tensor, dtype=torch.float32, device=dev), ""
