"""Array-library detection and conversion, without importing any framework.

Everything here looks in ``sys.modules`` (directly or through ``array_api_compat``),
so asking "is this a torch tensor?" never imports torch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "DEVICE_SCOPES",
    "EXTRA_NAMESPACES",
    "ArrayLike",
    "array_namespace",
    "as_pred_array",
    "call_time_values",
    "check_dense",
    "dtype_kind",
    "dtype_name",
    "get_device",
    "is_array",
    "is_dask",
    "is_low_precision",
    "namespace_name",
    "native_namespace",
    "numpy_result",
    "to_namespace",
]

ArrayLike = Any


def _tensorflow_namespace(x: object) -> ModuleType | None:
    """TensorFlow tensors are not array-API objects: kldiv gives them a small namespace shim.

    Looks only in ``sys.modules``, so TensorFlow is never imported here.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(x, (tf.Tensor, tf.Variable)):
        return None
    from .backends import tensorflow_

    return tensorflow_.namespace


# Resolvers for array types array-api-compat does not know: each returns a namespace or None.
EXTRA_NAMESPACES: list[Callable[[object], ModuleType | None]] = [_tensorflow_namespace]

# Namespaces whose ops need a context to stay on the inputs' device (TensorFlow places eager
# ops on its preferred device, not the inputs'): namespace -> (device -> context or None).
# Backend modules add themselves when imported.
DEVICE_SCOPES: dict[ModuleType, Callable[[Any], contextlib.AbstractContextManager[Any] | None]] = {}


def device_scope(xp: ModuleType, device: Any) -> contextlib.AbstractContextManager[Any] | None:
    """The context that keeps ``xp``'s ops on ``device``, or ``None`` where none is needed."""
    scope = DEVICE_SCOPES.get(xp)
    return None if scope is None else scope(device)


def _extra_namespace(x: object) -> ModuleType | None:
    for resolve in EXTRA_NAMESPACES:
        xp = resolve(x)
        if xp is not None:
            return xp
    return None


# type(x) -> namespace: the namespace of an array depends only on its type, and asking
# array-api-compat costs microseconds that matter for small per-call inputs.
_NAMESPACE_CACHE: dict[type, ModuleType] = {}


def _is_torch(x: object) -> bool:
    """``isinstance(x, torch.Tensor)`` where torch is loaded (never imports it).

    Asked first by the type checks here: array-api-compat's ``is_torch_array``,
    ``is_dask_array``, ``array_namespace``... call ``functools.lru_cache``-wrapped helpers,
    and ``torch.compile`` (dynamo) warns for each one it traces through. Under dynamo every
    input is a tensor (NumPy arrays and lists are traced as tensors), so these checks end
    here.
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_namespace() -> ModuleType:
    """array-api-compat's torch namespace (what its ``array_namespace`` gives a tensor)."""
    import array_api_compat.torch as compat_torch

    return compat_torch


def array_namespace(x: Any) -> ModuleType:
    """The array-API namespace of ``x`` (compat-wrapped; or a kldiv shim, e.g. TensorFlow)."""
    tp = type(x)
    xp = _NAMESPACE_CACHE.get(tp)
    if xp is None:
        if _is_torch(x):
            xp = _torch_namespace()
        else:
            xp = _extra_namespace(x)
            if xp is None:
                xp = array_api_compat.array_namespace(x)
        _NAMESPACE_CACHE[tp] = xp
    return xp


def is_array(x: object) -> bool:
    """True for any array object a supported library (or the array API) produces."""
    if isinstance(x, (int, float, bool, complex)):  # first: np.float64 is a float, and the
        return False  # same answer whatever the cache below holds (np.float64 as a total)
    if type(x) in _NAMESPACE_CACHE or _is_torch(x):  # a type already seen as an array
        return True
    return array_api_compat.is_array_api_obj(x) or _extra_namespace(x) is not None


def torch_compiling() -> bool:
    """True while ``torch.compile`` (dynamo) traces kldiv: then only the generic kernel runs.

    Fast paths are opaque to dynamo, and their dispatch (context variables, environment,
    lazy imports) would break the graph; ``torch.compiler.is_compiling()`` folds to a
    constant under dynamo, so this check costs the traced graph nothing.
    """
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def is_dask(x: object) -> bool:
    """``isinstance(x, dask.array.Array)`` where Dask is loaded (what array-api-compat's
    ``is_dask_array`` asks, without its ``lru_cache``'d helper: see :func:`_is_torch`)."""
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(x, da.Array)


