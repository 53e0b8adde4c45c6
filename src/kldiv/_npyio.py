"""``.npy`` input and output for the streaming helpers.

Reading: :func:`open_source` validates an input (a ``.npy`` path or an in-memory array)
without reading its data; :meth:`Source.rows` maps just one window of rows at a time.

Writing lives in :mod:`kldiv._npy_writer`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._convert import as_pred_array, host_numpy
from ._namespace import dtype_kind, is_array

__all__ = [
    "DataFileError",
    "DataTypeError",
    "PathLike",
    "Source",
    "as_path",
    "host_ready",
    "open_source",
    "to_host",
]

PathLike = str | os.PathLike[str]


class DataFileError(ValueError):
    """A data file that cannot be used: missing, not ``.npy``, not numeric, or shapes that do not fit."""


class DataTypeError(DataFileError, TypeError):
    """An input (a file or an array) whose dtype is not real numeric: a :class:`DataFileError`
    that is also the ``TypeError`` the loss raises for such arrays (complex, strings, objects)."""


def as_path(value: Any, name: str) -> str:
    """``value`` (a ``str``, ``bytes`` or ``os.PathLike`` path) as a ``str``; else a
    ``TypeError`` naming the argument ``name``."""
    if isinstance(value, (str, bytes, os.PathLike)):
        path = os.fspath(value)
        return os.fsdecode(path) if isinstance(path, bytes) else path
    raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__} {value!r:.60}.")


# --------------------------------------------------------------------------------------
# Host-side conversion: byte order and dtypes the target library lacks
# --------------------------------------------------------------------------------------


def host_ready(a: np.ndarray, supported: Callable[[np.dtype[Any]], bool] | None = None) -> np.ndarray:
    """``a`` in the machine's byte order and in a dtype the target library supports.

    ``.npy`` files (and FITS data) may be big-endian, which torch, JAX, array-api-strict and
    TensorFlow refuse; some libraries lack a dtype (array-api-strict has no float16, a
    device may have no float64). Converting here, on the host, before the data moves, gives
    the target exactly the values of the file. An unsupported dtype becomes float32 (float64
    for 8-byte integers where the target has it): every value is cast to a floating dtype
    by the loss anyway. Returns ``a`` itself when nothing needs to change.
    """
    dtype = a.dtype
    target = dtype if dtype.isnative else dtype.newbyteorder("=")
    if supported is not None and not supported(target):
        candidates: list[np.dtype[Any]] = [np.dtype(np.float32), np.dtype(np.float64)]
        if target.itemsize >= 8:  # 8-byte integers: float64 first, where there is one
            candidates.reverse()
        for candidate in candidates:
            if supported(candidate):
                target = candidate
                break
        else:
            raise TypeError(f"the target library supports neither {dtype} nor float32/float64.")
    return a if target == dtype else a.astype(target)


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """An input: an ``.npy`` file (read by row windows) or an in-memory array."""

    label: str
    shape: tuple[int, ...]
    dtype: Any  # np.dtype for files and NumPy arrays; the library's dtype otherwise
    kind: str  # "float", "int", "bool", ...
    itemsize: int
    path: str | None = None  # None: in memory (``array``)
    offset: int = 0
    fortran: bool = False
    array: Any = None

    @property
    def name(self) -> str:
        return self.label if self.path is None else f"{self.label} file {self.path!r}"

    def rows(self, start: int, stop: int) -> Any:
        """Rows ``start:stop``: a NumPy array (a fresh mapping of just those rows) for a file,
        a slice in the array's own library for an in-memory input."""
        if self.path is None:
            return self.array[start:stop, ...]  # a full index: array-API arrays need one
        if self.fortran:
            full = np.load(self.path, mmap_mode="r")
            return np.array(full[start:stop])
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.itemsize
        n = stop - start
        if n == 0 or row_bytes == 0:
            return np.empty((n, *self.shape[1:]), dtype=self.dtype)
        window = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + start * row_bytes,
                           shape=(n, *self.shape[1:]))
        return np.asarray(window)

    def whole(self) -> Any:
        if self.path is None:
            return self.array
        return np.asarray(np.load(self.path, mmap_mode="r"))


