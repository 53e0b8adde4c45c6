"""Writing ``.npy`` files for the streaming helpers, safely.

:class:`NpyWriter` writes a ``.npy`` file batch after batch, in bounded memory, into a
temporary file beside the target, and renames it into place only when every batch is
written (:meth:`NpyWriter.commit`). A run that fails or is interrupted removes the temporary
file and leaves whatever stood at the target untouched. :func:`check_output` refuses, before
anything is written, a target that is a directory, not a regular file, or the same file as an
input (also through a symbolic or hard link). Reading lives in :mod:`kldiv._npyio`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from ._npyio import PathLike, as_path

__all__ = ["NpyWriter", "backing_file", "check_output", "refuse_input"]


def backing_file(x: Any) -> str | None:
    """The file a NumPy array is memory-mapped from (``np.load(..., mmap_mode=...)``), if any."""
    seen = 0
    while isinstance(x, np.ndarray) and seen < 32:
        filename = getattr(x, "filename", None) if isinstance(x, np.memmap) else None
        if filename:
            return os.fspath(filename)
        x, seen = x.base, seen + 1
    return None


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_input(out: PathLike, target: str, what: str, path: str | None) -> None:
    """Raise ``ValueError`` if ``path`` (an input) is the same file as ``target`` (the output)."""
    if path is not None and _same_file(target, path):
        raise ValueError(f"out={as_path(out, 'out')!r} is the same file as {what} {path!r}: writing it "
                         "would overwrite an input. Choose another output path.")


def check_output(out: PathLike, inputs: Iterable[tuple[str, str]] = ()) -> str:
    """Validate the output path before anything is read or written; return the file to write.

    ``inputs`` are ``(description, path)`` pairs. A symbolic link is followed: the file it
    names is the one replaced (the link stays). Raises ``ValueError`` for a directory, an
    existing path that is not a regular file (a device, a FIFO), a missing parent directory,
    or a path that is the same file as an input (the same path, a symbolic or a hard link).
    """
    shown = as_path(out, "out")
    target = os.path.realpath(shown)
    for what, path in inputs:
        refuse_input(out, target, what, path)
    if os.path.isdir(target):
        raise ValueError(f"out={shown!r} is a directory; give a file path such as "
                         f"{os.path.join(shown, 'loss.npy')!r}.")
    if os.path.lexists(target) and not stat.S_ISREG(os.stat(target).st_mode):
        raise ValueError(f"out={shown!r} exists and is not a regular file; it is not replaced.")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ValueError(f"out={shown!r}: directory {parent!r} does not exist.")
    return target


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header NumPy writes for ``dtype`` and ``shape`` (format 1.0, else 2.0)."""
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # more than 64 KiB of header
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