_NAME_CACHE: dict[int, str] = {}


def namespace_name(xp: ModuleType) -> str:
    """A short name for a (possibly compat-wrapped) namespace: 'numpy', 'torch', ..."""
    try:
        return _NAME_CACHE[id(xp)]
    except KeyError:
        name = _namespace_name(xp)
    _NAME_CACHE[id(xp)] = name  # namespaces are modules: they live as long as the process
    return name


_TORCH_MODULES = frozenset({"torch", f"{array_api_compat.__name__}.torch"})


def _namespace_name(xp: ModuleType) -> str:
    name = getattr(xp, "__kldiv_name__", None)
    if name is not None:
        return str(name)
    if getattr(xp, "__name__", None) in _TORCH_MODULES:  # before compat's lru_cache'd checks
        return "torch"
    if array_api_compat.is_numpy_namespace(xp):
        return "numpy"
    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    if array_api_compat.is_jax_namespace(xp):
        return "jax"
    if array_api_compat.is_cupy_namespace(xp):
        return "cupy"
    if array_api_compat.is_dask_namespace(xp):
        return "dask"
    if array_api_compat.is_array_api_strict_namespace(xp):
        return "array_api_strict"
    return getattr(xp, "__name__", type(xp).__name__)


def native_namespace(xp: ModuleType) -> ModuleType:
    """The namespace the generic kernel runs in: NumPy itself for NumPy arrays, else ``xp``.

    array-api-compat's NumPy ``clip`` writes into a new C-ordered array, so a
    Fortran-ordered or transposed input would be summed in another order than the formula
    as written (and than the NumPy fast path). NumPy's own functions keep the inputs' memory
    layout (and a subclass's semantics, e.g. masked arrays); NumPy 2 is array-API compatible
    in everything the kernel calls.
    """
    return np if namespace_name(xp) == "numpy" else xp


def get_device(x: Any) -> Any:
    """The device of ``x``, or ``None`` where it has none we can ask for (JAX tracers)."""
    tp = type(x)
    if tp is np.ndarray:
        return "cpu"
    torch = sys.modules.get("torch")
    if torch is not None and (tp is torch.Tensor or tp is torch.nn.Parameter):
        return x.device  # what array-api-compat answers, without its chain of type checks
    try:
        device = array_api_compat.device(x)
    except Exception:
        return None
    if isinstance(device, str) and not device:  # a TensorFlow tensor in a graph: unplaced
        return None
    return device


def _to_device(x: Any, device: Any) -> Any:
    """``x`` moved to ``device``: array-api-compat's ``to_device``, or the shim's (TensorFlow)."""
    xp = _extra_namespace(x)
    if xp is not None:
        return xp.to_device(x, device)
    return array_api_compat.to_device(x, device)


# Keyed by (type, dtype): dtypes of different libraries may hash alike, and some refuse (warn
# on) being compared with each other.
_KIND_CACHE: dict[type, dict[Any, str]] = {}
"""One dict per dtype *type*: a lookup only ever hashes and compares dtypes of one library.
(One shared dict keyed by dtype would make ``torch.compile`` trace the hashing of other
libraries' dtype objects, e.g. TensorFlow's C-level ``DType.__hash__``, a graph break.)"""


def _remember(cache: dict[type, dict[Any, Any]], tp: type, key: Any, value: Any) -> None:
    """``cache[tp][key] = value``, except while ``torch.compile`` traces: a cache written
    during tracing is a side effect dynamo replays by rebuilding the whole dict, hashing
    every key in it, other libraries' dtypes included (TensorFlow's C ``DType.__hash__`` is
    a graph break)."""
    if torch_compiling():
        return
    with contextlib.suppress(TypeError):  # unhashable dtype object: no caching
        cache.setdefault(tp, {})[key] = value


def dtype_kind(dtype: Any) -> str:
    """Classify a dtype of any library: 'float', 'int', 'bool', 'complex' or 'other'."""
    cache = _KIND_CACHE.get(type(dtype))
    try:
        return cache[dtype]  # type: ignore[index]
    except (KeyError, TypeError):
        pass
    kind = _dtype_kind(dtype)
    _remember(_KIND_CACHE, type(dtype), dtype, kind)
    return kind


def _dtype_name(dtype: Any) -> str:
    """'float32', 'bool', ... for a dtype of any library (TensorFlow's str() is "<dtype: ...>")."""
    name = getattr(dtype, "name", None)  # NumPy, CuPy, JAX and TensorFlow dtypes; not torch
    if not isinstance(name, str):
        name = str(dtype)
    return name.rsplit(".", 1)[-1].lower()


