"""The loss or the metric over a stream of batches: :func:`evaluate_batches`, and its loop.

:func:`evaluate_batches` streams two iterables of batches (any library, any device) through
one accumulator and gives what the loss class (or the metric) would give on the whole data,
accumulated in float64 where the library has it (float32 with compensated summation
elsewhere). :func:`run_batches` is the loop behind it and behind
:func:`kldiv._files.evaluate_files` (which makes the batches from ``.npy`` files). The
running sums are :mod:`kldiv._accumulate`'s, the option and shape checks
:mod:`kldiv._stream_checks`', the output file :mod:`kldiv._npyio`'s and the progress bar
:mod:`kldiv._progress`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from itertools import zip_longest
from typing import Any

import numpy as np

from ._accumulate import (
    BatchSums,
    RunningSum,
    batch_sums,
    cast_result,
    check_same_place,
    running_sums,
    safe_divide,
)
from ._metric_base import DivergenceMetric
from ._namespace import array_namespace, device_scope, dtype_name, get_device, numpy_result
from ._npy_writer import NpyWriter, backing_file, check_output, refuse_input
from ._npyio import DataTypeError, PathLike, to_host
from ._progress import progress_bar
from ._reduction import Reduction
from ._stream_checks import check_options, class_ranks, data_less
from .losses import KLDivergence as _Loss

__all__ = ["STREAMING_NOTES", "evaluate_batches", "run_batches"]


# --------------------------------------------------------------------------------------
# Small helpers of the loop
# --------------------------------------------------------------------------------------


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


def _unreduced_result(x: Any) -> Any:
    """Per-sample losses on NumPy are an ndarray (a 0-d one for a single sample)."""
    return np.asarray(x) if isinstance(x, np.generic) else x


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-sample losses along the first axis, in their library and device."""
    xp = array_namespace(parts[0])  # a kldiv shim (TensorFlow's) has its concat too
    # parts of several dtypes: cast to their promoted dtype first (TensorFlow's concat does
    # not promote; the others do, to the same dtype)
    dtype = parts[0].dtype
    for part in parts[1:]:
        dtype = _promoted(xp, dtype, part.dtype)
    scope = device_scope(xp, get_device(parts[0]))
    with scope if scope is not None else contextlib.nullcontext():
        return xp.concat([p if p.dtype == dtype else xp.astype(p, dtype) for p in parts], axis=0)


def _check_stacks(first: Any, loss: Any) -> None:
    """Raise unless per-sample losses ``first`` and ``loss`` concatenate along the first axis
    (the same rank, of at least 1, and the same trailing shape), before the library's
    ``concat`` raises its own error (torch's ``RuntimeError``, JAX's ``TypeError``)."""
    a, b = tuple(first.shape), tuple(loss.shape)
    if not a or not b:
        raise ValueError("reduction='none' over several batches needs inputs of at least 2-d.")
    if len(a) != len(b) or a[1:] != b[1:]:
        raise ValueError("per-sample losses of the batches do not stack along the first axis: "
                         f"{('N', *a[1:])} then {b}.")


def _promoted(xp: Any, a: Any, b: Any) -> Any:
    """The floating dtype of ``a`` and ``b`` together (float32 and float64 give float64)."""
    if a == b:
        return a
    result_type = getattr(xp, "result_type", None)  # (TensorFlow's shim has none)
    if result_type is not None:
        with contextlib.suppress(Exception):
            return result_type(a, b)
    names = {dtype_name(a), dtype_name(b)}
    return xp.float64 if "float64" in names else xp.float32


class _Accumulator:
    """Running sum(w * loss), number of per-sample losses and sum(w), in one library/device."""

    def __init__(self) -> None:
        self.total: RunningSum | None = None
        self.n: RunningSum | None = None
        self.wsum: RunningSum | None = None
        self.out_dtype: Any = None

    def add(self, sums: BatchSums) -> None:
        xp, total, n = sums.xp, sums.weighted_sum, sums.n
        # a batch without weights weighs 1 per sample: sum(w) over every batch is then the
        # denominator of "mean_with_sample_weight" also when only some batches have weights
        w = n if sums.weight_sum is None else sums.weight_sum
        if self.total is None or self.n is None or self.wsum is None:
            self.total, self.n = running_sums(total, n, xp)
            self.wsum = running_sums(total, w, xp)[1]
            self.out_dtype = sums.out_dtype
        else:
            check_same_place(self.total.value, total, what="a batch", owner="evaluate_batches", metric=False)
            # batches of several dtypes: the dtype of their concatenation (the loss class')
            self.out_dtype = _promoted(xp, self.out_dtype, sums.out_dtype)
            self.total.add(total)
            self.n.add(n if hasattr(n, "shape") else xp.zeros_like(total) + n)
            self.wsum.add(w if hasattr(w, "shape") else xp.zeros_like(total) + w)

    def result(self, reduction: str) -> Any:
        if self.total is None or self.n is None:
            return np.float32(0.0)  # no batch at all: the loss of an empty batch
        total = self.total.total()
        xp = array_namespace(total)
        if reduction == Reduction.SUM:
            out = total
        elif reduction == Reduction.MEAN_WITH_SAMPLE_WEIGHT and self.wsum is not None:  # sum(w)
            out = safe_divide(xp, total, self.wsum.total())
        else:  # auto, sum_over_batch_size, mean: divide by the number of per-sample losses
            out = safe_divide(xp, total, self.n.total())
        return cast_result(xp, out, self.out_dtype)


