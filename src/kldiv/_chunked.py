"""The loss or the metric over data that does not fit one call: batches, and ``.npy`` files.

:func:`evaluate_batches` streams two iterables of batches (any library, any device) through
one accumulator; :func:`evaluate_files` reads two ``.npy`` files window by window (each
window memory-mapped, then unmapped), so memory stays bounded by a few batches whatever the
file size. Both give what the loss class (or the metric) would give on the whole data, but
accumulated in float64 where the library has it (float32 with compensated summation
elsewhere). ``python -m kldiv compute`` is the command-line face of :func:`evaluate_files`.

Reading and writing ``.npy`` files lives in :mod:`kldiv._npyio`, progress bars in
:mod:`kldiv._progress`.
"""

from __future__ import annotations

import contextlib
import operator
import os
import sys
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import numpy as np

from ._functional import _shape_str
from ._metric_base import DivergenceMetric
from ._namespace import array_namespace, as_pred_array, device_scope, get_device, is_array, is_dask
from ._npyio import (
    DataFileError,
    NpyWriter,
    Source,
    backing_file,
    check_output,
    host_ready,
    open_source,
    refuse_input,
    to_host,
)
from ._progress import check_progress, progress_bar
from ._reduction import Reduction, validate_reduction
from ._targets import BACKENDS, backend_name, target
from .losses import KLDivergence as _Loss
from .metrics import (
    BatchSums,
    KLDivergence,
    RunningSum,
    _qualified,
    batch_sums,
    check_same_place,
    safe_divide,
)

__all__ = ["BACKENDS", "DataFileError", "evaluate_batches", "evaluate_files"]

PathLike = str | os.PathLike[str]

_BATCH_BYTES = 64 * 2**20  # default batch: about 64 MiB of the widest input

# Names kept for code that reached into this module before it was split.
_Source = Source
_NpyWriter = NpyWriter


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _count(value: Any, name: str, *, minimum: int) -> int:
    """``value`` as an int (any integral type: ``np.int64``, a 0-d integer tensor ...).

    Refuses bools, floats and strings (``TypeError``) and values below ``minimum``
    (``ValueError``).
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, not a bool ({value!r}).")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).") from None
    if n < minimum:
        which = "a positive integer" if minimum == 1 else f"an integer >= {minimum} (non-negative)"
        raise ValueError(f"{name} must be {which}, got {n}.")
    return n


def _rows_of(x: Any) -> int:
    shape = getattr(x, "shape", None)
    if shape is None:
        shape = np.shape(x)
    if len(shape) < 2 or shape[0] is None or shape[0] != shape[0]:
        return 1
    return int(shape[0])


def _wait(x: Any) -> None:
    """Block until ``x`` is computed, for libraries that dispatch asynchronously (JAX)."""
    ready = getattr(x, "block_until_ready", None)
    if ready is not None:
        ready()


def _numpy_result(x: Any, *, reduced: bool) -> Any:
    """The project's return rule: on NumPy a reduced result is a NumPy scalar of the result
    dtype, an unreduced one an ndarray; other libraries keep their (0-d) arrays."""
    if reduced and type(x) is np.ndarray and x.ndim == 0:
        return x[()]
    if not reduced and isinstance(x, np.generic):
        return np.asarray(x)
    return x


def _class_ranks(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    """The loss class' rank rule (Keras 2's ``squeeze_or_expand_dimensions``), per batch.

    Ranks differing by one with a trailing axis of 1 on the larger: that axis is squeezed,
    so a ``(N, 1)`` ``y_true`` against a ``(N,)`` ``y_pred`` is one sample of ``N`` classes,
    whether the arrays come whole or in batches.
    """
    if not is_array(y_pred):
        y_pred = as_pred_array(y_pred)  # Python floats: Keras' floatx, as in the loss
    ts = np.shape(y_true) if not hasattr(y_true, "shape") else tuple(y_true.shape)
    ps = tuple(y_pred.shape)
    if len(ts) == len(ps) + 1 and ts[-1] == 1:
        y_true = _drop_last(y_true)
    elif len(ps) == len(ts) + 1 and ps[-1] == 1:
        y_pred = _drop_last(y_pred)
    return y_true, y_pred


def _drop_last(x: Any) -> Any:
    if not is_array(x):
        x = np.asarray(x)
    return array_namespace(x).reshape(x, tuple(x.shape[:-1]))


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-sample losses along the first axis, in their library and device."""
    xp = array_namespace(parts[0])
    concat = getattr(xp, "concat", None)
    scope = device_scope(xp, get_device(parts[0]))
    with scope if scope is not None else contextlib.nullcontext():
        if concat is None:  # kldiv's TensorFlow shim: TensorFlow's own
            return sys.modules["tensorflow"].concat(parts, axis=0)
        return concat(parts, axis=0)


