"""Per-library modules: adapters and native fast paths.

A library's adapter (device scope, file targets, namespace shims) and its fast paths live
here, one module per concern, named in the libraries table (``kldiv._libraries``). A
fast-path module holds only what the generic array-API kernels cannot do as well (fused or
cache-blocked kernels): one function per op, named by it (``keras_kl(y_true, y_pred)``,
``kl``/``reverse_kl``/``js(y_true, y_pred, *, spaces, temperature, ...)``), taking arrays
already converted to its library, dtype and device; it may return ``NotImplemented`` to
decline a call (the generic kernel then runs). The dispatch (``kldiv._dispatch``) imports
these modules lazily, the first time an array of their library is seen, so ``import kldiv``
imports no framework. They import only from kldiv's lower layers (inputs and kernels).

The fast paths can be switched off, for tests that compare them with the generic kernel:

- the environment variable ``KLDIV_GENERIC=1`` (read at every call), or
- the context manager :func:`kldiv.use_generic`.

A third-party module can be registered as a library's fast path (:func:`register`): its
functions, named by op, are looked up before kldiv's own. The registry and the switch live
under both this package and the dispatch, in ``kldiv._switch``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _switch
from .._switch import generic_forced, register, registered, use_generic

__all__ = ["fast_path", "generic_forced", "register", "registered", "use_generic"]

Kernel = Callable[[Any, Any], Any]
"""A Keras KL fast path: ``kernel(y_true, y_pred)``, or ``NotImplemented`` to decline."""


def fast_path(name: str) -> Kernel | None:
    """The fast kernel for namespace ``name``, or ``None`` (none registered, or switched off).

    The Keras KL's (op ``"keras_kl"``); the divergence family's ops are looked up by the
    dispatch (``kldiv._switch.fast_path``).

    Examples
    --------
    >>> import kldiv
    >>> kldiv.backends.fast_path("numpy") is not None
    True
    >>> with kldiv.use_generic():
    ...     kldiv.backends.fast_path("numpy") is None
    True
    """
    return _switch.fast_path(name, _switch.KERAS_KL_OP)
