"""Per-library modules: adapters and native fast paths.

A library's adapter (device scope, file targets, namespace shims) and its fast paths live
here, one module per concern, named in the libraries table (:mod:`kldiv._libraries`). A
fast-path module holds only what the generic array-API kernels cannot do as well (fused or
cache-blocked kernels): one function per op, named by it (``keras_kl(y_true, y_pred)``,
``kl``/``reverse_kl``/``js(y_true, y_pred, *, spaces, temperature, ...)``), taking arrays
already converted to its library, dtype and device; it may return ``NotImplemented`` to
decline a call (the generic kernel then runs). The dispatch (:mod:`kldiv._dispatch`) imports
these modules lazily, the first time an array of their library is seen, so ``import kldiv``
imports no framework. They import only from kldiv's lower layers (inputs and kernels).

The fast paths can be switched off, for tests that compare them with the generic kernel:
the environment variable ``KLDIV_GENERIC=1`` (read at every call), or the context manager
:func:`kldiv.use_generic`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # TEMPORARY (until kldiv/__init__.py imports use_generic from kldiv._dispatch): the names
    # this package held before the dispatch moved; remove once ``grep`` finds no user
    if name in ("use_generic", "generic_forced"):
        from .. import _dispatch

        return getattr(_dispatch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
