"""What streaming checks before it reads anything: its options, and the loss class' shape rules.

Streaming gives what the loss class gives on the whole data, so it follows the class' rules:
the rank squeeze of ``y_true``/``y_pred`` (Keras 2's ``squeeze_or_expand_dimensions``),
broadcasting, then Keras 2's ``sample_weight`` rules. :func:`class_ranks` applies the rank
rule to one batch of arrays; :func:`layout` reads the same rules off the shapes of whole
inputs (files) to say which inputs are read by rows and which are read whole (they
broadcast); :func:`check_shapes` runs the loss class on zero-cost stand-ins of the first
batch, so that shapes that do not fit fail before anything is read or written.
:func:`check_options` checks the options :func:`kldiv.evaluate_batches` and
:func:`kldiv.evaluate_files` share.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._accumulate import traced
from ._convert import as_pred_array
from ._metric_base import DivergenceMetric
from ._metric_restore import public_name
from ._namespace import array_namespace, is_array
from ._npyio import DataFileError, PathLike, Source, as_path
from ._progress import check_progress
from ._reduction import Reduction, validate_reduction
from ._spaces import shape_str
from .losses import KLDivergence as _Loss
from .metrics import KLDivergence

__all__ = ["Layout", "check_count", "check_options", "check_shapes", "class_ranks", "data_less", "layout"]


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def check_count(value: Any, name: str, *, minimum: int) -> int:
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
        made = KLDivergence()
        made._kldiv_transient = True  # private to this call (see RunningMean._kldiv_transient)
        return made
    if not isinstance(metric, DivergenceMetric):
        hint = " (a class: pass an instance, e.g. KLDivergence())" if isinstance(metric, type) else ""
        raise TypeError(
            "metric must be True or a divergence metric of kldiv.metrics (KLDivergence, "
            f"ReverseKLDivergence, JensenShannonDivergence), got {public_name(type(metric))}{hint}."
        )
    return metric


def check_options(
    *,
    metric: DivergenceMetric | bool | None,
    reduction: str | None,
    out: PathLike | None,
    progress: Any,
    rows: tuple[str, Any, int],
) -> tuple[DivergenceMetric | None, str, int | None, bool | str | None]:
    """The options both helpers share, checked in this order before anything is read.

    ``rows`` is ``(name, value, minimum)`` of the helper's row count (``total_rows``,
    ``batch_rows``; ``None`` unchecked). Returns the metric to update (``None``: a reduction),
    the reduction, the row count as an int and the progress option.
    """
    the_metric = _resolve_metric(metric, reduction)
    red = validate_reduction(reduction) if the_metric is None else Reduction.AUTO
    if out is not None:
        as_path(out, "out")  # a TypeError naming out, before anything else about it
        if red != Reduction.NONE:
            raise ValueError("out= is for reduction='none' (the per-sample losses).")
    name, value, minimum = rows
    count = None if value is None else check_count(value, name, minimum=minimum)
    return the_metric, red, count, check_progress(progress)


def data_less(x: Any) -> str | None:
    """What ``x`` is when it has a shape but no values (a torch tensor on the ``meta`` device,
    a JAX tracer under ``jax.jit``, a ``torch.func`` wrapper): nothing can be copied out of
    it, to the host (``out=``) or to another library or device. ``None`` for an array with
    values."""
    if getattr(x, "is_meta", False) is True:
        return "a tensor on torch's 'meta' device (shapes only, no values)"
    if traced(x):
        return "a traced array (under jax.jit, jax.grad, jax.vmap or torch.func: no values yet)"
    return None


# --------------------------------------------------------------------------------------
# The rank rule, on arrays (one batch) and on shapes (whole inputs)
# --------------------------------------------------------------------------------------


def class_ranks(y_true: Any, y_pred: Any) -> tuple[Any, Any]:
    """The loss class' rank rule (Keras 2's ``squeeze_or_expand_dimensions``), per batch.

    Ranks differing by one with a trailing axis of 1 on the larger: that axis is squeezed,
    so a ``(N, 1)`` ``y_true`` against a ``(N,)`` ``y_pred`` is one sample of ``N`` classes,
    whether the arrays come whole or in batches.
    """
    if not is_array(y_pred):
        y_pred = as_pred_array(y_pred)  # Python floats: Keras' floatx, as in the loss
    ts = np.shape(y_true) if not hasattr(y_true, "shape") else tuple(y_true.shape)
    squeeze_true, squeeze_pred = _squeezed(ts, tuple(y_pred.shape))
    if squeeze_true:
        y_true = _drop_last(y_true)
    elif squeeze_pred:
        y_pred = _drop_last(y_pred)
    return y_true, y_pred


def _squeezed(ts: tuple[int, ...], ps: tuple[int, ...]) -> tuple[bool, bool]:
    """Which of ``y_true``/``y_pred`` (at most one) loses its trailing axis of 1."""
    if len(ts) == len(ps) + 1 and ts[-1] == 1:
        return True, False
    return False, len(ps) == len(ts) + 1 and ps[-1] == 1


def _drop_last(x: Any) -> Any:
    if not is_array(x):
        x = np.asarray(x)
    return array_namespace(x).reshape(x, tuple(x.shape[:-1]))


def _class_shapes(ts: tuple[int, ...], ps: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes after the loss class' rank squeeze (see :func:`class_ranks`)."""
    squeeze_true, squeeze_pred = _squeezed(ts, ps)
    return (ts[:-1] if squeeze_true else ts), (ps[:-1] if squeeze_pred else ps)