# --------------------------------------------------------------------------------------
# The accumulator behind both helpers
# --------------------------------------------------------------------------------------


class _Accumulator:
    """Running sum(w * loss), number of per-sample losses and sum(w), in one library/device."""

    def __init__(self) -> None:
        self.total: RunningSum | None = None
        self.n: RunningSum | None = None
        self.wsum: RunningSum | None = None
        self.out_dtype: Any = None

    def add(self, sums: BatchSums) -> None:
        xp, total = sums.xp, sums.weighted_sum
        n = sums.n if hasattr(sums.n, "shape") else xp.zeros_like(total) + sums.n
        w = sums.weight_sum
        if self.total is None or self.n is None:
            compensated = total.dtype != xp.float64
            self.total, self.n = RunningSum(total, compensated), RunningSum(n, compensated)
            self.out_dtype = sums.out_dtype
        else:
            check_same_place(self.total.value, total, what="a batch", owner="evaluate_batches")
            self.total.add(total)
            self.n.add(n)
        if w is not None:
            if self.wsum is None:
                self.wsum = RunningSum(w, total.dtype != xp.float64)
            else:
                self.wsum.add(w)

    def result(self, reduction: str) -> Any:
        if self.total is None or self.n is None:
            return np.float32(0.0)  # no batch at all: the loss of an empty batch
        total = self.total.total()
        xp = array_namespace(total)
        if reduction == Reduction.SUM:
            out = total
        elif reduction == Reduction.MEAN_WITH_SAMPLE_WEIGHT and self.wsum is not None:
            out = safe_divide(xp, total, self.wsum.total())
        else:  # auto, sum_over_batch_size, mean: divide by the number of per-sample losses
            out = safe_divide(xp, total, self.n.total())
        return out if out.dtype == self.out_dtype else xp.astype(out, self.out_dtype)


def _zip_batches(
    y_true: Iterable[Any], y_pred: Iterable[Any], weights: Iterable[Any] | None
) -> Iterator[tuple[Any, Any, Any]]:
    missing = object()
    streams: list[Iterable[Any]] = [y_true, y_pred] + ([weights] if weights is not None else [])
    for i, items in enumerate(zip_longest(*streams, fillvalue=missing)):
        if any(item is missing for item in items):
            names = ["y_true", "y_pred", "sample_weight"]
            short = [names[k] for k, item in enumerate(items) if item is missing]
            raise ValueError(f"the batch iterables differ in length: {', '.join(short)} ended "
                             f"after {i} batches, the others did not.")
        yield items[0], items[1], (items[2] if weights is not None else None)


def _resolve_metric(
    metric: DivergenceMetric | bool | None, reduction: str | None
) -> DivergenceMetric | None:
    if isinstance(metric, np.bool_):
        metric = bool(metric)
    if metric is None or metric is False:
        return None
    if reduction not in ("auto", Reduction.AUTO):
        raise ValueError("pass either metric= or reduction=, not both: the metric is a weighted mean.")
    if metric is True:
        return KLDivergence()
    if not isinstance(metric, DivergenceMetric):
        raise TypeError(
            "metric must be True or a divergence metric of kldiv.metrics (KLDivergence, "
            f"ReverseKLDivergence, JensenShannonDivergence), got {_qualified(type(metric))}."
        )
    return metric


