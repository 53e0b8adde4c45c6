"""Fast paths by (library, op), and the switch that turns them off.

The state under both :mod:`kldiv.backends` (whose public :func:`~kldiv.backends.fast_path`,
:func:`~kldiv.backends.register` and :func:`~kldiv.backends.use_generic` are these) and the
dispatch (:mod:`kldiv._dispatch`, which asks :func:`fast_path` for every call):

- the modules holding each library's fast paths: the libraries table's
  (``Library.fast_paths``), after a module given to :func:`register`;
- the functions found there, one per ``(library, op)``, remembered once looked up;
- the switch: :func:`use_generic` (a context variable) or ``KLDIV_GENERIC=1`` (read at every
  call) make :func:`fast_path` answer ``None``.

Each module is imported the first time it is looked in, so ``import kldiv`` imports no
framework.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._libraries import library, load, names

__all__ = ["fast_path", "fast_path_modules", "generic_forced", "library_op", "register",
           "registered", "use_generic"]

KERAS_KL_OP = "keras_kl"
"""The Keras KL's op (:data:`kldiv._divergence.KERAS_KL`); before it, ``kl_divergence``."""
_OLD_KERAS_KL_OP = "kl_divergence"

# ------------------------------------------------------------------------ switching off
_FORCE_GENERIC: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "kldiv_force_generic", default=False
)


def generic_forced() -> bool:
    """True when fast paths are switched off (``KLDIV_GENERIC`` or :func:`use_generic`)."""
    if _FORCE_GENERIC.get():
        return True
    return os.environ.get("KLDIV_GENERIC", "").strip().lower() in {"1", "true", "yes", "on"}


def use_generic(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Context manager: inside it, every call uses the generic array-API kernel
    (``enabled=False``: the fast paths, as outside it).

    Raises
    ------
    TypeError
        If ``enabled`` is not a bool (``True``/``False``, or NumPy's): a string such as
        ``"no"`` is truthy and would switch the fast paths off.

    Examples
    --------
    >>> import numpy as np, kldiv
    >>> with kldiv.use_generic():
    ...     float(kldiv.kld(np.array([.4, .9, .2]), np.array([.5, .8, .12])))
    0.11891...
    """
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"use_generic(enabled={enabled!r}): enabled must be a bool (True or "
                        f"False), got {type(enabled).__name__}.")
    return _use_generic(bool(enabled))


@contextlib.contextmanager
def _use_generic(enabled: bool) -> Iterator[None]:
    token = _FORCE_GENERIC.set(enabled)
    try:
        yield
    finally:
        _FORCE_GENERIC.reset(token)


# --------------------------------------------------------------------------- registry
_REGISTERED: dict[str, str] = {}
"""Library short name -> a module given to :func:`register` (looked in first)."""

_LOADED: dict[tuple[str, str], Callable[..., Any] | None] = {}
"""``(library, op)`` -> the function found (``None``: none), once looked up."""


def register(name: str, module: str) -> None:
    """Register ``module`` (import path) as the fast path for namespace ``name``.

    Its functions, named by op, are looked up before those of the modules kldiv lists for
    the library: ``keras_kl(y_true, y_pred)`` (or ``kl_divergence``, its name before) for the
    Keras KL, ``kl``/``reverse_kl``/``js`` for the family. The module is imported the first
    time it is looked in.
    """
    if not isinstance(name, str) or not isinstance(module, str):
        raise TypeError(f"register takes a namespace short name and a module's import path "
                        f"(both str); got {name!r} and {module!r}.")
    _REGISTERED[name] = module
    for key in [k for k in _LOADED if k[0] == name]:
        del _LOADED[key]


def registered() -> dict[str, str]:
    """The registry: namespace short name -> module holding its fast path (its Keras KL)."""
    out = {}
    for name in (*names(), *_REGISTERED):
        modules = fast_path_modules(name)
        if modules:
            out[name] = modules[0]
    return out


def fast_path_modules(name: str) -> tuple[str, ...]:
    """The modules holding library ``name``'s fast paths: one given to :func:`register`, then
    the libraries table's; none for a library the table does not list."""
    try:
        listed = library(name).fast_paths
    except ValueError:
        listed = ()
    extra = _REGISTERED.get(name)
    if extra is None:
        return listed
    return (extra, *(m for m in listed if m != extra))


def fast_path(name: str, op: str) -> Callable[..., Any] | None:
    """The fast path for op ``op`` on library ``name``, or ``None`` (none, or switched off).

    :func:`library_op`, unless fast paths are switched off (:func:`use_generic`).
    """
    if generic_forced():
        return None
    return library_op(name, op)


def library_op(name: str, op: str) -> Callable[..., Any] | None:
    """The first function called ``op`` in library ``name``'s fast-path modules, or ``None``.

    Each module is imported the first time it is looked in (so ``import kldiv`` imports no
    framework). Not switched off by :func:`use_generic`: the fused linear divergence's
    library routes (op ``"fused_linear"``, ``"stop_gradient"``) are found here too.
    """
    key = (name, op)
    try:
        return _LOADED[key]
    except KeyError:
        pass
    fn = None
    extra = _REGISTERED.get(name)
    for module in fast_path_modules(name):
        found = load(module)
        fn = getattr(found, op, None)
        if fn is None and op == KERAS_KL_OP and module == extra:  # written for the old API
            fn = getattr(found, _OLD_KERAS_KL_OP, None)
        if fn is not None:
            break
    _LOADED[key] = fn
    return fn
