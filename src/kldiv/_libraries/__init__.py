"""The libraries table: everything kldiv knows about each array library, in one place.

One frozen :class:`~kldiv._libraries.record.Library` record per library (the record type is
:mod:`kldiv._libraries.record`'s; its fields are documented there): how to recognise it without importing it
(its module names in ``sys.modules``, array-api-compat's namespace predicate), the modules
holding its fast paths, its adapter module in :mod:`kldiv.backends` (device scope, file
targets, the CLI's device rows, float64 availability, TensorFlow's namespace shim), its
capability flags and its install hint. This is the only module outside a library's own
adapter that spells a library's name; everything else asks the table:

>>> from kldiv._libraries import library, names
>>> import numpy as np
>>> library(np).name, library("torch").immutable, library("jax").where_clip
('numpy', False, True)
>>> "tensorflow" in names()
True

Nothing here imports a framework: an adapter is imported only when its library is in use.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from .. import _compat
from . import record
from .record import Library, load

__all__ = [
    "BACKENDS",
    "GRAPHED",
    "HOSTED",
    "LIBRARIES",
    "Library",
    "WrongDevice",
    "backend_name",
    "compiler_library",
    "compiling",
    "device_library",
    "find",
    "graph_library",
    "lazy_library",
    "library",
    "load",
    "names",
    "ragged_hint",
    "shim_namespace",
    "sparse_hint",
    "target",
    "traced_rule",
]


# --------------------------------------------------------------------------- the table
_B = "kldiv.backends."


def _torch_compiled_namespace() -> ModuleType:
    """torch's own functions as the generic kernels' namespace, while dynamo traces.

    Dynamo runs import statements but cannot trace ``importlib`` (nor a ``sys.modules`` that
    changes under its guards), so the module is imported by a statement and read from it,
    also when ``torch.compile`` comes before any eager call."""
    from . import torch_traced  # imports nothing of kldiv (no import circle)

    ns: ModuleType = torch_traced.array_api
    return ns


LIBRARIES: tuple[Library, ...] = (
    Library("numpy", ("numpy",), "is_numpy_namespace", adapter=_B + "numpy_adapter",
            fast_paths=(_B + "numpy_", _B + "numpy_family"), native_kernel=True, numpy_dtypes=True,
            install="pip install numpy"),
    Library("torch", ("torch",), "is_torch_namespace", adapter=_B + "torch_adapter",
            fast_paths=(_B + "torch_", _B + "torch_family", _B + "torch_fused"), tensor_type="Tensor",
            plain_types=("Tensor", "nn.Parameter"),
            compiled_namespace=_torch_compiled_namespace, float64_rule=True, detach="detach",
            wrapped_check="_C._functorch.is_functorch_wrapped_tensor",
            dense_layout="strided", densify="torch tensor (layout {layout}); call .to_dense() first",
            install="pip install 'kldiv[torch]'",
            install_note="CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu"),
    Library("jax", ("jax",), "is_jax_namespace", adapter=_B + "jax_",
            fast_paths=(_B + "jax_", _B + "jax_family", _B + "jax_fused"), place_after=True, where_clip=True,
            no_fma=True,
            immutable=True, float64_rule=True, sparse_types=("jax.experimental.sparse",),
            tracer_types=("jax.core:Tracer",),
            densify="JAX {type} array; call .todense() first",
            install="pip install 'kldiv[jax]'", install_note="GPU: pip install 'jax[cuda12]'"),
    Library("cupy", ("cupy",), "is_cupy_namespace", adapter=_B + "cupy_",
            fast_paths=(_B + "cupy_", _B + "cupy_family"), tensor_type="ndarray", to_host="get",
            install="pip install 'kldiv[cupy]'", install_note="needs an NVIDIA GPU and CUDA 12"),
    Library("dask", ("dask.array", "dask"), "is_dask_namespace", adapter=_B + "dask_",
            tensor_type="Array", to_host="compute", place_after=True, lazy=True,
            where_clip=True, numpy_dtypes=True, install="pip install 'kldiv[dask]'"),
    Library("array_api_strict", ("array_api_strict",), "is_array_api_strict_namespace",
            adapter=_B + "array_api_strict_", install="pip install array-api-strict"),
    # last: slow to import, and a process that has imported it must not import Triton after
    Library("tensorflow", ("tensorflow",), None,
            array_types=("tensorflow:Tensor", "tensorflow:Variable"), adapter=_B + "tensorflow_",
            kernel_namespace=_B + "tensorflow_family", immutable=True, scoped=True,
            sparse_types=("tensorflow:SparseTensor",), eager_check="executing_eagerly",
            run_time_shape="shape", run_time_assert="debugging.assert_equal",
            densify="TensorFlow {type}; call tf.sparse.to_dense() first",
            ragged_types=("tensorflow:RaggedTensor",), pad=".to_tensor(default_value=0.0)",
            quiet=(("TF_CPP_MIN_LOG_LEVEL", "2"),),
            install="pip install tensorflow"),
)
"""Every array library kldiv knows, in the CLI's order."""