def _evaluate(
    batches: Iterable[tuple[Any, Any, Any]],
    *,
    red: str,
    the_metric: DivergenceMetric | None,
    out: PathLike | None,
    inputs: list[tuple[str, str]],
    progress: bool | str | None,
    total_rows: int | None,
) -> Any:
    """The loop behind both helpers. ``batches`` yields ``(y_true, y_pred, sample_weight)``."""
    acc = _Accumulator()
    parts: list[Any] = []
    pending: Any = None
    written: str | None = None
    yt: Any
    yp: Any
    sw: Any
    with contextlib.ExitStack() as stack:
        # Everything that can fail before the first batch (the bar's library, the output's
        # directory) fails here, before anything is written; the writer only ever writes a
        # temporary file beside the target, removed on any failure (the ExitStack).
        bar = progress_bar(progress, total_rows, "kldiv")
        stack.callback(bar.close)
        writer = stack.enter_context(NpyWriter(out, inputs)) if out is not None else None
        yt = yp = sw = loss = done = sums = None
        try:
            for yt, yp, sw in batches:
                if writer is not None:
                    for what, x in (("a y_true batch", yt), ("a y_pred batch", yp), ("a sample_weight batch", sw)):
                        refuse_input(writer.shown, writer.path, what, backing_file(x))
                rows = _rows_of(yp) if _rows_of(yp) > 1 else _rows_of(yt)
                yt, yp = _class_ranks(yt, yp)
                if the_metric is not None:
                    the_metric.update_state(yt, yp, sw)
                    done = the_metric._total.value if the_metric._total is not None else None
                elif red == Reduction.NONE:
                    loss = _Loss(reduction=Reduction.NONE)(yt, yp, sample_weight=sw)
                    if parts:
                        check_same_place(parts[0], loss, what="a batch", owner="evaluate_batches")
                    if writer is not None:
                        writer.write(to_host(loss))
                        parts[:1] = [loss]
                    else:
                        parts.append(loss)
                    done = loss
                else:
                    sums = batch_sums(yt, yp, sw)
                    acc.add(sums)
                    done = sums.weighted_sum
                # Bounded memory with asynchronous dispatch (JAX): stay one batch ahead, not more.
                if pending is not None:
                    _wait(pending)
                pending = done
                bar.update(rows)
        except BaseException:
            # Drop this frame's references to the batches before the exception leaves: a
            # traceback kept alive (pytest, a REPL's sys.last_traceback) would otherwise keep
            # memory-mapped windows of the input files, and so their file handles, open.
            yt = yp = sw = loss = done = sums = pending = None
            batches = iter(())  # a zip keeps its last tuple of batches
            parts.clear()
            raise
        if writer is not None:
            written = writer.commit()
    if the_metric is not None:
        return _numpy_result(the_metric.result(), reduced=True)
    if red != Reduction.NONE:
        return _numpy_result(acc.result(red), reduced=True)
    if written is not None:
        return np.load(written, mmap_mode="r")
    if not parts:
        return np.zeros((0,), dtype=np.float32)
    if len(parts) == 1:
        return _numpy_result(parts[0], reduced=False)
    if parts[0].ndim == 0:
        raise ValueError("reduction='none' over several batches needs inputs of at least 2-d.")
    return _numpy_result(_concat(parts), reduced=False)


