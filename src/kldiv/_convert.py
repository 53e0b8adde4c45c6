"""Conversion of inputs to one array library, device and dtype (the inputs layer).

:func:`to_namespace` brings ``y_true``, ``sample_weight``... to ``y_pred``'s library, device
and dtype (DLPack where it can, a host copy where it must); :func:`as_pred_array` makes
``y_pred`` itself an array; :func:`check_dense` refuses sparse arrays; :func:`host_numpy`
is the last-resort trip through the host. Detection (namespaces, devices, dtypes) is
:mod:`kldiv._namespace`; what each library allows is the table's (:mod:`kldiv._libraries`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from . import _compat
from ._libraries import (
    GRAPHED,
    HOSTED,
    compiler_library,
    library,
    ragged_hint,
    shim_namespace,
    sparse_hint,
)
from ._namespace import (
    _dtype_name,
    array_namespace,
    dtype_kind,
    get_device,
    is_array,
    namespace_name,
    torch_compiling,
)

__all__ = [
    "as_pred_array",
    "call_time_values",
    "check_dense",
    "host_numpy",
    "to_namespace",
]

_COMPILER = compiler_library()  # torch: dynamo traces kldiv's Python (torch.compile)


def _to_device(x: Any, device: Any) -> Any:
    """``x`` moved to ``device``: array-api-compat's ``to_device``, or the shim's (TensorFlow)."""
    xp = shim_namespace(x)
    if xp is not None:
        return xp.to_device(x, device)
    return _compat.to_device(x, device)


# Keyed by (type, dtype): dtypes of different libraries may hash alike, and some refuse (warn
# on) being compared with each other.

def host_numpy(x: Any) -> np.ndarray:
    """Last-resort conversion of a foreign array to NumPy (a trip through the host)."""
    for lib in GRAPHED:  # torch: detached, on the CPU, low precision as float32
        if lib.is_instance(x):
            out: np.ndarray = lib.load_adapter().host_numpy(x)
            return out
    for lib in HOSTED:  # CuPy (device memory), Dask (a task graph)
        if lib.is_instance(x):
            return np.asarray(getattr(x, lib.to_host)())
    return np.asarray(x)


def _from_python(x: Any, what: str) -> np.ndarray:
    """Python scalars, lists and tuples (and anything else NumPy accepts) -> NumPy.

    A ``TypeError`` naming ``what`` when NumPy cannot: also for the library errors NumPy
    passes on from the items of a list (torch's RuntimeError for a tensor that requires
    grad, JAX's for a tracer), with a hint to stack such items in their own library."""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError, RuntimeError) as exc:
        hint = ""
        if isinstance(x, (list, tuple)) and _holds_array(x):
            hint = (f" (a {type(x).__name__} of arrays: stack them into one array of their "
                    "library first, e.g. torch.stack or jnp.stack)")
        raise TypeError(f"{what} could not be converted to an array{hint}: {exc}") from None
    return arr


def _holds_array(x: Any, depth: int = 0) -> bool:
    """Whether a (nested) list or tuple holds an array of a library (not NumPy's scalars)."""
    for item in x:
        if isinstance(item, (list, tuple)):
            if depth < 32 and _holds_array(item, depth + 1):
                return True
        elif is_array(item) and not isinstance(item, (np.ndarray, np.generic)):
            return True
    return False


def _read_variable(x: Any) -> Any:
    """A TensorFlow variable's value as a tensor (a read GradientTape watches); else ``x``.

    The shim's ``asarray`` reads variables and gives tensors back as they are."""
    if type(x) is np.ndarray or _COMPILER.is_instance(x):  # the common cases: no shim's
        return x
    shim = shim_namespace(x)
    return x if shim is None else shim.asarray(x)


def _native_byte_order(x: Any) -> Any:
    """A NumPy array in the machine's byte order (``.npy``/FITS files may hold big-endian
    data, which some ufunc loops and every other library refuse); anything else as is."""
    if type(x) is np.ndarray and not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))
    return x


