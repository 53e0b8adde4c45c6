"""The one importer of ``array_api_compat``: every other kldiv module asks here.

Like array-api-extra's ``_lib/_compat.py``: one place to swap or patch the compatibility
layer. Nothing here imports a framework (array-api-compat looks in ``sys.modules``).
"""

from __future__ import annotations

from types import ModuleType

import array_api_compat
from array_api_compat import (
    array_namespace,
    device,
    is_array_api_obj,
    is_array_api_strict_namespace,
    is_cupy_array,
    is_cupy_namespace,
    is_dask_array,
    is_dask_namespace,
    is_jax_array,
    is_jax_namespace,
    is_numpy_array,
    is_numpy_namespace,
    is_torch_array,
    is_torch_namespace,
    size,
    to_device,
)

__all__ = [
    "COMPAT_PACKAGE",
    "array_namespace",
    "compat_submodule",
    "compat_torch",
    "device",
    "is_array_api_obj",
    "is_array_api_strict_namespace",
    "is_cupy_array",
    "is_cupy_namespace",
    "is_dask_array",
    "is_dask_namespace",
    "is_jax_array",
    "is_jax_namespace",
    "is_numpy_array",
    "is_numpy_namespace",
    "is_torch_array",
    "is_torch_namespace",
    "size",
    "to_device",
]

COMPAT_PACKAGE = array_api_compat.__name__
"""The compat package's import name (its wrapped namespaces are ``<COMPAT_PACKAGE>.<lib>``)."""


def compat_submodule(name: str) -> ModuleType:
    """array-api-compat's wrapped namespace ``name`` (imports it, and so its library)."""
    import importlib

    return importlib.import_module(f"{COMPAT_PACKAGE}.{name}")


def compat_torch() -> ModuleType:
    """array-api-compat's torch namespace (what its ``array_namespace`` gives a tensor).

    An ``import`` statement, not :func:`compat_submodule`: ``torch.compile`` (dynamo) traces
    through this while it traces kldiv, and it refuses ``importlib.import_module``."""
    import array_api_compat.torch as compat_torch_namespace

    return compat_torch_namespace