_STREAMING_NOTES = """\
    Notes
    -----
    **Sums are kept in float64** (where the library has it on the device; else float32 with
    Neumaier compensated summation). Each batch's per-sample losses are computed exactly as
    the loss class computes them (in ``y_pred``'s dtype; in float32 for float16/bfloat16),
    then cast to float64 and weighted there (the sample weights are cast to float64, where
    the class casts them to the loss' dtype) and summed; the batch totals are added in
    float64, the means divided in float64, and the result is rounded once to ``y_pred``'s
    floating dtype. So a reduced result is the exact weighted sum (or mean) of the class'
    per-sample losses, rounded once, up to float64 rounding (about ``N * 2**-53`` of the sum
    of the absolute values, far below float32's resolution): for float32 data it is the
    float32 nearest the exact value except when that value lies within the float64 error of
    a rounding boundary. The loss class, like Keras, weights and sums in float32, with an
    error of up to about ``log2(N) * 2**-24`` relative for NumPy's pairwise summation, so
    for float32 data a ``"sum"`` or a mean can differ from the class' in the last digit or
    two, and the streamed one is never the farther from the exact value. For float64 data
    both are float64 sums and agree to within float64 rounding.

"""


def evaluate_batches(
    y_true_batches: Iterable[Any],
    y_pred_batches: Iterable[Any],
    sample_weight_batches: Iterable[Any] | None = None,
    *,
    reduction: str | None = "auto",
    metric: KLDivergence | bool | None = None,
    out: PathLike | None = None,
    progress: bool | str | None = False,
    total_rows: int | None = None,
    convert: Callable[[Any], Any] | None = None,
) -> Any:
    """The KL divergence loss (or metric) over a stream of batches.

    Gives what ``kldiv.KLDivergence(reduction)`` gives on the concatenation of the batches
    (along their first axis), or, with ``metric``, what a :class:`kldiv.metrics.KLDivergence`
    gives after one ``update_state`` per batch; only one batch is held at a time. Sums are
    kept in float64 where the library has it (see Notes), on the batches' device: nothing is
    read back to the host per batch.

    Parameters
    ----------
    y_true_batches, y_pred_batches : iterable of array_like
        Matching batches (any library; each computed in its ``y_pred``'s library and on its
        device, which must be the same for every batch). The iterables must have the same
        length. The loss class' rank rule applies to each batch: a ``y_true`` of one more
        axis, of size 1, than ``y_pred`` (or the other way round) has that axis squeezed.
    sample_weight_batches : iterable of array_like or float, optional
        One sample weight per batch (Keras 2 rules, as for the loss class).
    reduction : str or None, default "auto"
        ``"auto"`` / ``"sum_over_batch_size"`` / ``"mean"``: the weighted sum over all
        batches divided by the number of per-sample losses; ``"sum"``; ``"mean_with_sample_weight"``;
        ``"none"`` (or ``None``): the weighted per-sample losses, concatenated (in memory),
        or written to ``out``.
    metric : bool or kldiv.metrics.KLDivergence, optional
        ``True``: return the metric's result (the weighted mean) instead of a reduction. A
        metric instance is updated in place (it may already hold state) and its
        ``result()`` is returned.
    out : str or path, optional
        With ``reduction="none"``: write the per-sample losses to this ``.npy`` file, batch
        after batch, and return it memory-mapped (read-only). The file is written to a
        temporary file in the same directory and renamed over ``out`` only once every batch
        is written: if the run fails or is interrupted, a file that was at ``out`` is left
        as it was. A symbolic link is followed (the file it names is replaced).
    progress : bool, "tqdm", "rich" or None, default False
        Show a progress bar on stderr (``True``: tqdm, else rich; ``None``: only when stderr
        is a terminal).
    total_rows : int, optional
        The number of rows expected, for the progress bar (any integer type).
    convert : callable, optional
        Applied to every array of every batch first (e.g. move NumPy batches to a device).

    Returns
    -------
    scalar or array
        A reduced result (every reduction but ``"none"``, and ``metric``) in ``y_pred``'s
        floating dtype (the metric's dtype with ``metric``): on NumPy a NumPy scalar
        (``np.float32`` for float32 batches, ``np.float32(0.0)`` when there is no batch at
        all), elsewhere a 0-d array of the batches' library on their device (lazy for Dask).
        With ``reduction="none"``, the per-sample losses: an array of the batches' library
        (an ``ndarray`` on NumPy, ``(0,)`` float32 without batches), or the ``out`` file as a
        read-only ``numpy.memmap``.

    Raises
    ------
    ValueError
        If the iterables differ in length, a batch has bad shapes, ``reduction`` is invalid,
        both ``metric`` and a reduction are given, ``total_rows`` is negative, or ``out`` is
        a directory, not a regular file, in a missing or unwritable directory, or the file
        a batch is memory-mapped from (also through a link).
    TypeError, ValueError
        If batches come from different libraries (``TypeError``) or devices (``ValueError``).

{notes}
    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> rng = np.random.default_rng(0)
    >>> t = rng.dirichlet(np.ones(5), size=1000).astype(np.float32)
    >>> p = rng.dirichlet(np.ones(5), size=1000).astype(np.float32)
    >>> batches = lambda a: (a[i:i + 256] for i in range(0, len(a), 256))
    >>> streamed = kldiv.evaluate_batches(batches(t), batches(p))
    >>> type(streamed)
    <class 'numpy.float32'>
    >>> whole = kldiv.KLDivergence()(t, p)
    >>> bool(np.isclose(streamed, whole, rtol=1e-6))
    True
    >>> m = kldiv.evaluate_batches(batches(t), batches(p), metric=True)
    >>> bool(np.isclose(m, whole, rtol=1e-6))
    True
    """
    the_metric = _resolve_metric(metric, reduction)
    red = validate_reduction(reduction) if the_metric is None else Reduction.AUTO
    if out is not None and red != Reduction.NONE:
        raise ValueError("out= is for reduction='none' (the per-sample losses).")
    if total_rows is not None:
        total_rows = _count(total_rows, "total_rows", minimum=0)
    progress = check_progress(progress)
    if out is not None:
        check_output(out)

    def converted() -> Iterator[tuple[Any, Any, Any]]:
        for yt, yp, sw in _zip_batches(y_true_batches, y_pred_batches, sample_weight_batches):
            if convert is not None:
                yt, yp = convert(yt), convert(yp)
                sw = convert(sw) if sw is not None and not isinstance(sw, (int, float)) else sw
            yield yt, yp, sw

    return _evaluate(converted(), red=red, the_metric=the_metric, out=out, inputs=[],
                     progress=progress, total_rows=total_rows)