_BY_NAME = {lib.name: lib for lib in LIBRARIES}
BACKENDS: tuple[str, ...] = tuple(_BY_NAME)
"""Backends :func:`kldiv.evaluate_files` can run on (``backend=`` names)."""
_SHIMMED = tuple(lib for lib in LIBRARIES if lib.array_types)
HOSTED: tuple[Library, ...] = tuple(lib for lib in LIBRARIES if lib.to_host)
"""Libraries whose arrays NumPy cannot read directly (:attr:`Library.to_host`)."""
_BY_ID: dict[int, Library] = {}
_LAYOUTS = tuple(lib for lib in LIBRARIES if lib.dense_layout)
_SPARSE = tuple(lib for lib in LIBRARIES if lib.sparse_types)
_RAGGED = tuple(lib for lib in LIBRARIES if lib.ragged_types)
GRAPHED: tuple[Library, ...] = tuple(lib for lib in LIBRARIES if lib.detach)
"""Libraries whose arrays may carry an autograd graph (:attr:`Library.detach`)."""


_TRACING = tuple(lib for lib in LIBRARIES if lib.tracer_types or lib.wrapped_check)


def traced_rule(tp: type) -> bool | Callable[[Any], Any]:
    """For instances of ``tp``: ``True`` if every one is an abstract value of a library's
    tracing transformation, a per-instance check where one may be (a torch tensor wrapped by
    ``torch.func``), else ``False`` (:attr:`Library.tracer_types`,
    :attr:`Library.wrapped_check`)."""
    for lib in _TRACING:
        rule = lib.traced_rule(tp)
        if rule is not None:
            return rule
    return False


def ragged_hint(x: object) -> str | None:
    """How to pad ``x`` if it is a ragged array of a library in the table, else ``None``."""
    for lib in _RAGGED:
        hint = lib.ragged_hint(x)
        if hint is not None:
            return hint
    return None


def sparse_hint(x: object) -> str | None:
    """How to densify ``x`` if it is a sparse array of a library in the table, else ``None``."""
    for lib in _LAYOUTS:  # first: a dense torch tensor (what dynamo traces) ends here
        if lib.is_instance(x):
            return lib.sparse_hint(x)
    for lib in _SPARSE:
        hint = lib.sparse_hint(x)
        if hint is not None:
            return hint
    return None


def compiler_library() -> Library:
    """The library whose compiler traces kldiv's Python (``torch.compile``'s dynamo)."""
    return next(lib for lib in LIBRARIES if lib.compiled_namespace)


_COMPILER_MODULE = compiler_library().modules[0]


def device_library(device: Any) -> Library | None:
    """The record of the library whose device object ``device`` is (its type's package)."""
    package = type(device).__module__.partition(".")[0]
    return next((lib for lib in LIBRARIES if lib.modules[0].partition(".")[0] == package), None)


def graph_library() -> Library:
    """The library that builds graphs kldiv's state cannot live in (TensorFlow's
    ``tf.function``; the one Keras 2, tf-keras, runs on)."""
    return next(lib for lib in LIBRARIES if lib.eager_check)


def lazy_library() -> Library:
    """The library of lazy, chunked arrays (Dask)."""
    return next(lib for lib in LIBRARIES if lib.lazy)


def names() -> tuple[str, ...]:
    """The short names of every library in the table."""
    return BACKENDS


def _name_of(xp: ModuleType) -> str | None:
    name = getattr(xp, "__kldiv_name__", None)  # kldiv's own shims (TensorFlow)
    if name is not None:
        return str(name)
    module = getattr(xp, "__name__", None)
    for lib in LIBRARIES:  # the library itself or its compat wrapper, by module name first:
        # compat's predicates are lru_cache'd, which torch.compile (dynamo) warns about
        if module in lib.modules or module == f"{_compat.COMPAT_PACKAGE}.{lib.name}":
            return lib.name
    for lib in LIBRARIES:
        if lib.namespace_check is not None and getattr(_compat, lib.namespace_check)(xp):
            return lib.name
    return None


