"""Reductions and sample weights (SPEC §3), on top of any kernel, in any namespace."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ._convert import to_namespace
from ._namespace import get_device, numpy_result
from ._spaces import broadcast_shapes, shape_str

__all__ = ["NamedWeight", "Reduction", "apply_sample_weight", "num_elements", "reduce_loss",
           "validate_reduction"]


class NamedWeight:
    """A weight (``value``) that is not the caller's ``sample_weight`` (a Keras mask), with the
    name messages give it (``what``) and the caller's ``sample_weight`` (or ``None``) to apply
    after it: :func:`apply_sample_weight` checks each against the per-sample loss, whose shape
    is known only there, and an error must name the one that does not fit."""

    __slots__ = ("sample_weight", "value", "what")

    def __init__(self, value: Any, what: str, sample_weight: Any = None) -> None:
        self.value, self.what, self.sample_weight = value, what, sample_weight


class Reduction:
    """The reduction names, as constants (Keras 2's ``ReductionV2`` plus Keras 3's names, and
    torch's ``"batchmean"``: the weighted sum divided by the size of the loss' first axis).

    Examples
    --------
    >>> from kldiv import Reduction
    >>> Reduction.SUM_OVER_BATCH_SIZE
    'sum_over_batch_size'
    >>> Reduction.validate("sum")
    'sum'
    """

    AUTO = "auto"
    NONE = "none"
    SUM = "sum"
    SUM_OVER_BATCH_SIZE = "sum_over_batch_size"
    MEAN = "mean"
    MEAN_WITH_SAMPLE_WEIGHT = "mean_with_sample_weight"
    BATCHMEAN = "batchmean"

    @classmethod
    def all(cls) -> tuple[str, ...]:
        """Every valid reduction name."""
        return (
            cls.AUTO,
            cls.NONE,
            cls.SUM,
            cls.SUM_OVER_BATCH_SIZE,
            cls.MEAN,
            cls.MEAN_WITH_SAMPLE_WEIGHT,
            cls.BATCHMEAN,
        )

    @classmethod
    def validate(cls, reduction: str | None) -> str:
        """Return the canonical name of ``reduction`` (``None`` means ``"none"``).

        Raises
        ------
        ValueError
            If ``reduction`` is not exactly one of :meth:`all` (names are case-sensitive,
            as in Keras: ``"SUM"`` is refused).
        """
        return validate_reduction(reduction, batchmean=True)


def validate_reduction(reduction: str | None, *, batchmean: bool = False) -> str:
    """The canonical reduction name: ``None`` means ``"none"``; names are exact, as in Keras
    (no case folding, no surrounding whitespace).

    ``"batchmean"`` is accepted only with ``batchmean=True``: by the loss classes, which reduce
    through :func:`reduce_loss`; a caller with reductions of its own (streaming) refuses it
    rather than treat it as another name's.
    """
    if reduction is None:
        return Reduction.NONE
    names = Reduction.all() if batchmean else tuple(
        r for r in Reduction.all() if r != Reduction.BATCHMEAN)
    if isinstance(reduction, str) and reduction in names:
        return str(reduction)
    unsupported = (" ('batchmean' is not supported here)"
                   if isinstance(reduction, str) and reduction == Reduction.BATCHMEAN else "")
    raise ValueError(
        f"Invalid reduction {reduction!r}{unsupported}. Expected one of: "
        + ", ".join(repr(r) for r in names)
        + " or None (exact, lower-case names, as in Keras)."
    )


def apply_sample_weight(xp: ModuleType, loss: Any, sample_weight: Any, *,
                        what: str = "sample_weight", tracing: bool | None = None) -> tuple[Any, Any]:
    """``(loss * w, w)`` with ``w`` brought to the loss' library, device, dtype and shape.

    ``what`` names the weight in messages (a :class:`NamedWeight` brings its own name).
    ``tracing``: :func:`~kldiv._namespace.torch_compiling`'s answer where the caller has it.

    Keras 2 rank rules, for a loss of rank r: a scalar multiplies everything; rank r + 1 with
    a last axis of 1 is squeezed; rank r - 1 gets a trailing axis (so a (B,) weight scales each
    row of a (B, T) loss); otherwise the weight must broadcast to the loss' shape.

    ``loss * w`` saves ``w`` for the loss' backward pass: a weight over memory torch does not
    own (a NumPy array converted without a copy) is copied when that gradient may be needed,
    so that refilling its buffer before ``backward()`` cannot change the gradient
    (:func:`kldiv._convert.call_time_values`).
    """
    if isinstance(sample_weight, NamedWeight):
        named = sample_weight
        loss, w = apply_sample_weight(xp, loss, named.value, what=named.what, tracing=tracing)
        if named.sample_weight is None:
            return loss, w
        loss, w2 = apply_sample_weight(xp, loss, named.sample_weight, what=what, tracing=tracing)
        return loss, w * w2
    w = to_namespace(sample_weight, xp, get_device(loss), loss.dtype, what=what,
                     like="the loss", peer=loss, tracing=tracing)
    given = _weight_shape(w, what)  # for messages: the shape the caller passed, before the rank rules
    r = loss.ndim
    # indexing, not reshape/expand_dims: those need every size, which a lazy Dask array with
    # chunks of unknown size lacks (NaN)
    if w.ndim == r + 1 and w.shape[-1] == 1:
        w = w[..., 0]
    elif r >= 1 and w.ndim == r - 1:
        w = w[..., None]
    loss_shape = tuple(loss.shape)
    try:
        shape = broadcast_shapes(tuple(w.shape), loss_shape, what=f"{what} and the loss")
        if len(shape) != len(loss_shape) or any(
            s is not None and d is not None and s != d for s, d in zip(shape, loss_shape, strict=True)
        ):
            raise ValueError
    except ValueError:
        ruled = "" if tuple(w.shape) == given else (
            f" (given as {shape_str(given)}; Keras 2's rank rules made it "
            f"{shape_str(tuple(w.shape))})")
        if any(d != d for d in loss_shape):  # NaN: a Dask array's unknown chunk sizes
            ruled += (". The loss' size is unknown (Dask chunks of unknown size), and Dask "
                      "combines it only with a size of 1 or another unknown size: call "
                      f"compute_chunk_sizes() on the inputs, or give {what} as a Dask "
                      "array chunked like them")
        raise ValueError(
            f"{what} of shape {shape_str(tuple(w.shape))} does not broadcast to the "
            f"per-sample loss of shape {shape_str(loss_shape)}{ruled}."
        ) from None
    return loss * w, w


def _weight_shape(w: Any, what: str) -> tuple[Any, ...]:
    """``w``'s shape as a tuple; a ``ValueError`` naming ``what`` for a shape of unknown rank
    (a TensorFlow graph traced with ``TensorSpec(None)``): Keras 2's rank rules need it."""
    try:
        return tuple(w.shape)
    except ValueError:
        raise ValueError(
            f"{what} has a shape of unknown rank (a graph traced without its rank, e.g. "
            "tf.TensorSpec(None)); Keras 2's sample-weight rank rules need its rank: give the "
            "input signature one, e.g. tf.TensorSpec((None,)) for one weight per sample."
        ) from None