evaluate_batches.__doc__ = (evaluate_batches.__doc__ or "").replace("{notes}\n", _STREAMING_NOTES)


# --------------------------------------------------------------------------------------
# evaluate_files: where the rows go, and the target library
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    n_rows: int | None  # None: no batch axis (a single sample): one batch, everything whole
    sliced: tuple[bool, bool, bool]  # per input: read by rows, or whole (it broadcasts)


def _class_shapes(ts: tuple[int, ...], ps: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes after the loss class' rank squeeze (see :func:`_class_ranks`)."""
    if len(ts) == len(ps) + 1 and ts[-1] == 1:
        return ts[:-1], ps
    if len(ps) == len(ts) + 1 and ps[-1] == 1:
        return ts, ps[:-1]
    return ts, ps


def _weight_shape(ws: tuple[int, ...], r: int) -> tuple[int, ...]:
    """A weight's shape after Keras 2's rank rules, against a per-sample loss of rank ``r``."""
    if len(ws) == r + 1 and ws[-1] == 1:
        return ws[:-1]
    if r >= 1 and len(ws) == r - 1:
        return (*ws, 1)
    return ws


def _layout(sources: list[Source], weight: Source | None) -> _Layout:
    """Which inputs are read by rows: those that carry the per-sample loss' first axis.

    Follows the loss class exactly: the rank squeeze of ``y_true``/``y_pred`` first, then
    broadcasting, then Keras 2's weight rules. Inputs of fewer axes (after those rules) or a
    single row broadcast and are read whole; with no batch axis at all (a per-sample loss
    of rank 0) there is a single batch.
    """
    t, p = sources
    ts, ps = _class_shapes(t.shape, p.shape)
    nd = max(len(ts), len(ps))
    if nd == 0:
        raise DataFileError(
            f"{t.name} and {p.name} are both 0-d: the KL divergence needs a class axis "
            "(an input of at least 1-d)."
        )
    r = nd - 1
    if r == 0:
        return _Layout(None, (False, False, False))
    long = {s[0] for s in (ts, ps) if len(s) == nd} - {1}
    if len(long) > 1:
        desc = " and ".join(f"{s.name} of shape {_shape_str(s.shape)}" for s in sources)
        raise DataFileError(f"{desc} do not have the same number of rows.")
    n = long.pop() if long else 1
    sliced_w = False
    if weight is not None and weight.shape:
        wa = _weight_shape(weight.shape, r)
        if len(wa) == r:
            if wa[0] == n:
                sliced_w = True
            elif wa[0] != 1:
                raise DataFileError(
                    f"shapes do not fit: {weight.name} of shape {_shape_str(weight.shape)} has "
                    f"{wa[0]} rows for {n} rows of {t.name} {_shape_str(t.shape)} and "
                    f"{p.name} {_shape_str(p.shape)}."
                )
    return _Layout(n, (len(ts) == nd and ts[0] == n, len(ps) == nd and ps[0] == n, sliced_w))


def _check_shapes(sources: list[Source], weight: Source | None, scalar_weight: Any, layout: _Layout) -> None:
    """Run the loss class on zero-cost stand-ins (shapes only) of the first batch."""
    def standin(s: Source, sliced: bool) -> np.ndarray:
        shape = (min(s.shape[0], 2), *s.shape[1:]) if sliced else s.shape
        return np.broadcast_to(np.zeros((), dtype=np.float32), shape)

    t, p = (standin(s, sl) for s, sl in zip(sources, layout.sliced, strict=False))
    w = standin(weight, layout.sliced[2]) if weight is not None else scalar_weight
    try:
        _Loss(reduction=Reduction.NONE)(t, p, sample_weight=w)
    except (ValueError, TypeError) as exc:
        desc = ", ".join(f"{s.label} {_shape_str(s.shape)}" for s in [*sources, *([weight] if weight else [])])
        raise DataFileError(f"shapes do not fit ({desc}): {exc}") from None


# --------------------------------------------------------------------------------------
# Dask: lazy arrays reading the files on the workers
# --------------------------------------------------------------------------------------


def _read_block(path: str, offset: int, dtype: str, shape: tuple[int, ...], fortran: bool,
                block_info: Any = None) -> np.ndarray:
    """Dask task: read one block of rows of an ``.npy`` file (on whichever worker runs it)."""
    start, stop = block_info[None]["array-location"][0]
    dt = np.dtype(dtype)
    src = Source("", shape, dt, "float", dt.itemsize, path=path, offset=offset, fortran=fortran)
    return host_ready(src.rows(start, stop))


def _dask_input(src: Source, sliced: bool, batch_rows: int) -> Any:
    """A lazy Dask array of ``src``: read by blocks of rows (only the path travels to the
    workers), or whole when it broadcasts; in the machine's byte order."""
    import dask.array as da
    from dask.base import tokenize

    if src.path is None:
        x = src.array
        if not is_dask(x):
            x = da.from_array(host_ready(to_host(x)), chunks=(batch_rows, *src.shape[1:]) if sliced else -1)
        elif not np.dtype(x.dtype).isnative:
            x = x.astype(np.dtype(x.dtype).newbyteorder("="))
        return x
    if not sliced:
        return da.from_array(host_ready(src.whole()), chunks=-1)
    n = src.shape[0]
    native = src.dtype.newbyteorder("=")
    row_chunks = tuple(min(batch_rows, n - i) for i in range(0, n, batch_rows)) or (0,)
    chunks = (row_chunks, *((d,) for d in src.shape[1:]))
    return da.map_blocks(
        _read_block, src.path, src.offset, src.dtype.str, src.shape, src.fortran,
        dtype=native, chunks=chunks, meta=np.empty((0,) * len(src.shape), dtype=native),
        name="kldiv-read-" + tokenize(src.path, os.stat(src.path).st_mtime_ns, src.offset, src.dtype.str,
                                      src.shape, chunks),
    )


def _store_blocks(loss: Any, out: PathLike, inputs: list[tuple[str, str]]) -> np.ndarray:
    """Compute a lazy Dask per-sample loss block by block into a ``.npy`` file."""
    with NpyWriter(out, inputs) as writer:
        for block in loss.to_delayed().ravel():
            writer.write(np.asarray(block.compute()))
        path = writer.commit()
    return np.load(path, mmap_mode="r")


# --------------------------------------------------------------------------------------
# evaluate_files
# --------------------------------------------------------------------------------------


def evaluate_files(
    y_true: PathLike | Any,
    y_pred: PathLike | Any,
    *,
    sample_weight: PathLike | Any = None,
    reduction: str | None = "auto",
    metric: KLDivergence | bool | None = None,
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
        ``.npy`` array, not real numeric, or the shapes do not fit.
    ValueError
        If an option is invalid, or ``out`` is an input (or a link to one), a directory,
        not a regular file, or in a missing or unwritable directory.
    TypeError
        If ``batch_rows`` is not an integer (a bool, a float), or an input is not an array
        (or a masked array, whose mask would be lost).
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
    the_metric = _resolve_metric(metric, reduction)
    red = validate_reduction(reduction) if the_metric is None else Reduction.AUTO
    if out is not None and red != Reduction.NONE:
        raise ValueError("out= is for reduction='none' (the per-sample losses).")
    if batch_rows is not None:
        batch_rows = _count(batch_rows, "batch_rows", minimum=1)
    progress = check_progress(progress)
    name = backend_name(backend)
    sources = [open_source(y_true, "y_true"), open_source(y_pred, "y_pred")]
    weight = None
    scalar_weight = None
    if isinstance(sample_weight, (int, float)) and not isinstance(sample_weight, bool):
        scalar_weight = sample_weight
    elif sample_weight is not None:
        weight = open_source(sample_weight, "sample_weight")
    all_sources = [*sources, weight]
    inputs = [(s.name if s.path is not None else s.label, s.path if s.path is not None else backing_file(s.array))
              for s in all_sources if s is not None]
    file_inputs = [(what, path) for what, path in inputs if path is not None]
    if out is not None:
        check_output(out, file_inputs)  # before anything is read or written
    layout = _layout(sources, weight)
    _check_shapes(sources, weight, scalar_weight, layout)
    move = target(name, device)
    n = layout.n_rows
    if batch_rows is None:
        widest = max(int(np.prod(s.shape[1:], dtype=np.int64)) * s.itemsize for s in sources)
        batch_rows = max(1, _BATCH_BYTES // max(widest, 1))
    rows = batch_rows

    if name == "dask":
        def lazy(s: Source | None, sliced: bool) -> Any:
            return sample_weight if s is None else _dask_input(s, sliced, rows)

        yt, yp, sw = (lazy(s, sl) for s, sl in zip(all_sources, layout.sliced, strict=True))
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
        stream(s, sl) for s, sl in zip(all_sources, layout.sliced, strict=True)
    ]
    try:
        return _evaluate(zip(*streams, strict=True), red=red, the_metric=the_metric, out=out,
                         inputs=file_inputs, progress=progress, total_rows=n)
    finally:
        for gen in streams:  # release what they hold (whole inputs, mapped windows) now
            gen.close()


evaluate_files.__doc__ = (evaluate_files.__doc__ or "").replace("{notes}\n", _STREAMING_NOTES)
