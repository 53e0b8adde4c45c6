"""torch's own functions under the array-API names the generic kernels call.

What the generic kernels run in while ``torch.compile`` (dynamo) traces them: the
array-api-compat wrappers hold Python checks that break the graph (``clip``'s ``isnan`` on
symbolic bounds). The libraries table's torch record loads it (this module belongs to the table package)
(:attr:`kldiv._libraries.Library.compiled_namespace`); it imports nothing of kldiv, so the
table can import it by a statement, which dynamo traces.
"""

from __future__ import annotations

import types
from typing import Any

import torch

__all__ = ["array_api"]


def _max(x: torch.Tensor, /, *, axis: Any = None, keepdims: bool = False) -> torch.Tensor:
    return torch.amax(x, dim=() if axis is None else axis, keepdim=keepdims)


def _sum(x: torch.Tensor, /, *, axis: Any = None, keepdims: bool = False,
         dtype: Any = None) -> torch.Tensor:
    if axis is None:
        return torch.sum(x, dtype=dtype)
    return torch.sum(x, dim=axis, keepdim=keepdims, dtype=dtype)


def _astype(x: torch.Tensor, dtype: Any, /, *, copy: bool = True) -> torch.Tensor:
    return x.to(dtype)


def _build_array_api() -> types.ModuleType:
    ns = types.ModuleType(
        "kldiv._libraries.torch_traced.array_api",
        "torch's own functions under the array API names the family's kernels call.",
    )
    for name, fn in {"exp": torch.exp, "log": torch.log, "logaddexp": torch.logaddexp,
                     "where": torch.where, "clip": torch.clamp, "max": _max, "sum": _sum,
                     "astype": _astype}.items():
        setattr(ns, name, fn)
    ns.__kldiv_name__ = "torch"  # type: ignore[attr-defined]
    return ns


array_api = _build_array_api()
"""torch's own functions, array-API spelled: what dynamo traces the generic kernel with."""