def _itemsize(dtype: Any) -> int:
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    try:
        return int(np.dtype(str(dtype).rsplit(".", 1)[-1]).itemsize)
    except TypeError:
        return 4


def open_source(x: Any, label: str) -> Source:
    """Validate an input given as a ``.npy`` path or an array; never reads the data."""
    if isinstance(x, (str, bytes, os.PathLike)):
        return _open_file(as_path(x, label), label)
    if x is None:
        raise TypeError(f"{label} must be a .npy path or an array, not None.")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{label} is a masked array, which evaluate_files cannot read by rows without "
                        "dropping the mask: pass a.filled(...) or a.compressed(), or use the loss class.")
    if isinstance(x, np.ndarray) and type(x) not in (np.ndarray, np.memmap):
        x = np.asarray(x)  # np.matrix and other subclasses: plain rows
    if not is_array(x):
        try:
            x = as_pred_array(x) if label == "y_pred" else np.asarray(x)
        except ValueError as exc:  # (as_pred_array raises its own TypeError)
            raise TypeError(f"{label} could not be converted to an array: {exc}") from None
        if isinstance(x, np.generic):
            x = np.asarray(x)
    kind = dtype_kind(x.dtype)
    name = label
    if kind == "complex":
        raise DataTypeError(f"{name} has complex dtype {x.dtype}; KL divergence needs real values.")
    if kind not in ("float", "int", "bool"):
        raise DataTypeError(f"{name} has dtype {x.dtype}, which is not numeric.")
    shape = tuple(int(d) for d in x.shape)
    return Source(label, shape, x.dtype, kind, _itemsize(x.dtype), array=x)


def _stored_dtype(path: str) -> np.dtype[Any] | None:
    """The dtype a ``.npy`` file's header declares, ``None`` if the header cannot be read."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            return read(f)[2]
    except Exception:  # any unreadable header: no dtype to report
        return None


def _open_file(path: str, label: str) -> Source:
    name = f"{label} file {path!r}"
    if not os.path.exists(path):
        raise DataFileError(f"{name} does not exist.")
    if os.path.isdir(path):
        raise DataFileError(f"{name} is a directory, not a .npy file.")
    try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        stored = _stored_dtype(path)
        if stored is not None and stored.hasobject:  # what np.load cannot map: Python objects
            raise DataTypeError(f"{name} has dtype {stored} (Python objects), which is not numeric.") from None
        msg = str(exc).splitlines()[0]
        if "pickle" in msg:
            msg = "not a .npy file (or one holding Python objects)"
        raise DataFileError(f"{name} cannot be read as a .npy array: {msg}") from None
    except (OSError, EOFError) as exc:
        raise DataFileError(f"{name} cannot be read as a .npy array: {exc}") from None
    if not isinstance(mm, np.ndarray):  # an .npz archive
        close = getattr(mm, "close", None)
        if close is not None:
            close()
        raise DataFileError(f"{name} is an .npz archive; save each array with numpy.save.")
    shape, dtype = tuple(mm.shape), mm.dtype
    offset = int(getattr(mm, "offset", 0))
    fortran = bool(mm.flags.f_contiguous and not mm.flags.c_contiguous)
    del mm
    if dtype.kind == "c":
        raise DataTypeError(f"{name} has complex dtype {dtype}; KL divergence needs real values.")
    if dtype.kind not in "biuf":
        raise DataTypeError(f"{name} has dtype {dtype}, which is not numeric.")
    kind = {"b": "bool", "f": "float"}.get(dtype.kind, "int")
    return Source(label, shape, dtype, kind, dtype.itemsize, path=path, offset=offset, fortran=fortran)


def to_host(x: Any) -> np.ndarray:
    """Any array (of any library) as a NumPy array on the host."""
    return x if isinstance(x, np.ndarray) else host_numpy(x)
