"""The loss or the metric over ``.npy`` files (or whole arrays), batch by batch: :func:`evaluate_files`.

Reads two ``.npy`` files window by window (each window memory-mapped, then unmapped), moves
each batch to the chosen backend and device and streams the batches through
:func:`kldiv._stream.run_batches`, so memory stays bounded by a few batches whatever the
file size. With ``backend="dask"`` the files become lazy Dask arrays read block by block on
the workers instead. ``python -m kldiv compute`` is the command-line face of
:func:`evaluate_files`. Which inputs are read by rows is :func:`kldiv._stream_checks.layout`'s
answer; reading and writing ``.npy`` files lives in :mod:`kldiv._npyio`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from ._libraries import BACKENDS, WrongDevice, backend_name, library, target
from ._metric_base import DivergenceMetric
from ._namespace import array_namespace, namespace_name
from ._npy_writer import NpyWriter, backing_file, check_output
from ._npyio import DataFileError, DataTypeError, PathLike, Source, open_source
from ._reduction import Reduction
from ._stream import STREAMING_NOTES, run_batches
from ._stream_checks import check_options, check_shapes, data_less, layout
from .losses import KLDivergence as _Loss

__all__ = ["BACKENDS", "DataFileError", "evaluate_files"]

_BATCH_BYTES = 64 * 2**20  # default batch: about 64 MiB of the widest input


# --------------------------------------------------------------------------------------
# Dask: inputs are lazy arrays read on the workers (the table's file_input); a per-sample
# loss is stored block by block
# --------------------------------------------------------------------------------------


def _store_blocks(loss: Any, out: PathLike, inputs: list[tuple[str, str]]) -> np.ndarray:
    """Compute a lazy Dask per-sample loss block by block into a ``.npy`` file."""
    with NpyWriter(out, inputs) as writer:
        for block in loss.to_delayed().ravel():
            writer.write(np.asarray(block.compute()))
        path = writer.commit()
    return np.load(path, mmap_mode="r")


def _computable_in_place(x: Any, name: str, device: str | None) -> bool:
    """Whether an array without values (:func:`kldiv._stream_checks.data_less`) is computed where it
    is: ``backend`` is its own library, and for a ``meta`` tensor, ``device`` is ``"meta"``."""
    if namespace_name(array_namespace(x)) != name:
        return False
    return not getattr(x, "is_meta", False) or device == "meta"


def _check_holds_values(move: Any, name: str, device: str | None, sources: list[Source | None]) -> None:
    """Raise if ``device`` keeps no values (torch's ``meta``: shapes only) while an input has
    values: they would be dropped on the way, and the result be a shape without a value
    (or, on the host, torch's "Cannot copy out of meta tensor"). Bad input, not a missing
    device: a ``WrongDevice`` (a ``ValueError``)."""
    what = data_less(move(np.zeros((1,), dtype=np.float32)))
    if what is None:
        return
    with_values = [s.label + (" file" if s.path is not None else "") for s in sources
                   if s is not None and data_less(s.array) is None]
    if with_values:
        raise WrongDevice(
            f"device {device!r} of backend {name!r} holds no values: an array there is {what}. "
            f"The values of {' and '.join(with_values)} cannot be computed there; choose a device "
            "that holds data (such as 'cpu' or 'cuda')."
        )


# --------------------------------------------------------------------------------------
# evaluate_files
# --------------------------------------------------------------------------------------


def evaluate_files(
    y_true: PathLike | Any,
    y_pred: PathLike | Any,
    *,
    sample_weight: PathLike | Any = None,
    reduction: str | None = "auto",
    metric: DivergenceMetric | bool | None = None,
    backend: str = "numpy",
    device: str | None = None,
    batch_rows: int | None = None,
    out: PathLike | None = None,
    progress: bool | str | None = False,
) -> Any:
    """The KL divergence loss (or metric) over two ``.npy`` files, batch by batch.

    Reads ``batch_rows`` rows of each file at a time, each window memory-mapped and
    unmapped after use, moves them to ``backend`` on ``device`` and accumulates there (see
    :func:`evaluate_batches`): memory stays bounded by a few batches, whatever the files'
    size. The result is what ``kldiv.KLDivergence(reduction)`` (or the metric) gives on the
    whole arrays, with the class' rank rules (a ``(N, 1)`` ``y_true`` against a ``(N,)``
    ``y_pred`` is one sample of ``N`` classes) and Keras 2's ``sample_weight`` rules.

    Parameters
    ----------
    y_true, y_pred : str, path or array
        ``.npy`` files of real numeric dtype, in either byte order, or in-memory arrays
        (NumPy arrays and memory maps, lists, torch, JAX, CuPy, Dask, array-API arrays:
        read by rows in their own library, then moved to ``backend``). Batches are rows of
        the per-sample loss' first axis; an input with a single row, or with fewer axes
        (a 0-d one included, as in the loss class), broadcasts and is read whole.
    sample_weight : str, path, array or float, optional
        Per-sample weights (Keras 2 rules), a ``.npy`` path, an array or a number; read by
        rows too when it has one weight per row.
    reduction : str or None, default "auto"
        As for :class:`kldiv.KLDivergence`. ``"none"`` returns the per-sample losses; give
        ``out`` to write them to a ``.npy`` file in bounded memory instead.
    metric : bool or kldiv.metrics.KLDivergence, optional
        Return the metric's result (the weighted mean) instead; an instance is updated in
        place.
    backend : str, default "numpy"
        One of ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``, ``"dask"``,
        ``"array_api_strict"``, ``"tensorflow"``. With ``"dask"`` the files become lazy
        Dask arrays (only the paths travel to the workers, which must see the same files)
        and the result is returned lazy: call ``.compute()`` (on a ``dask.distributed``
        client if you like). Data is converted on the host, before it moves, to the
        machine's byte order and to a dtype the backend has on the device (float16 files
        become float32 on array-api-strict, float64 ones float32 on a device without
        float64); the result then has that dtype.
    device : str, optional
        The device, in the backend's words: ``"cuda"``, ``"cuda:1"`` (torch, CuPy),
        ``"gpu"`` / ``"cpu"`` (JAX, TensorFlow), ``"no_float64"`` (array-api-strict) ...
        Default: the backend's default device.
    batch_rows : int, optional
        Rows per batch (per Dask chunk), any integer type. Default: about 64 MiB of the
        widest input.
    out : str or path, optional
        With ``reduction="none"``: the ``.npy`` file to write the per-sample losses to,
        returned memory-mapped. Written to a temporary file beside it and renamed into
        place only on success, so a failed or interrupted run leaves an existing file
        untouched. Must not be an input (nor a link to one).
    progress : bool, "tqdm", "rich" or None, default False
        A progress bar on stderr (in rows); ``None``: when stderr is a terminal. Not used
        with ``backend="dask"`` (use Dask's own progress bar or dashboard).

    Returns
    -------
    scalar or array
        As :func:`evaluate_batches`: a reduced result is a NumPy scalar of ``y_pred``'s
        floating dtype on the ``"numpy"`` backend (``np.float32`` for float32 and integer
        data; the metric's dtype with ``metric``) and a 0-d array of the backend on the
        device otherwise (lazy with ``"dask"``); ``reduction="none"`` gives the per-sample
        losses (an ``ndarray`` on NumPy) or the ``out`` file as a read-only ``numpy.memmap``.

    Raises
    ------
    DataFileError
        (a ``ValueError``, also ``kldiv.DataFileError``) If a file is missing, not a
        ``.npy`` array, not real numeric, or the shapes do not fit. An input (file or array)
        of a complex, string, object or other non-numeric dtype raises a ``DataFileError``
        that is also a ``TypeError``, as the loss class raises for such arrays.
    ValueError
        If an option is invalid, or ``out`` is an input (or a link to one), a directory,
        not a regular file, or in a missing or unwritable directory, or ``device`` holds no
        values (torch's ``"meta"``) while an input has values.
    TypeError
        If ``batch_rows`` is not an integer (a bool, a float), an input is ``None`` or not
        an array (or a masked array, whose mask would be lost), or ``out`` is not a path.
    ImportError
        If ``backend`` is not installed.
    RuntimeError
        If ``device`` is not available.

{notes}
    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import kldiv
    >>> d = tempfile.mkdtemp()
    >>> np.save(os.path.join(d, "t.npy"), np.array([[0, 1], [0, 0]], dtype=np.float32))
    >>> np.save(os.path.join(d, "p.npy"), np.array([[.6, .4], [.4, .6]], dtype=np.float32))
    >>> loss = kldiv.evaluate_files(os.path.join(d, "t.npy"), os.path.join(d, "p.npy"), batch_rows=1)
    >>> print(loss, type(loss).__name__)
    0.45814306 float32
    >>> print(kldiv.evaluate_files(os.path.join(d, "t.npy"), os.path.join(d, "p.npy"),
    ...                            sample_weight=[1, 0], metric=True, batch_rows=1))
    0.9162892
    >>> import shutil
    >>> shutil.rmtree(d)
    """
    the_metric, red, batch_rows, progress = check_options(
        metric=metric, reduction=reduction, out=out, progress=progress, rows=("batch_rows", batch_rows, 1))
    name = backend_name(backend)
    sources = [open_source(y_true, "y_true"), open_source(y_pred, "y_pred")]
    weight = None
    scalar_weight = None
    if isinstance(sample_weight, (int, float)) and not isinstance(sample_weight, bool):
        scalar_weight = sample_weight
    elif sample_weight is not None:
        weight = open_source(sample_weight, "sample_weight")
    all_sources = [*sources, weight]
    for s in all_sources:  # an array without values cannot move to another library or device
        what = None if s is None else data_less(s.array)
        if what is not None and s is not None and not _computable_in_place(s.array, name, device):
            where = f"backend={name!r}" + (f", device={device!r}" if device else "")
            raise DataTypeError(f"{s.label} is {what}: it cannot be moved to {where}. Pass data, "
                                "or compute in its own library and on its own device.")
    # (what, path): messages show the path once, after the description
    inputs = [(f"{s.label} file" if s.path is not None else s.label,
               s.path if s.path is not None else backing_file(s.array))
              for s in all_sources if s is not None]
    file_inputs = [(what, path) for what, path in inputs if path is not None]
    if out is not None:
        check_output(out, file_inputs)  # before anything is read or written
    plan = layout(sources, weight)
    check_shapes(sources, weight, scalar_weight, plan)
    move = target(name, device)
    _check_holds_values(move, name, device, all_sources)
    n = plan.n_rows
    if batch_rows is None:
        widest = max(int(np.prod(s.shape[1:], dtype=np.int64)) * s.itemsize for s in sources)
        batch_rows = max(1, _BATCH_BYTES // max(widest, 1))
    rows = batch_rows

    if library(name).lazy:  # Dask: lazy arrays, read on the workers
        lib = library(name)

        def lazy(s: Source | None, sliced: bool) -> Any:
            return sample_weight if s is None else lib.file_input(s, sliced, rows)

        yt, yp, sw = (lazy(s, sl) for s, sl in zip(all_sources, plan.sliced, strict=True))
        if the_metric is not None:
            the_metric.update_state(yt, yp, sw)
            return the_metric.result()
        if red == Reduction.NONE and out is not None:
            return _store_blocks(_Loss(reduction=Reduction.NONE)(yt, yp, sample_weight=sw), out, file_inputs)
        return _Loss(reduction=red)(yt, yp, sample_weight=sw)

    count = 1 if n is None else len(range(0, max(n, 1), rows))

    def stream(s: Source | None, sliced: bool) -> Generator[Any, None, None]:
        if s is None:  # a number, or no weight (then unused)
            for _ in range(count):
                yield sample_weight
            return
        if n is None or not sliced:
            whole = move(s.whole())  # moved once, used by every batch
            for _ in range(count):
                yield whole
            return
        for start in range(0, max(n, 1), rows):
            yield move(s.rows(start, min(start + rows, n)))

    streams: list[Generator[Any, None, None]] = [
        stream(s, sl) for s, sl in zip(all_sources, plan.sliced, strict=True)
    ]
    try:
        return run_batches(zip(*streams, strict=True), red=red, the_metric=the_metric, out=out,
                           inputs=file_inputs, progress=progress, total_rows=n)
    finally:
        for gen in streams:  # release what they hold (whole inputs, mapped windows) now
            gen.close()


evaluate_files.__doc__ = (evaluate_files.__doc__ or "").replace("{notes}\n", STREAMING_NOTES)
