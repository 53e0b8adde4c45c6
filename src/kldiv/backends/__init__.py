"""Native fast paths, one module per framework, found through a registry.

A backend module holds only what the generic array-API kernel cannot do as well: fused or
cache-blocked kernels. It exposes ``kl_divergence(y_true, y_pred)``, taking arrays already
converted to its library, dtype and device, and may return ``NotImplemented`` to decline a
call (the generic kernel then runs). Modules are imported lazily, the first time an array of
their library is seen, so ``import kldiv`` imports no framework.

The fast paths can be switched off, for tests that compare them with the generic kernel:

- the environment variable ``KLDIV_GENERIC=1`` (read at every call), or
- the context manager :func:`kldiv.use_generic`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["fast_path", "generic_forced", "register", "registered", "use_generic"]

Kernel = Callable[[Any, Any], Any]

# namespace short name -> module path (imported on first use)
_REGISTRY: dict[str, str] = {}
_LOADED: dict[str, Kernel | None] = {}

_FORCE_GENERIC: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "kldiv_force_generic", default=False
)


def register(name: str, module: str) -> None:
    """Register ``module`` (import path) as the fast path for namespace ``name``."""
    _REGISTRY[name] = module
    _LOADED.pop(name, None)


def registered() -> dict[str, str]:
    """The registry: namespace short name -> module holding its fast path."""
    return dict(_REGISTRY)


def generic_forced() -> bool:
    """True when fast paths are switched off (``KLDIV_GENERIC`` or :func:`use_generic`)."""
    if _FORCE_GENERIC.get():
        return True
    return os.environ.get("KLDIV_GENERIC", "").strip().lower() in {"1", "true", "yes", "on"}


@contextlib.contextmanager
def use_generic(enabled: bool = True) -> Iterator[None]:
    """Context manager: inside it, every call uses the generic array-API kernel.

    Examples
    --------
    >>> import numpy as np, kldiv
    >>> with kldiv.use_generic():
    ...     float(kldiv.kld(np.array([.4, .9, .2]), np.array([.5, .8, .12])))
    0.11891...
    """
    token = _FORCE_GENERIC.set(enabled)
    try:
        yield
    finally:
        _FORCE_GENERIC.reset(token)


def fast_path(name: str) -> Kernel | None:
    """The fast kernel for namespace ``name``, or ``None`` (none registered, or switched off)."""
    if generic_forced():
        return None
    try:
        return _LOADED[name]
    except KeyError:
        pass
    module = _REGISTRY.get(name)
    kernel: Kernel | None = None
    if module is not None:
        kernel = importlib.import_module(module).kl_divergence
    _LOADED[name] = kernel
    return kernel


# The native fast paths (each module is imported the first time its library is seen).
register("numpy", "kldiv.backends.numpy_")
register("torch", "kldiv.backends.torch_")
register("jax", "kldiv.backends.jax_")
register("cupy", "kldiv.backends.cupy_")