def _sparse_hint(x: object) -> str | None:
    """How to densify ``x`` if it is a sparse array (the table's libraries' sparse types, and
    the sparse-only libraries SciPy and pydata/sparse), else ``None``."""
    if type(x) is np.ndarray:  # the common case, in microseconds-per-call loops
        return None
    hint = sparse_hint(x)  # first: a dense tensor under torch.compile ends there
    if hint is not None:
        return hint
    module = type(x).__module__
    if module.startswith("scipy.sparse"):
        return f"SciPy {type(x).__name__}; call .toarray() first"
    if module.startswith("sparse."):  # pydata/sparse
        return f"pydata sparse {type(x).__name__}; call .todense() first"
    return None


def check_dense(x: object, what: str) -> None:
    """``TypeError`` for a sparse or nested (ragged) array: kldiv does not densify or pad
    silently (memory, and the padding value is the caller's choice)."""
    if type(x) is np.ndarray:  # the common case, in microseconds-per-call loops
        return
    pad = ".to_padded_tensor(0.0)" if getattr(x, "is_nested", False) is True else None  # torch
    hint = None if pad is not None else _sparse_hint(x)
    if hint is not None:
        raise TypeError(f"{what} is a sparse {hint}. kldiv works on dense arrays.")
    if pad is None:
        pad = ragged_hint(x)  # TensorFlow's RaggedTensor: no array (NumPy makes objects of it)
    if pad is not None:
        raise TypeError(f"{what} is a nested (ragged) {type(x).__name__}; pad it first, e.g. "
                        f"{pad} with a 0 sample weight on the padding. kldiv works on dense "
                        "arrays.")


def as_pred_array(y_pred: Any, what: str = "y_pred") -> Any:
    """y_pred as an array of its own library; Python values become NumPy (floats: float32).

    ``what``: the argument's name in messages (``"logprob"`` for the estimators)."""
    check_dense(y_pred, what)
    if is_array(y_pred):
        return _native_byte_order(_read_variable(y_pred))
    arr = _from_python(y_pred, what)
    if arr.dtype == np.float64 and _python_values(y_pred):
        # Python floats are Keras floatx (float32) values, as in the seed examples. Objects
        # that carry a dtype of their own keep it: NumPy scalars and np.matrix (which
        # array-api-compat does not take as arrays), and whatever NumPy converts through the
        # buffer protocol or ``__array__`` (array.array, memoryview, pandas, xarray...).
        with np.errstate(over="ignore"):  # beyond float32's range: inf, as Keras' cast
            arr = arr.astype(np.float32)
    return arr


def _python_values(x: Any) -> bool:
    """``x`` is a Python number or a (nested) list/tuple: NumPy chose its dtype (float64 for
    Python floats), the value itself has none."""
    if isinstance(x, (list, tuple)):
        return True
    return isinstance(x, (int, float)) and not isinstance(x, np.generic)


def _check_castable(x_dtype: Any, target: Any, what: str, like: str, tracing: bool) -> None:
    kind = dtype_kind(x_dtype, tracing=tracing)
    if kind in {"float", "int", "bool"}:
        return
    if isinstance(target, type):  # a scalar type (np.float32 for Python values): its name
        target = _dtype_name(target)
    if kind == "complex":
        raise TypeError(
            f"{what} has complex dtype {x_dtype}, which cannot be cast to {like}'s real dtype "
            f"{target} without losing the imaginary part."
        )
    raise TypeError(f"{what} has dtype {x_dtype}, which cannot be cast to {like}'s dtype {target}.")