def compiling() -> bool:
    """True while the compiler library's compiler (``torch.compile``'s dynamo) traces kldiv.

    Nothing traced may read kldiv's per-process caches (dicts that grow as new namespaces,
    dtypes and options are seen): dynamo guards a graph on what it read there, the dict's
    length included, so any later eager call that adds an entry would recompile the graph
    (and after ``recompile_limit`` recompiles run it eagerly). Folds to a constant in the
    trace."""
    mod = sys.modules.get(_COMPILER_MODULE)
    return mod is not None and bool(mod.compiler.is_compiling())


record.tracing = compiling


def find(xp: ModuleType, *, tracing: bool | None = None) -> Library | None:
    """The table's record for namespace ``xp`` (compat-wrapped, shim or the module itself).

    ``tracing``: :func:`compiling`'s answer where the caller has it already (asked once per
    call, not once per lookup)."""
    if compiling() if tracing is None else tracing:  # the cache is neither read nor written
        return _lookup(xp)  # in a traced graph (see compiling)
    try:
        return _BY_ID[id(xp)]
    except KeyError:
        pass
    lib = _lookup(xp)
    _BY_ID[id(xp)] = lib  # namespaces are modules: they live as long as the process
    return lib


def _lookup(xp: ModuleType) -> Library:
    name = _name_of(xp)
    lib = _BY_NAME.get(name) if name is not None else None
    if lib is None:  # an array-API library kldiv has no entry for: no fast path, no flags
        lib = Library(getattr(xp, "__name__", type(xp).__name__), ())
    return lib


def library(xp_or_name: ModuleType | str, *, tracing: bool | None = None) -> Library:
    """The :class:`Library` named ``xp_or_name``, or of namespace ``xp_or_name``.

    A namespace the table does not list gets a record with no fast path and no flags.
    ``tracing``: see :func:`find`.

    Raises
    ------
    ValueError
        For a name that is not in the table.
    """
    if isinstance(xp_or_name, str):
        return _BY_NAME[backend_name(xp_or_name)]
    lib = find(xp_or_name, tracing=tracing)
    assert lib is not None
    return lib


def shim_namespace(x: object) -> ModuleType | None:
    """kldiv's namespace for ``x`` where it is an array type array-api-compat does not know."""
    for lib in _SHIMMED:
        if lib.is_array(x):
            return lib.shim_namespace()
    return None


# ------------------------------------------------------------------ file targets (streaming)
class WrongDevice(ValueError):
    """A device the backend never runs on (an adapter's ``target`` raises it): bad input."""


def backend_name(backend: Any) -> str:
    """``backend`` (``"torch"``, ``"array-api-strict"``...) as the table's name, checked."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {', '.join(BACKENDS)}; got {backend!r}.")
    name = backend.lower().replace("-", "_")
    if name not in _BY_NAME:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}.")
    return name


def target(backend: str, device: str | None) -> Any:
    """The file :class:`kldiv._targets.Target` for ``backend`` on ``device``, checked by moving
    a tiny array there.

    Raises ``ImportError`` (with the install command) if the backend is missing and
    ``RuntimeError`` if the device is not there (exit status 1 of ``kldiv compute``).
    """
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cuda:1', 'gpu' or 'cpu'; got {device!r}.")
    lib = library(backend)
    try:
        made = lib.target(device)
    except WrongDevice:  # a device the backend never has (a GPU for NumPy): bad input
        raise
    except ImportError as exc:
        raise ImportError(f"backend {backend!r} is not installed ({exc}): {lib.install}") from None
    except Exception as exc:
        raise _no_device(backend, device, exc) from None
    try:
        _wait(made(np.zeros((1,), dtype=np.float32)))
    except Exception as exc:
        raise _no_device(backend, device, exc) from None
    return made


def _no_device(backend: str, device: str | None, exc: Exception) -> RuntimeError:
    what = f"no device {device!r}" if device is not None else "no usable default device"
    return RuntimeError(f"{backend} has {what} here ({type(exc).__name__}: {exc})")


def _wait(x: Any) -> None:
    ready = getattr(x, "block_until_ready", None)
    if ready is not None:
        ready()
