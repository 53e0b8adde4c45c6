"""Array-library detection, without importing any framework: namespaces, devices, dtypes.

Everything here looks in ``sys.modules`` (directly, through :mod:`kldiv._compat` or the
libraries table :mod:`kldiv._libraries`), so asking "is this a torch tensor?" never imports
torch. Conversion between libraries is :mod:`kldiv._convert`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from . import _compat
from ._libraries import compiler_library, lazy_library, library, shim_namespace

__all__ = [
    "ArrayLike",
    "array_namespace",
    "device_scope",
    "dtype_kind",
    "dtype_name",
    "get_device",
    "is_array",
    "is_dask",
    "is_low_precision",
    "namespace_name",
    "native_namespace",
    "numpy_result",
    "torch_compiling",
]

ArrayLike = Any


def device_scope(xp: ModuleType, device: Any) -> contextlib.AbstractContextManager[Any] | None:
    """The context that keeps ``xp``'s ops on ``device``, or ``None`` where none is needed
    (the table's :meth:`~kldiv._libraries.Library.device_scope`)."""
    return library(xp).device_scope(device)


# type(x) -> namespace: the namespace of an array depends only on its type, and asking
# array-api-compat costs microseconds that matter for small per-call inputs.
_NAMESPACE_CACHE: dict[type, ModuleType] = {}


_COMPILER = compiler_library()
_COMPILER_MODULE = _COMPILER.modules[0]
_COMPILER_TYPE = _COMPILER.tensor_type


def _is_torch(x: object) -> bool:
    """``isinstance(x, torch.Tensor)`` where torch is loaded (never imports it).

    Asked first by the type checks here: array-api-compat's ``is_torch_array``,
    ``is_dask_array``, ``array_namespace``... call ``functools.lru_cache``-wrapped helpers,
    and ``torch.compile`` (dynamo) warns for each one it traces through. Under dynamo every
    input is a tensor (NumPy arrays and lists are traced as tensors), so these checks end
    here.
    """
    mod = sys.modules.get(_COMPILER_MODULE)
    return mod is not None and isinstance(x, getattr(mod, _COMPILER_TYPE))


def _torch_namespace() -> ModuleType:
    """array-api-compat's torch namespace (what its ``array_namespace`` gives a tensor)."""
    return _compat.compat_torch()


def array_namespace(x: Any, *, tracing: bool | None = None) -> ModuleType:
    """The array-API namespace of ``x`` (compat-wrapped; or a kldiv shim, e.g. TensorFlow).

    ``tracing``: :func:`torch_compiling`'s answer where the caller has it already (each
    check costs about 0.1 us: it is asked once per call where it can be)."""
    if tracing is None:
        tracing = torch_compiling()
    tp = type(x)
    xp = _NAMESPACE_CACHE.get(tp) if not tracing else None  # (see _remember)
    if xp is None:
        if _is_torch(x):
            xp = _torch_namespace()
        else:
            xp = shim_namespace(x)
            if xp is None:
                xp = _compat.array_namespace(x)
        if not tracing:
            _NAMESPACE_CACHE[tp] = xp
    return xp


def is_array(x: object) -> bool:
    """True for any array object a supported library (or the array API) produces."""
    if isinstance(x, (int, float, bool, complex)):  # first: np.float64 is a float, and the
        return False  # same answer whatever the cache below holds (np.float64 as a total)
    if _is_torch(x):  # first: what dynamo traces ends here, without reading the cache below
        return True
    if type(x) in _NAMESPACE_CACHE:  # a type already seen as an array
        return True
    return _compat.is_array_api_obj(x) or shim_namespace(x) is not None


def torch_compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces kldiv: then only the generic kernel runs,
    and kldiv's per-process caches are neither read nor written (dynamo would guard the graph
    on them: see :func:`kldiv._libraries.compiling`).

    Fast paths are opaque to dynamo, and their dispatch (context variables, environment,
    lazy imports) would break the graph; ``torch.compiler.is_compiling()`` folds to a
    constant under dynamo, so this check costs the traced graph nothing.
    """
    mod = sys.modules.get(_COMPILER_MODULE)
    return mod is not None and mod.compiler.is_compiling()


_LAZY = lazy_library()


def is_dask(x: object) -> bool:
    """``x`` is an array of the lazy (chunked) library, Dask, where it is loaded: what
    array-api-compat's ``is_dask_array`` asks, without its ``lru_cache``'d helper (see
    :func:`_is_torch`). A tensor first: under ``torch.compile`` every input is one, and
    looking up a library that is not loaded guards the graph on ``len(sys.modules)`` (any
    later import would recompile it)."""
    return type(x) is not np.ndarray and not _is_torch(x) and _LAZY.is_instance(x)


def namespace_name(xp: ModuleType) -> str:
    """A short name for a (possibly compat-wrapped) namespace: 'numpy', 'torch', ...

    The table's name (:func:`kldiv._libraries.library`); a namespace the table does not list
    gets its module name."""
    return library(xp).name


def native_namespace(xp: ModuleType) -> ModuleType:
    """The namespace the generic kernel runs in: NumPy itself for NumPy arrays, else ``xp``.

    array-api-compat's NumPy ``clip`` writes into a new C-ordered array, so a
    Fortran-ordered or transposed input would be summed in another order than the formula
    as written (and than the NumPy fast path). NumPy's own functions keep the inputs' memory
    layout (and a subclass's semantics, e.g. masked arrays); NumPy 2 is array-API compatible
    in everything the kernel calls. (The table's ``native_kernel`` flag.)
    """
    lib = library(xp)
    if lib.native_kernel:
        module = lib.loaded()
        if module is not None:
            return module
    return xp


def get_device(x: Any) -> Any:
    """The device of ``x``, or ``None`` where it has none we can ask for (JAX tracers)."""
    tp = type(x)
    if tp is np.ndarray:
        return "cpu"
    if _is_torch(x) and _COMPILER.exact_type(x):
        return x.device  # what array-api-compat answers, without its chain of type checks
    try:
        device = _compat.device(x)
    except Exception:
        return None
    if isinstance(device, str) and not device:  # a TensorFlow tensor in a graph: unplaced
        return None
    return device


# Keyed by (type, dtype): dtypes of different libraries may hash alike, and some refuse (warn
# on) being compared with each other.
_KIND_CACHE: dict[type, dict[Any, str]] = {}
"""One dict per dtype *type*: a lookup only ever hashes and compares dtypes of one library.
(One shared dict keyed by dtype would make ``torch.compile`` trace the hashing of other
libraries' dtype objects, e.g. TensorFlow's C-level ``DType.__hash__``, a graph break.)"""


def _cached(cache: dict[type, dict[Any, Any]], dtype: Any, compute: Callable[[Any], Any],
            tracing: bool | None) -> Any:
    """``compute(dtype)``, remembered in ``cache`` (one dict per dtype type), except while
    ``torch.compile`` traces (``tracing``: :func:`torch_compiling`'s answer, asked here when
    ``None``). Then the cache is neither read (dynamo would guard the graph on its contents,
    and recompile it whenever an eager call adds a dtype: :func:`kldiv._libraries.compiling`;
    the answer folds to a constant in the trace) nor written (a side effect dynamo replays by
    rebuilding the whole dict, hashing every key in it, other libraries' dtypes included:
    TensorFlow's C ``DType.__hash__`` is a graph break)."""
    if torch_compiling() if tracing is None else tracing:
        return compute(dtype)
    per_type = cache.get(type(dtype))
    try:
        return per_type[dtype]  # type: ignore[index]
    except (KeyError, TypeError):  # not seen yet (or no dict for its type), or unhashable
        pass
    value = compute(dtype)
    with contextlib.suppress(TypeError):  # unhashable dtype object: no caching
        cache.setdefault(type(dtype), {})[dtype] = value
    return value


def dtype_kind(dtype: Any, *, tracing: bool | None = None) -> str:
    """Classify a dtype of any library: 'float', 'int', 'bool', 'complex' or 'other'.

    ``tracing``: see :func:`array_namespace`."""
    kind: str = _cached(_KIND_CACHE, dtype, _dtype_kind, tracing)
    return kind


def _dtype_name(dtype: Any) -> str:
    """'float32', 'bool', ... for a dtype of any library (TensorFlow's str() is "<dtype: ...>").

    Scalar types (``np.float32``, ``jnp.float16``: what the NumPy, Dask and JAX namespaces
    name their dtypes by) by their NumPy name: their ``name`` is a descriptor and their
    ``str()`` is ``"<class 'numpy.float32'>"``, which read as ``"float32'>"``."""
    if isinstance(dtype, type):  # NumPy / JAX / ml_dtypes scalar types
        try:
            return np.dtype(dtype).name
        except TypeError:
            return dtype.__name__.lower()
    name = getattr(dtype, "name", None)  # NumPy, CuPy, JAX and TensorFlow dtypes; not torch
    if not isinstance(name, str):
        name = str(dtype)
    return name.rsplit(".", 1)[-1].lower()


def dtype_name(dtype: Any) -> str:
    """The name of a dtype of any library (``np.float64``, ``torch.float64``, ``jnp.float64``,
    ``tf.float64``, ``np.dtype("float64")``, ``ml_dtypes.bfloat16``...): ``"float64"``."""
    return _dtype_name(dtype)


def numpy_result(x: Any) -> Any:
    """A 0-d NumPy result as a NumPy scalar of its dtype (as NumPy's own reductions give);
    anything else (ndarrays of 1 or more axes, other libraries' 0-d arrays) as is."""
    if type(x) is np.ndarray and x.ndim == 0:
        return x[()]
    return x


def _dtype_kind(dtype: Any) -> str:
    name = _dtype_name(dtype)
    if name in {"bool", "bool_", "bool8"}:
        return "bool"
    if "complex" in name:
        return "complex"
    if "float" in name or name in {"half", "double"}:
        return "float"
    if name.startswith(("int", "uint", "long", "short")):
        return "int"
    try:
        kind = np.dtype(dtype).kind
    except Exception:
        return "other"
    return {"f": "float", "i": "int", "u": "int", "b": "bool", "c": "complex"}.get(kind, "other")


def is_low_precision(dtype: Any, *, tracing: bool | None = None) -> bool:
    """float16, bfloat16 and the float8/float6/float4 formats (of any library): computed in
    float32 by kldiv and returned in the input dtype. ``tracing``: see :func:`array_namespace`."""
    low: bool = _cached(_LOW_CACHE, dtype, _is_low_precision, tracing)
    return low


def _is_low_precision(dtype: Any) -> bool:
    name = _dtype_name(dtype)
    return name in {"float16", "bfloat16", "half"} or name.startswith(("float8_", "float6_", "float4_"))


_LOW_CACHE: dict[type, dict[Any, bool]] = {}
"""One dict per dtype type (see ``_KIND_CACHE``)."""
