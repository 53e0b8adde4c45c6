"""One array library's record in the libraries table (:mod:`kldiv._libraries`): the fields
kldiv knows about a library and the lookups and capabilities read from them.

Spells no library's name: the records themselves are the table's. Nothing here imports a
framework; an adapter module is imported only when its library is in use.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = ["Library", "load"]


def load(path: str) -> Any:
    """The object at ``"package.module"`` or ``"package.module:attribute"`` (imports it)."""
    module, _, attr = path.partition(":")
    obj: Any = sys.modules.get(module)  # first: what dynamo (torch.compile) can trace
    if obj is None:
        obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def _never() -> bool:
    return False


tracing: Callable[[], bool] = _never
"""True while the compiler library's compiler traces kldiv (the table sets it:
:func:`kldiv._libraries.compiling`). Then only that library's arrays (and NumPy's, which it
traces as its own) reach kldiv, and another library is taken as not loaded without looking in
``sys.modules``: a name missing there guards the traced graph on ``len(sys.modules)``, so that
any later import would recompile it."""


@dataclass(frozen=True)
class Library:
    """What kldiv knows about one array library (see the module docstring)."""

    name: str
    """Short name: ``backend=`` values, fast-path keys, messages."""
    modules: tuple[str, ...]
    """Module names in ``sys.modules`` that are this library; the first is its import name."""
    namespace_check: str | None = None
    """Name of the :mod:`kldiv._compat` predicate recognising its (wrapped) namespace."""
    array_types: tuple[str, ...] = ()
    """``"module:Type"`` of array types array-api-compat does not know (kldiv shims them)."""
    tensor_type: str = ""
    """The array type's name in the library's module (fast ``isinstance`` checks)."""
    plain_types: tuple[str, ...] = ()
    """Dotted names (in its module) of the exact array types whose ``.device`` needs no check."""
    adapter: str | None = None
    """The library's own module in :mod:`kldiv.backends` (imported lazily)."""
    fast_paths: tuple[str, ...] = ()
    """Modules whose functions, named by op, are fast paths (``keras_kl``, ``kl``, ...) and the
    fused linear divergence's library route (``fused_linear``, with ``stop_gradient``)."""
    kernel_namespace: str | None = None
    """Module whose ``namespace`` the family's generic kernels run in (a shim), if any."""
    compiled_namespace: Callable[[], ModuleType] | None = None
    """Loader of the namespace the generic kernels use while ``torch.compile`` traces: a
    function of this module whose import statement dynamo traces (it cannot trace
    ``importlib``)."""
    to_host: str = ""
    """The array method giving host data NumPy takes (CuPy's ``get``, Dask's ``compute``)."""
    place_after: bool = False
    """``asarray`` then cast, then move to the device (its ``asarray`` takes neither reliably)."""
    lazy: bool = False
    """Arrays are lazy task graphs of host chunks (computed on demand, no device to name)."""
    where_clip: bool = False
    """Clip with ``where`` (``clip``'s gradient or chunking differs from Keras')."""
    no_fma: bool = False
    """Its compiler contracts ``t * log(t / p)`` into the row sum (FMA): kernels stop it."""
    immutable: bool = False
    """Nobody changes its arrays in place: memory imported from it needs no copy."""
    native_kernel: bool = False
    """The generic kernel runs in the library's own module, not the compat wrapper."""
    scoped: bool = False
    """Its eager ops need a device scope (the adapter's ``device_scope``)."""
    float64_rule: bool = False
    """Its adapter's ``has_float64`` answers (else the array API inspection API)."""
    detach: str = ""
    """The array method that drops an autograd graph (torch's ``detach``): accumulated state
    and arrays crossing to another library keep none; its adapter's ``host_numpy`` and
    ``call_time_values`` take its arrays."""
    numpy_dtypes: bool = False
    """Its dtypes are NumPy's (``np.dtype(name)`` where its namespace lacks a name: float16)."""
    dense_layout: str = ""
    """Where its arrays have a ``layout``: the dense layout's name in its module."""
    sparse_types: tuple[str, ...] = ()
    """``"module prefix"`` or ``"module prefix:Type"`` of its sparse array types."""
    densify: str = ""
    """How to densify one of its sparse arrays (``{type}`` and ``{layout}`` filled in)."""
    ragged_types: tuple[str, ...] = ()
    """``"module prefix:Type"`` of its ragged (nested) array types, which are not arrays."""
    pad: str = ""
    """How to pad one of its ragged arrays into a dense one (``{type}`` filled in)."""
    eager_check: str = ""
    """Its module's function answering whether ops run eagerly (false while a graph is built,
    ``tf.function``: kldiv's state cannot live there)."""
    run_time_shape: str = ""
    """Its module's function giving an array's shape as an array of the library, known when a
    graph runs (``tf.shape``), where shapes may be unknown (``None``) while it is built."""
    run_time_assert: str = ""
    """Its module's function (dotted), ``assert_equal(x, y, message=...)``, that adds to the
    graph being built a check raising ``message`` when it runs with ``x != y``
    (``tf.debugging.assert_equal``)."""
    tracer_types: tuple[str, ...] = ()
    """``"module:Type"`` whose every instance is an abstract value of a tracing transformation
    (JAX's ``Tracer``: ``jax.jit``, ``grad``, ``vmap``), which no running state may hold."""
    wrapped_check: str = ""
    """Its module's function (dotted) answering, for one of its :attr:`tensor_type`, whether a
    transform wraps it (``torch.func``: the wrapper's type is the plain tensor type)."""
    quiet: tuple[tuple[str, str], ...] = ()
    """Environment defaults set before importing it (start-up chatter off)."""
    install: str = ""
    """The pip command installing it."""
    install_note: str = ""
    """More on installing it (the CLI's ``show``)."""

    # -------------------------------------------------------------------- lookups
    def _module(self, name: str) -> Any:
        """``sys.modules.get(name)`` for one of this library's modules; ``None`` for another
        library than the compiler's while it traces (see :data:`tracing`)."""
        if self.compiled_namespace is None and tracing():
            return None
        return sys.modules.get(name)

    def loaded(self) -> ModuleType | None:
        """The library's module if it is imported (never imports it)."""
        mod: ModuleType | None = self._module(self.modules[0])
        return mod

    def is_instance(self, x: object) -> bool:
        """``isinstance(x, <module>.<tensor_type>)`` where the library is loaded."""
        mod = self._module(self.modules[0])
        return mod is not None and bool(self.tensor_type) and isinstance(x, getattr(mod, self.tensor_type))

    def exact_type(self, x: object) -> bool:
        """``type(x)`` is one of :attr:`plain_types` (the library must be loaded)."""
        mod = sys.modules[self.modules[0]]
        tp = type(x)
        for dotted in self.plain_types:
            obj: Any = mod
            for part in dotted.split("."):
                obj = getattr(obj, part)
            if tp is obj:
                return True
        return False

    def sparse_hint(self, x: object) -> str | None:
        """How to densify ``x`` if it is one of this library's sparse arrays, else ``None``.

        Asks a loaded library's array of its ``layout`` first (a dense tensor ends there: what
        dynamo traces), else the type's module and name (never imports the library)."""
        if self.dense_layout and self.is_instance(x):
            layout = x.layout  # type: ignore[attr-defined]
            if layout == getattr(self.loaded(), self.dense_layout):
                return None
            return self.densify.format(type=type(x).__name__, layout=layout)
        tp = type(x)
        for spec in self.sparse_types:
            prefix, _, name = spec.partition(":")
            if tp.__module__.startswith(prefix) and (not name or tp.__name__ == name):
                return self.densify.format(type=tp.__name__, layout="")
        return None

    def ragged_hint(self, x: object) -> str | None:
        """How to pad ``x`` if it is one of this library's ragged arrays, else ``None`` (by
        the type's module and name: never imports the library)."""
        tp = type(x)
        for spec in self.ragged_types:
            prefix, _, name = spec.partition(":")
            if tp.__module__.startswith(prefix) and tp.__name__ == name:
                return self.pad.format(type=tp.__name__)
        return None

    def traced_rule(self, tp: type) -> bool | Callable[[Any], Any] | None:
        """For instances of ``tp``: ``True`` if every one is a tracer of this library, the
        per-instance check if one may be a wrapped tensor, ``None`` if neither (looked up in
        ``sys.modules``: never imports the library)."""
        for spec in self.tracer_types:
            module, _, name = spec.partition(":")
            tracer = getattr(sys.modules.get(module), name, None)
            if isinstance(tracer, type) and issubclass(tp, tracer):
                return True
        if self.wrapped_check:
            mod = sys.modules.get(self.modules[0])
            tensor = getattr(mod, self.tensor_type, None)
            if isinstance(tensor, type) and issubclass(tp, tensor):
                check: Any = mod
                for part in self.wrapped_check.split("."):
                    check = getattr(check, part, None)
                if callable(check):
                    return check
        return None

    def load_adapter(self) -> ModuleType:
        """The adapter module (imports it, and so the library: ``ImportError`` if missing)."""
        if self.adapter is None:
            raise LookupError(f"kldiv has no adapter module for {self.name}")
        module: ModuleType = load(self.adapter)
        return module

    def is_array(self, x: object) -> bool:
        """``x`` is one of :attr:`array_types` (looked up only where the library is loaded)."""
        if not self.array_types or (self.compiled_namespace is None and tracing()):
            return False  # (asked once, not once per type: it costs ~0.1 us a call)
        for path in self.array_types:
            module, _, attr = path.partition(":")
            mod = sys.modules.get(module)
            if mod is not None and isinstance(x, getattr(mod, attr)):
                return True
        return False

    def shim_namespace(self) -> ModuleType:
        """kldiv's namespace for :attr:`array_types` (the adapter's ``namespace``)."""
        ns: ModuleType = self.load_adapter().namespace
        return ns

    def run_time_size(self, x: Any, axis: int) -> Any:
        """The size of ``x``'s ``axis`` as the library's 0-d array, known when its graph runs
        (:attr:`run_time_shape`); ``None`` where the library has no such function."""
        mod = self.loaded() if self.run_time_shape else None
        if mod is None:
            return None
        return _dotted(mod, self.run_time_shape)(x)[axis]

    def assert_at_run_time(self, bad: Any, message: str) -> bool:
        """Add to the graph being built a check that raises ``message`` when it runs with the
        boolean 0-d array ``bad`` true (:attr:`run_time_assert`); ``False`` where the library
        cannot (nothing added)."""
        mod = self.loaded() if self.run_time_assert else None
        if mod is None:
            return False
        _dotted(mod, self.run_time_assert)(bad, False, message=message)
        return True

    def hush(self) -> None:
        """Set :attr:`quiet`'s environment defaults (before the library is imported)."""
        for key, value in self.quiet:
            os.environ.setdefault(key, value)

    @property
    def install_hint(self) -> str:
        """The pip command, with its note (the CLI's ``show``)."""
        return f"{self.install}  ({self.install_note})" if self.install_note else self.install

    # ------------------------------------------------------------------ capabilities
    def device_scope(self, device: Any) -> contextlib.AbstractContextManager[Any] | None:
        """The context that keeps the library's eager ops on ``device`` (``None``: none needed)."""
        if not self.scoped:
            return None
        scope: contextlib.AbstractContextManager[Any] | None = self.load_adapter().device_scope(device)
        return scope

    def estimator_ops(self, xp: ModuleType) -> tuple[Any, ...] | None:
        """The adapter's ``estimator_ops(xp)``: ``(where, expm1, isfinite, isnan, stop_gradient,
        quiet)`` for the sampled-token estimators, or ``None`` where it has none."""
        if self.adapter is None:
            return None
        ops = getattr(self.load_adapter(), "estimator_ops", None)
        return None if ops is None else tuple(ops(xp))

    def free_memory(self, device: Any) -> int | None:
        """The adapter's ``free_memory(device)``: free bytes on one of the library's devices
        (``None`` where its adapter cannot tell)."""
        if self.adapter is None:
            return None
        free = getattr(self.load_adapter(), "free_memory", None)
        return None if free is None else free(device)

    def has_float64(self, xp: ModuleType, device: Any) -> bool:
        """True when ``xp`` (this library's namespace) holds float64 arrays on ``device``."""
        if self.float64_rule:
            return bool(self.load_adapter().has_float64(xp, device))
        return _info_has_float64(xp, device)

    def target(self, device: str | None) -> Any:
        """The adapter's file :class:`kldiv._targets.Target` for ``device`` (unchecked).

        Imports the library first (``ImportError`` where it is missing, even if the adapter
        module was loaded before)."""
        importlib.import_module(self.modules[0])
        return self.load_adapter().target(device)

    def file_input(self, src: Any, sliced: bool, batch_rows: int) -> Any:
        """The adapter's lazy array of an ``.npy`` :class:`kldiv._npyio.Source` (read by
        blocks of ``batch_rows`` rows where ``sliced``, else whole): Dask's."""
        return self.load_adapter().file_input(src, sliced, batch_rows)

    def show_devices(self) -> Iterator[tuple[str, Callable[[Any], Any] | None, str]]:
        """The CLI's rows: ``(device, converter from nested lists or None, reason)``."""
        importlib.import_module(self.modules[0])
        rows: Iterator[tuple[str, Callable[[Any], Any] | None, str]] = self.load_adapter().show_devices()
        return rows


def _dotted(mod: Any, path: str) -> Any:
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def _info_has_float64(xp: ModuleType, device: Any) -> bool:
    if getattr(xp, "float64", None) is None:
        return False
    try:
        info = xp.__array_namespace_info__()
        return "float64" in info.dtypes(device=device, kind="real floating")
    except Exception:
        return True