def dtype_name(dtype: Any) -> str:
    """The name of a dtype of any library (``np.float64``, ``torch.float64``, ``jnp.float64``,
    ``tf.float64``, ``np.dtype("float64")``, ``ml_dtypes.bfloat16``...): ``"float64"``."""
    if isinstance(dtype, type):  # NumPy / JAX / ml_dtypes scalar types
        try:
            return np.dtype(dtype).name
        except TypeError:
            return dtype.__name__.lower()
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


def is_low_precision(dtype: Any) -> bool:
    """float16, bfloat16 and the float8/float6/float4 formats (of any library): computed in
    float32 by kldiv and returned in the input dtype."""
    cache = _LOW_CACHE.get(type(dtype))
    try:
        return cache[dtype]  # type: ignore[index]
    except (KeyError, TypeError):
        pass
    name = _dtype_name(dtype)
    low = name in {"float16", "bfloat16", "half"} or name.startswith(("float8_", "float6_", "float4_"))
    _remember(_LOW_CACHE, type(dtype), dtype, low)
    return low


_LOW_CACHE: dict[type, dict[Any, bool]] = {}
"""One dict per dtype type (see ``_KIND_CACHE``)."""


def _host_numpy(x: Any) -> np.ndarray:
    """Last-resort conversion of a foreign array to NumPy (a trip through the host)."""
    if _is_torch(x):
        x = x.detach().cpu()
        if is_low_precision(x.dtype):
            x = x.float()
        return x.numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if is_dask(x):
        return np.asarray(x.compute())
    return np.asarray(x)


def _from_python(x: Any, what: str) -> np.ndarray:
    """Python scalars, lists and tuples (and anything else NumPy accepts) -> NumPy."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{what} could not be converted to an array: {exc}") from None
    return arr


def _read_variable(x: Any) -> Any:
    """A TensorFlow variable's value as a tensor (a read GradientTape watches); else ``x``."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(x, tf.Variable):
        return tf.convert_to_tensor(x)
    return x


def _native_byte_order(x: Any) -> Any:
    """A NumPy array in the machine's byte order (``.npy``/FITS files may hold big-endian
    data, which some ufunc loops and every other library refuse); anything else as is."""
    if type(x) is np.ndarray and not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))
    return x