def num_elements(shape: tuple[Any, ...]) -> int | None:
    """The number of elements of ``shape``; ``None`` when a size is unknown (a tracer's
    ``None``, Dask's NaN)."""
    n = 1
    for d in shape:
        if d is None or d != d:
            return None
        n *= int(d)
    return n


def reduce_loss(
    xp: ModuleType, loss: Any, sample_weight: Any = None, *, reduction: str | None = "auto",
    tracing: bool | None = None,
) -> Any:
    """Weight and reduce a per-sample loss (SPEC §3).

    ``reduction`` is checked here, every call (:func:`validate_reduction`, ``"batchmean"``
    included; ``None`` is ``"none"``): a loss' ``reduction`` attribute may have been set after
    construction, and an unknown name must be an error, never silently another reduction.

    A 0-d NumPy result is a NumPy scalar (:func:`kldiv._namespace.numpy_result`), whatever
    the reduction and however it was reached (an empty batch, a zero weight sum).
    ``tracing``: :func:`~kldiv._namespace.torch_compiling`'s answer where the caller has it.
    """
    reduction = validate_reduction(reduction, batchmean=True)
    return numpy_result(_reduce(xp, loss, sample_weight, reduction, tracing))


def _reduce(xp: ModuleType, loss: Any, sample_weight: Any, reduction: str,
            tracing: bool | None) -> Any:
    weights = None
    if sample_weight is not None:
        loss, weights = apply_sample_weight(xp, loss, sample_weight, tracing=tracing)
    if reduction == Reduction.NONE:
        return loss
    total = xp.sum(loss)
    if reduction == Reduction.SUM:
        return total
    if reduction == Reduction.BATCHMEAN:
        return _batchmean(xp, loss, total)
    if reduction == Reduction.MEAN_WITH_SAMPLE_WEIGHT and weights is not None:
        # weights * ones rather than broadcast_to: the loss' shape may be unknown (a batch
        # axis of None in a tf.function, NaN in Dask)
        denom = xp.sum(weights * xp.ones_like(loss))
        zero = denom == 0
        safe = xp.where(zero, xp.ones_like(denom), denom)
        return xp.where(zero, xp.zeros_like(total), total / safe)
    # auto, sum_over_batch_size, mean (and mean_with_sample_weight without weights)
    n = num_elements(tuple(loss.shape))
    if n is None:  # unknown (lazy) size: let the library count
        size = xp.sum(xp.ones_like(loss))
        return xp.where(size == 0, xp.zeros_like(total), total / xp.where(size == 0, 1, size))
    if n == 0:
        return xp.zeros_like(total)
    return total / n


def _batchmean(xp: ModuleType, loss: Any, total: Any) -> Any:
    """``total / loss.shape[0]`` (torch's ``batchmean``): 1 for a 0-d loss, 0 for an empty
    first axis; counted by the library when the size is unknown (lazy)."""
    if loss.ndim == 0:
        return total
    rows = loss.shape[0]
    if rows is not None and rows == rows:  # known: not None, not NaN (Dask)
        return xp.zeros_like(total) if rows == 0 else total / int(rows)
    rest = num_elements(tuple(loss.shape[1:]))
    if rest == 0:  # no elements at all: the sum is 0 whatever the rows
        return xp.zeros_like(total)
    if rest is None:  # count the rows of one column
        column = loss[(slice(None),) + (slice(0, 1),) * (loss.ndim - 1)]
        size = xp.sum(xp.ones_like(column))
    else:
        size = xp.sum(xp.ones_like(loss)) / rest
    return xp.where(size == 0, xp.zeros_like(total), total / xp.where(size == 0, 1, size))