def to_namespace(x: Any, xp: ModuleType, device: Any, dtype: Any, *, what: str,
                 like: str = "y_pred", peer: Any = None, tracing: bool | None = None) -> Any:
    """Convert ``x`` (any library, list or scalar) to namespace ``xp`` on ``device`` as ``dtype``.

    Arrays of the same library only move when they sit on another device; arrays of another
    library go through DLPack (zero-copy where the devices agree) and only fall back to a
    copy through NumPy when DLPack cannot do it. JAX and TensorFlow arrays are immutable and
    may be read after the call (asynchronous dispatch, residuals kept for ``jax.vjp`` or a
    ``GradientTape``), so memory imported into them from a mutable library (torch, CuPy) is
    copied.

    ``what`` names ``x`` in messages, ``like`` the argument (or result) whose library and
    dtype it is converted to: ``"y_pred"``, ``"logprob"``, ``"the loss"``.

    ``peer`` is an array whose gradient autograd may compute from the result later (the loss
    that a ``sample_weight`` multiplies): see :func:`call_time_values`. ``tracing``:
    :func:`~kldiv._namespace.torch_compiling`'s answer where the caller has it (asked here,
    once for the whole conversion, when ``None``; each check costs about 0.1 us).
    """
    if tracing is None:
        tracing = torch_compiling()
    if tracing and not _COMPILER.is_instance(x) and library(xp, tracing=True) is _COMPILER:
        # dynamo traces NumPy (and Python lists through np.asarray) as torch, but cannot read
        # an ndarray's dtype: go straight to a tensor
        return _COMPILER.loaded().as_tensor(x, dtype=dtype, device=device)  # type: ignore[union-attr]
    if tracing or (is_array(x) and not isinstance(x, (np.ndarray, np.generic))):
        out = _to_namespace(x, xp, device, dtype, what, like, tracing)
    else:
        # NumPy data (an array or Python values) is cast by NumPy, here or inside the target
        # library (JAX, Dask, torch.as_tensor): a value beyond the target dtype's range is
        # inf, as Keras' cast gives, without NumPy's "overflow encountered in cast"
        # RuntimeWarning (np.errstate: not while dynamo traces, where it breaks the graph)
        with np.errstate(over="ignore"):
            out = _to_namespace(x, xp, device, dtype, what, like, tracing)
    return out if peer is None else _call_time_values(out, peer, tracing)


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
    return _call_time_values(x, peer, None)


def _call_time_values(x: Any, peer: Any, tracing: bool | None) -> Any:
    for lib in GRAPHED:  # the adapter's rule (torch's), never loaded while dynamo traces
        if lib.is_instance(x) and lib.is_instance(peer) and not (
                torch_compiling() if tracing is None else tracing):
            return lib.load_adapter().call_time_values(x, peer)
    return x