def _sparse_hint(x: object) -> str | None:
    """How to densify ``x`` if it is a sparse array of a known library, else ``None``."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.layout == torch.strided:
            return None
        return f"torch tensor (layout {x.layout}); call .to_dense() first"
    module = type(x).__module__
    if module.startswith("scipy.sparse"):
        return f"SciPy {type(x).__name__}; call .toarray() first"
    if module.startswith("jax.experimental.sparse"):
        return f"JAX {type(x).__name__} array; call .todense() first"
    if module.startswith("sparse."):  # pydata/sparse
        return f"pydata sparse {type(x).__name__}; call .todense() first"
    if module.startswith("tensorflow") and type(x).__name__ == "SparseTensor":
        return "TensorFlow SparseTensor; call tf.sparse.to_dense() first"
    return None


def check_dense(x: object, what: str) -> None:
    """``TypeError`` for a sparse array: kldiv does not densify silently (memory)."""
    hint = _sparse_hint(x)
    if hint is not None:
        raise TypeError(f"{what} is a sparse {hint}. kldiv works on dense arrays.")


def as_pred_array(y_pred: Any) -> Any:
    """y_pred as an array of its own library; Python values become NumPy (floats: float32)."""
    check_dense(y_pred, "y_pred")
    if is_array(y_pred):
        return _native_byte_order(_read_variable(y_pred))
    arr = _from_python(y_pred, "y_pred")
    kind = dtype_kind(arr.dtype)
    if kind == "float" and not isinstance(y_pred, (np.generic, np.ndarray)):
        # Python floats are Keras floatx (float32) values, as in the seed examples. NumPy
        # objects array-api-compat does not take as arrays (NumPy scalars, np.matrix) keep
        # their dtype.
        arr = arr.astype(np.float32)
    return arr


def _check_castable(x_dtype: Any, target: Any, what: str) -> None:
    kind = dtype_kind(x_dtype)
    if kind in {"float", "int", "bool"}:
        return
    if kind == "complex":
        raise TypeError(
            f"{what} has complex dtype {x_dtype}, which cannot be cast to y_pred's real dtype "
            f"{target} without losing the imaginary part."
        )
    raise TypeError(f"{what} has dtype {x_dtype}, which cannot be cast to y_pred's dtype {target}.")


def to_namespace(x: Any, xp: ModuleType, device: Any, dtype: Any, *, what: str,
                 peer: Any = None) -> Any:
    """Convert ``x`` (any library, list or scalar) to namespace ``xp`` on ``device`` as ``dtype``.

    Arrays of the same library only move when they sit on another device; arrays of another
    library go through DLPack (zero-copy where the devices agree) and only fall back to a
    copy through NumPy when DLPack cannot do it. JAX and TensorFlow arrays are immutable and
    may be read after the call (asynchronous dispatch, residuals kept for ``jax.vjp`` or a
    ``GradientTape``), so memory imported into them from a mutable library (torch, CuPy) is
    copied.

    ``peer`` is an array whose gradient autograd may compute from the result later (the loss
    that a ``sample_weight`` multiplies): see :func:`call_time_values`.
    """
    if torch_compiling() and not _is_torch(x) and namespace_name(xp) == "torch":
        # dynamo traces NumPy (and Python lists through np.asarray) as torch, but cannot read
        # an ndarray's dtype: go straight to a tensor
        return sys.modules["torch"].as_tensor(x, dtype=dtype, device=device)
    out = _to_namespace(x, xp, device, dtype, what)
    return out if peer is None else call_time_values(out, peer)


def call_time_values(x: Any, peer: Any) -> Any:
    """``x``, or a copy of it in memory torch owns, where autograd may save ``x`` for a later
    backward pass of ``peer`` and ``x``'s memory is not torch's own.

    Autograd's contract is the values at call time. Its version counter sees every in-place
    change made through torch (changing a saved tensor raises torch's "modified by an
    inplace operation" error), but not a write to memory torch did not allocate: a NumPy
    array converted without a copy, ``torch.from_numpy``, a DLPack import, ``torch.frombuffer``
    (the storages torch cannot resize). A reused loader buffer refilled before ``backward()``
    would change the gradient silently, so such a tensor is copied when grad mode is on and
    ``peer`` requires a gradient. The same rule as the torch fast path's for its inputs
    (``kldiv.backends.torch_._private``). Not applied while ``torch.compile`` traces: the
    compiled backward reads its graph inputs when it runs, a copy inside the graph or not.
    """
    torch = sys.modules.get("torch")
    if (torch is None or not isinstance(x, torch.Tensor) or not isinstance(peer, torch.Tensor)
            or not peer.requires_grad or not torch.is_grad_enabled() or torch_compiling()):
        return x
    try:
        own = x.layout != torch.strided or x.untyped_storage().resizable()
    except (RuntimeError, NotImplementedError):  # no storage to ask (functorch wrappers)
        return x
    return x if own else x.clone()


def _to_namespace(x: Any, xp: ModuleType, device: Any, dtype: Any, what: str) -> Any:
    check_dense(x, what)
    if not is_array(x):
        arr = _from_python(x, what)
        _check_castable(arr.dtype, dtype, what)
        return _asarray(xp, arr, device, dtype)

    _check_castable(x.dtype, dtype, what)
    x = _native_byte_order(_read_variable(x))
    try:
        src_xp: ModuleType | None = array_namespace(x)
    except TypeError:
        src_xp = None
    if src_xp is xp:
        # cast before moving: the target device may not hold x's dtype (no float64)
        if x.dtype != dtype:
            x = xp.astype(x, dtype)
        if device is not None:
            x_device = get_device(x)
            if x_device is not None and x_device != device:
                x = _to_device(x, device)
        return x
    # Another library: cast on the source side first, to the dtype of the same name there, so
    # that only dtypes both libraries hold cross over (NumPy has no bfloat16, array-api-strict
    # no float16, a device may have no float64).
    if src_xp is not None:
        x = _cast_at_source(x, src_xp, dtype)
    try:
        x = _foreign_to(x, xp, device, dtype)
        if x.dtype != dtype:
            x = xp.astype(x, dtype)
    except (TypeError, ValueError, RuntimeError, AttributeError, BufferError) as exc:
        src = namespace_name(src_xp) if src_xp is not None else type(x).__name__
        raise TypeError(
            f"{what} ({src} array of dtype {x.dtype}) could not be converted to y_pred's "
            f"library {namespace_name(xp)} as {dtype} on device {device}: {exc}"
        ) from None
    return x


def _cast_at_source(x: Any, src_xp: ModuleType, dtype: Any) -> Any:
    """``x`` cast, in its own library and on its own device, to the dtype named like
    ``dtype`` (a dtype of another library); ``x`` itself where there is no such dtype or the
    cast fails there (the conversion then tries as it is)."""
    name = _dtype_name(dtype)
    if _dtype_name(x.dtype) == name:
        return x
    src_dtype = getattr(src_xp, name, None)
    if src_dtype is None:
        return x
    if _is_torch(x):
        x = x.detach()  # y_true / sample_weight carry no gradient across libraries
    try:
        return src_xp.astype(x, src_dtype)
    except (TypeError, ValueError, RuntimeError):
        return x


def _asarray(xp: ModuleType, arr: Any, device: Any, dtype: Any) -> Any:
    if device is None:  # inside a JAX trace there is no device to name
        out = xp.asarray(arr)
        return xp.astype(out, dtype) if out.dtype != dtype else out
    if array_api_compat.is_jax_namespace(xp):
        out = xp.asarray(arr)
        out = xp.astype(out, dtype) if out.dtype != dtype else out
        return out if get_device(out) == device else array_api_compat.to_device(out, device)
    if array_api_compat.is_dask_namespace(xp):
        out = xp.asarray(arr)
        return xp.astype(out, dtype) if out.dtype != dtype else out
    if array_api_compat.is_torch_namespace(xp):
        torch = sys.modules["torch"]
        return torch.as_tensor(np.asarray(arr), dtype=dtype, device=device)
    try:  # cast while converting: the device may not hold NumPy's dtype (no float64)
        return xp.asarray(arr, dtype=dtype, device=device)
    except (TypeError, ValueError):
        out = xp.asarray(arr, device=device)
        return xp.astype(out, dtype) if out.dtype != dtype else out


def _foreign_to(x: Any, xp: ModuleType, device: Any, dtype: Any) -> Any:
    """Array of another library -> ``xp`` on ``device``."""
    if _is_torch(x):
        x = x.detach()  # y_true / sample_weight carry no gradient across libraries
    if array_api_compat.is_dask_namespace(xp):
        return xp.asarray(_host_numpy(x) if not array_api_compat.is_numpy_array(x) else x)
    if array_api_compat.is_jax_namespace(xp):
        try:
            if array_api_compat.is_numpy_array(x):
                out = xp.asarray(x)  # a copy, made during the call
            else:
                out = _own_copy(xp, xp.from_dlpack(x), x)
        except Exception:
            out = xp.asarray(_host_numpy(x))
        if device is not None and get_device(out) != device:
            out = array_api_compat.to_device(out, device)
        return out
    try:
        out = xp.from_dlpack(x)
    except Exception:
        out = None
    if out is None:
        return _asarray(xp, _host_numpy(x), device, dtype)
    if namespace_name(xp) == "tensorflow":
        out = _own_copy(xp, out, x)
    if device is not None and get_device(out) != device:
        out = _to_device(out, device)
    return out


# Libraries whose arrays nobody changes in place: memory imported from them needs no copy.
_IMMUTABLE = frozenset({"jax", "tensorflow"})


def _own_copy(xp: ModuleType, out: Any, source: Any) -> Any:
    """``out`` (a zero-copy DLPack import of ``source`` into JAX or TensorFlow) as a copy that
    ``xp`` owns, finished before returning, unless ``source``'s library is immutable too.

    JAX and TensorFlow treat their arrays as immutable: JAX dispatches asynchronously (its
    kernel may read ``out`` after kldiv returns), ``jax.vjp`` and ``GradientTape`` keep it for a
    later backward pass. A torch or CuPy buffer changed in place after the call (a reused
    loader buffer) would change the result or the gradient silently. JAX's
    ``from_dlpack(copy=True)`` still aliases CPU memory; the copy below is waited for, so
    that its own asynchronous read cannot race either.
    """
    try:
        src = namespace_name(array_namespace(source))
    except TypeError:
        src = ""
    if src in _IMMUTABLE:
        return out
    if namespace_name(xp) == "tensorflow":
        tf = sys.modules["tensorflow"]
        return tf.raw_ops.DeepCopy(x=out)  # tf.identity would share the buffer
    out = xp.array(out, copy=True)
    ready = getattr(out, "block_until_ready", None)  # not on a tracer (inside jax.jit)
    return out if ready is None else ready()