def _iterable(value: Any, name: str) -> Iterator[Any]:
    """``iter(value)``, or a ``TypeError`` naming the argument."""
    try:
        return iter(value)
    except TypeError:
        hint = (f"; for the same weight in every batch pass itertools.repeat({value!r})"
                if name == "sample_weight_batches" and isinstance(value, (int, float)) else "")
        raise TypeError(f"{name} must be an iterable of batches (a list, a generator, ...), got "
                        f"{type(value).__name__}{hint}.") from None


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


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


def run_batches(
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
                yt, yp = class_ranks(yt, yp)
                if the_metric is not None:
                    the_metric.update_state(yt, yp, sw)
                    done = the_metric.running_total()
                elif red == Reduction.NONE:
                    loss = _Loss(reduction=Reduction.NONE)(yt, yp, sample_weight=sw)
                    if parts:
                        check_same_place(parts[0], loss, what="a batch", owner="evaluate_batches", metric=False)
                        _check_stacks(parts[0], loss)
                    if writer is not None:
                        no_values = data_less(loss)
                        if no_values is not None:
                            raise DataTypeError(f"the per-sample losses are {no_values}: there is nothing "
                                                "to write to out=. Compute eagerly, on a device "
                                                "that holds data.")
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
        return numpy_result(the_metric.result())
    if red != Reduction.NONE:
        return numpy_result(acc.result(red))
    if written is not None:
        return np.load(written, mmap_mode="r")
    if not parts:
        return np.zeros((0,), dtype=np.float32)
    if len(parts) == 1:
        return _unreduced_result(parts[0])
    if parts[0].ndim == 0:
        raise ValueError("reduction='none' over several batches needs inputs of at least 2-d.")
    return _unreduced_result(_concat(parts))


STREAMING_NOTES = """\
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
    metric: DivergenceMetric | bool | None = None,
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
        One sample weight per batch (Keras 2 rules, as for the loss class); ``None`` for a
        batch weighs each of its samples 1.
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
        floating dtype (the metric's dtype with ``metric``; batches of several dtypes give
        the dtype of their concatenation, as do the per-sample losses, also in ``out``):
        on NumPy a NumPy scalar
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
    TypeError
        If an argument that must be iterable is not (``sample_weight_batches`` is one weight
        per batch: ``itertools.repeat(w)`` repeats one), ``convert`` is not callable, or
        ``out`` is not a path.

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
    the_metric, red, total_rows, progress = check_options(
        metric=metric, reduction=reduction, out=out, progress=progress, rows=("total_rows", total_rows, 0))
    if out is not None:
        check_output(out)
    if convert is not None and not callable(convert):
        raise TypeError(f"convert must be a callable (applied to every array), got {type(convert).__name__}.")
    streams = (_iterable(y_true_batches, "y_true_batches"), _iterable(y_pred_batches, "y_pred_batches"),
               None if sample_weight_batches is None
               else _iterable(sample_weight_batches, "sample_weight_batches"))

    def converted() -> Iterator[tuple[Any, Any, Any]]:
        for yt, yp, sw in _zip_batches(*streams):
            if convert is not None:
                yt, yp = convert(yt), convert(yp)
                sw = convert(sw) if sw is not None and not isinstance(sw, (int, float)) else sw
            yield yt, yp, sw

    return run_batches(converted(), red=red, the_metric=the_metric, out=out, inputs=[],
                       progress=progress, total_rows=total_rows)


evaluate_batches.__doc__ = (evaluate_batches.__doc__ or "").replace("{notes}\n", STREAMING_NOTES)