def _to_namespace(x: Any, xp: ModuleType, device: Any, dtype: Any, what: str, like: str,
                  tracing: bool) -> Any:
    check_dense(x, what)
    if not is_array(x):
        arr = _from_python(x, what)
        _check_castable(arr.dtype, dtype, what, like, tracing)
        return _asarray(xp, arr, device, dtype)

    _check_castable(x.dtype, dtype, what, like, tracing)
    x = _native_byte_order(_read_variable(x))
    try:
        src_xp: ModuleType | None = array_namespace(x, tracing=tracing)
    except TypeError:
        src_xp = None
    if src_xp is xp:
        # cast before moving: the target device may not hold x's dtype (no float64)
        if x.dtype != dtype:
            x = xp.astype(x, dtype)
        if device is not None:
            x_device = get_device(x)
            if x_device is not None and x_device != device:
                try:
                    x = _to_device(x, device)
                except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
                    # e.g. torch's 'meta' device (no data), a device without the dtype
                    raise TypeError(
                        f"{what} (on device {x_device}) could not be moved to {like}'s device "
                        f"{device}: {exc}"
                    ) from None
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
        # e.g. a JAX tracer or a torch.func-wrapped tensor against a NumPy y_pred: the call
        # runs in y_pred's library, which cannot hold a traced value
        owner = f"the inputs as {src} arrays" if like.startswith("the ") else f"{like} as a {src} array"
        raise TypeError(
            f"{what} ({src} array of dtype {x.dtype}) could not be converted to {like}'s "
            f"library {namespace_name(xp)} as {dtype} on device {device}: {exc} (kldiv "
            f"computes in {like}'s library; to compute in {src}, give {owner})"
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
    if src_dtype is None or (name == "float64" and not _holds_float64(src_xp, x)):
        # JAX without jax_enable_x64 names float64 but warns ("Explicitly requested dtype
        # float64 ... truncated") and gives float32: the cast is made in the target library
        return x
    x = _without_graph(x)  # y_true / sample_weight carry no gradient across libraries
    try:
        return src_xp.astype(x, src_dtype)
    except (TypeError, ValueError, RuntimeError):
        return x


def _holds_float64(xp: ModuleType, x: Any) -> bool:
    """Whether ``xp`` (``x``'s library) holds float64 on ``x``'s device (the table's
    :meth:`~kldiv._libraries.Library.has_float64`; ``True`` where it cannot tell)."""
    try:
        return library(xp).has_float64(xp, get_device(x))
    except Exception:
        return True


def _asarray(xp: ModuleType, arr: Any, device: Any, dtype: Any) -> Any:
    if device is None:  # inside a JAX trace there is no device to name
        out = xp.asarray(arr)
        return xp.astype(out, dtype) if out.dtype != dtype else out
    lib = library(xp)
    if lib.place_after:  # JAX, Dask
        out = xp.asarray(arr)
        out = xp.astype(out, dtype) if out.dtype != dtype else out
        return out if lib.lazy or get_device(out) == device else _compat.to_device(out, device)
    if lib is _COMPILER:  # torch: its own as_tensor, not compat's asarray
        module: Any = lib.loaded()
        return module.as_tensor(np.asarray(arr), dtype=dtype, device=device)
    try:  # cast while converting: the device may not hold NumPy's dtype (no float64)
        return xp.asarray(arr, dtype=dtype, device=device)
    except (TypeError, ValueError):
        out = xp.asarray(arr, device=device)
        return xp.astype(out, dtype) if out.dtype != dtype else out


def _foreign_to(x: Any, xp: ModuleType, device: Any, dtype: Any) -> Any:
    """Array of another library -> ``xp`` on ``device``."""
    x = _without_graph(x)  # y_true / sample_weight carry no gradient across libraries
    lib = library(xp)
    if lib.lazy:  # Dask: host chunks
        return xp.asarray(host_numpy(x) if not _compat.is_numpy_array(x) else x)
    if lib.place_after:  # JAX: a copy it owns, then placed
        try:
            if _compat.is_numpy_array(x):
                out = xp.asarray(x)  # a copy, made during the call
            else:
                out = _own_copy(xp, xp.from_dlpack(x), x)
        except Exception:
            out = xp.asarray(host_numpy(x))
        if device is not None and get_device(out) != device:
            out = _compat.to_device(out, device)
        return out
    try:
        out = xp.from_dlpack(x)
    except Exception:
        out = None
    if out is None:
        return _asarray(xp, host_numpy(x), device, dtype)
    if lib.immutable:  # TensorFlow
        out = _own_copy(xp, out, x)
    if device is not None and get_device(out) != device:
        out = _to_device(out, device)
    return out


def _without_graph(x: Any) -> Any:
    """``x`` without an autograd graph (the table's :attr:`~kldiv._libraries.Library.detach`)."""
    for lib in GRAPHED:
        if lib.is_instance(x):
            return getattr(x, lib.detach)()
    return x


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
        immutable = library(array_namespace(source)).immutable  # the table's flag
    except TypeError:
        immutable = False
    if immutable:
        return out
    if library(xp).array_types:  # kldiv's shim: its astype copies (TensorFlow's DeepCopy;
        return xp.astype(out, out.dtype, copy=True)  # tf.identity would share the buffer)
    out = xp.array(out, copy=True)
    ready = getattr(out, "block_until_ready", None)  # not on a tracer (inside jax.jit)
    return out if ready is None else ready()


_host_numpy = host_numpy  # temporary: the old private name, until its importers switch