class NpyWriter:
    """Write a ``.npy`` file batch after batch (the leading axis grows), in bounded memory.

    Everything goes to a temporary file in the target's directory (created on construction);
    :meth:`commit` completes the header, flushes the data to disk and renames the temporary
    file over the target; :meth:`abort` (or leaving a ``with`` block by an exception)
    removes it. The target is never opened for writing, so a failure at any point leaves a
    file that was there untouched. The header is NumPy's own (``numpy.lib.format``).
    """

    def __init__(self, path: PathLike, inputs: Iterable[tuple[str, str]] = ()) -> None:
        self.shown = as_path(path, "out")
        self.path = check_output(path, inputs)
        self._tmp: str | None = None
        self._f: Any = None
        self._rows = 0
        self._rest: tuple[int, ...] | None = None
        self._dtype: np.dtype[Any] | None = None
        self._scalar = False
        self._header_len = 0
        directory, base = os.path.split(self.path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part", dir=directory)
        except OSError as exc:
            raise ValueError(f"cannot write out={self.shown!r}: {exc.strerror or exc}") from None
        self._tmp = tmp
        try:
            self._f = os.fdopen(fd, "w+b")
        except BaseException:
            os.close(fd)
            self.abort()
            raise

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None or self._tmp is not None:
            self.abort()

    def write(self, arr: Any) -> None:
        """Append a batch of per-sample losses (along the first axis)."""
        arr = np.asarray(arr)
        if arr.dtype.kind != "f" or arr.dtype.itemsize < 2:
            arr = arr.astype(np.float32)  # bfloat16 and friends: .npy has no such dtype
        if self._dtype is None:
            self._dtype = np.dtype(arr.dtype).newbyteorder("=")
            self._scalar = arr.ndim == 0
            self._rest = tuple(arr.shape[1:])
            head = _header(self._dtype, () if self._scalar else (0, *self._rest))
            self._f.write(head)
            self._header_len = len(head)
        elif self._scalar or arr.ndim == 0 or tuple(arr.shape[1:]) != self._rest:
            raise ValueError("per-sample losses of the batches do not stack along the first axis: "
                             f"{(() if self._scalar else ('N', *(self._rest or ())))} then {arr.shape}.")
        else:
            wide = np.result_type(self._dtype, arr.dtype).newbyteorder("=")
            if wide != self._dtype:  # batches of several dtypes: their concatenation's, as in memory
                self._widen(wide)
        arr = np.ascontiguousarray(arr, dtype=self._dtype)
        if arr.size:
            self._f.write(arr.data)
        self._rows += 1 if arr.ndim == 0 else arr.shape[0]

    def _shape(self) -> tuple[int, ...]:
        return () if self._scalar else (self._rows, *(self._rest or ()))

    def commit(self) -> str:
        """Complete the file and move it into place; return the path written."""
        if self._tmp is None:
            raise ValueError("this writer was already committed or aborted.")
        try:
            dtype = self._dtype if self._dtype is not None else np.dtype(np.float32)
            head = _header(dtype, self._shape())
            if self._dtype is None:  # no batch at all: an empty (0,) array
                self._f.write(head)
            elif len(head) == self._header_len:
                self._f.seek(0)
                self._f.write(head)
            else:  # a NumPy without room for growth in its headers: copy behind a new header
                self._rewrite(head, self._dtype)
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            try:
                mode = stat.S_IMODE(os.stat(self.path).st_mode)  # the replaced file's permissions
            except FileNotFoundError:
                mode = 0o666 & ~_umask()  # a new file's usual permissions (mkstemp gives 0o600)
            os.chmod(self._tmp, mode)
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        _fsync_directory(os.path.dirname(self.path))
        return self.path

    def _widen(self, dtype: np.dtype[Any]) -> None:
        """Convert what is written so far to ``dtype`` (a later batch of a wider dtype)."""
        head = _header(dtype, (0, *(self._rest or ())))
        self._rewrite(head, dtype)
        self._dtype, self._header_len = dtype, len(head)

    def _rewrite(self, head: bytes, dtype: np.dtype[Any]) -> None:
        """Copy the data written so far behind ``head`` into a new temporary file, converted
        to ``dtype`` (from :attr:`_dtype`) if it differs."""
        assert self._tmp is not None and self._dtype is not None
        old_dtype = self._dtype
        row_items = int(np.prod(self._rest or (), dtype=np.int64))
        chunk_rows = max(1, 2**20 // max(row_items * old_dtype.itemsize, 1))
        directory, base = os.path.split(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part", dir=directory)
        old, old_path = self._f, self._tmp
        try:
            new = os.fdopen(fd, "w+b")
        except BaseException:
            os.close(fd)
            os.remove(tmp)
            raise
        self._f, self._tmp = new, tmp  # from here on, abort() removes the new one ...
        try:
            new.write(head)
            old.seek(self._header_len)
            if dtype == old_dtype:
                shutil.copyfileobj(old, new, 2**20)
            else:
                left = self._rows * row_items
                while left > 0:
                    n = min(left, chunk_rows * row_items)
                    chunk = np.frombuffer(old.read(n * old_dtype.itemsize), dtype=old_dtype)
                    new.write(chunk.astype(dtype).tobytes())
                    left -= n
        finally:
            old.close()
            with contextlib.suppress(OSError):  # ... and this removes the old one
                os.remove(old_path)

    def abort(self) -> None:
        """Close and remove the temporary file; the target is left as it was. Idempotent."""
        f, tmp = self._f, self._tmp
        self._tmp = None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    if sys.platform.startswith("win"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