def _weight_shape(ws: tuple[int, ...], r: int) -> tuple[int, ...]:
    """A weight's shape after Keras 2's rank rules, against a per-sample loss of rank ``r``."""
    if len(ws) == r + 1 and ws[-1] == 1:
        return ws[:-1]
    if r >= 1 and len(ws) == r - 1:
        return (*ws, 1)
    return ws


# --------------------------------------------------------------------------------------
# Whole inputs: which are read by rows
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the rows of a stream of whole inputs come from."""

    n_rows: int | None  # None: no batch axis (a single sample): one batch, everything whole
    sliced: tuple[bool, bool, bool]  # per input: read by rows, or whole (it broadcasts)


def layout(sources: list[Source], weight: Source | None) -> Layout:
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
        return Layout(None, (False, False, False))
    long = {s[0] for s in (ts, ps) if len(s) == nd} - {1}
    if len(long) > 1:
        desc = " and ".join(f"{s.name} of shape {shape_str(s.shape)}" for s in sources)
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
                    f"shapes do not fit: {weight.name} of shape {shape_str(weight.shape)} has "
                    f"{wa[0]} rows for {n} rows of {t.name} {shape_str(t.shape)} and "
                    f"{p.name} {shape_str(p.shape)}."
                )
    return Layout(n, (len(ts) == nd and ts[0] == n, len(ps) == nd and ps[0] == n, sliced_w))


def check_shapes(sources: list[Source], weight: Source | None, scalar_weight: Any, layout: Layout) -> None:
    """Run the loss class on zero-cost stand-ins (shapes only) of the first batch."""
    def standin(s: Source, sliced: bool) -> np.ndarray:
        shape = (min(s.shape[0], 2), *s.shape[1:]) if sliced else s.shape
        return np.broadcast_to(np.zeros((), dtype=np.float32), shape)

    t, p = (standin(s, sl) for s, sl in zip(sources, layout.sliced, strict=False))
    w = standin(weight, layout.sliced[2]) if weight is not None else scalar_weight
    try:
        _Loss(reduction=Reduction.NONE)(t, p, sample_weight=w)
    except (ValueError, TypeError) as exc:
        desc = ", ".join(f"{s.label} {shape_str(s.shape)}" for s in [*sources, *([weight] if weight else [])])
        # the loss class' message names the shapes of the stand-ins: say which rows they are
        rows = [a.shape[0] for a, s, sl in zip((t, p, w), [*sources, weight], layout.sliced, strict=False)
                if sl and s is not None and s.shape and a.shape[0] != s.shape[0]]
        where = f"; on their first {rows[0]} rows: " if rows else ": "
        raise DataFileError(f"shapes do not fit ({desc}){where}{exc}") from None
