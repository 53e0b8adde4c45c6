"""Inputs: ``(y_true, y_pred)`` brought to one library, device and dtype, and their spaces.

:func:`prepare` validates and converts the two inputs of every divergence (the Keras KL and
the family alike): ``y_pred``'s library, device and floating dtype (float16/bfloat16 computed
in float32), ``y_true`` moved there, Keras' broadcast and rank rules, shape messages.

A divergence's kernels work on natural-log probabilities. This module also validates the
``inputs=`` and ``temperature=`` arguments and brings one input from its space to log space,
written once against the array API standard:

- ``"probs"``: Keras' semantics, ``log(clip(x, 1e-7, 1))`` (no renormalisation; the clip's
  gradient is 1 inside the closed interval, 0 outside, as for ``kl_divergence``);
- ``"log_probs"``: the input itself (no clipping; ``-inf`` is a probability of exactly 0);
- ``"logits"``: ``log_softmax(x / temperature)`` over the last axis, max-shifted. ``-inf``
  logits give ``-inf`` log-probabilities (and a zero gradient). A row whose logits are all
  ``-inf`` holds no probability mass at all: it becomes a row of ``-inf`` (the zero measure),
  never NaN, and the divergence kernels treat it by the ``0 * log 0 = 0`` rule.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._convert import as_pred_array, to_namespace
from ._kernel import clip_unit
from ._libraries import lazy_library
from ._namespace import (
    array_namespace,
    dtype_kind,
    get_device,
    is_dask,
    is_low_precision,
    torch_compiling,
)
from ._temperature import limit_logits, temperature_flat, temperature_limit, uniform_logits

__all__ = ["SPACES", "Prepared", "broadcast_shapes", "limit_logits", "log_softmax", "parse_inputs",
           "pred_namespace", "prepare", "row_max", "shape_str", "short_repr", "single_block_if_empty",
           "temperature_flat", "temperature_limit", "to_log_space", "uniform_logits",
           "validate_temperature"]


# ------------------------------------------------------------------------------ the inputs
class Prepared(NamedTuple):
    """Inputs brought to one library, device and dtype, ready for a kernel."""

    xp: ModuleType
    y_true: Any
    y_pred: Any
    out_dtype: Any  # the dtype the caller gets back
    device: Any
    # torch_compiling()'s answer for this call, asked once by prepare: pass it on
    # (compute(..., compiling=prep.tracing)) rather than asking again (~0.1 us each time)
    tracing: bool = False


def shape_str(shape: tuple[Any, ...]) -> str:
    """A shape for messages: ``(2, 3)``, ``(3,)``, ``(?, 3)`` for an unknown size.

    Examples
    --------
    >>> shape_str((2, None)), shape_str((3,)), shape_str(())
    ('(2, ?)', '(3,)', '()')
    """
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"



def broadcast_shapes(a: tuple[Any, ...], b: tuple[Any, ...], *, what: str) -> tuple[Any, ...]:
    """NumPy broadcasting of two shapes, with a ``ValueError`` naming both when it fails.

    Unknown sizes (``None``, or NaN from Dask) are accepted against anything.
    """
    if a == b and None not in a:
        return a
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        da = None if da is None or da != da else da  # NaN from Dask
        db = None if db is None or db != db else db
        if da == 1:
            out.append(db)
        elif db == 1 or db is None or da is None or da == db:
            out.append(da if da is not None else db)
        else:
            raise ValueError(f"{what}: shapes {shape_str(a)} and {shape_str(b)} do not broadcast.")
    return tuple(reversed(out))


def _given(shapes: tuple[tuple[Any, ...], tuple[Any, ...]]) -> str:
    return f"y_true of shape {shape_str(shapes[0])} and y_pred of shape {shape_str(shapes[1])}"


def _known_rank(x: Any, what: str) -> tuple[Any, ...]:
    """``x``'s shape as a tuple; a ``ValueError`` naming ``what`` for a shape of unknown rank
    (a TensorFlow graph traced with ``TensorSpec(None)``): there is no class axis to find."""
    try:
        return tuple(x.shape)
    except ValueError:
        raise ValueError(
            f"{what} has a shape of unknown rank (a graph traced without its rank, e.g. "
            "tf.TensorSpec(None)); kldiv needs the rank to find the class (last) axis: give "
            "the input signature a rank, e.g. tf.TensorSpec((None, None))."
        ) from None


def _squeeze_last(xp: ModuleType, x: Any) -> Any:
    """``x`` without its last axis (of size 1): by indexing, which also takes a Dask array
    whose chunks have unknown sizes (a reshape needs them)."""
    return x[..., 0]


def pred_namespace(pred: Any, other: Any, *, what: str,
                   tracing: bool | None = None) -> tuple[Any, ModuleType]:
    """``pred`` (the input whose library the call runs in) and its namespace.

    The lazy library (Dask) is NumPy's chunked container: as with ``dask_array + ndarray``,
    a Dask ``other`` against a NumPy ``pred`` keeps the call lazy (``pred`` becomes a Dask
    array) rather than computing ``other``. Against any other library, ``other`` is later
    computed and moved to ``pred``'s library and device. ``tracing``:
    :func:`~kldiv._namespace.torch_compiling`'s answer where the caller has it.

    Raises
    ------
    TypeError
        ``"{what} of type T is not a supported array"``.
    """
    if is_dask(other) and isinstance(pred, np.ndarray):
        lazy = _LAZY.loaded()  # loaded: ``other`` is one of its arrays
        assert lazy is not None
        pred = lazy.asarray(pred)
    try:
        xp = array_namespace(pred, tracing=tracing)
    except TypeError as exc:
        raise TypeError(f"{what} of type {type(pred).__name__} is not a supported array: {exc}") from None
    return pred, xp


_LAZY = lazy_library()


def prepare(y_true: Any, y_pred: Any, *, squeeze: bool = True,
            tracing: bool | None = None) -> Prepared:
    """Validate and convert both inputs (SPEC §1-2). Never modifies them.

    With ``squeeze=True`` (the loss class, the metric and the streaming evaluation), Keras 2's
    ``squeeze_or_expand_dimensions`` runs first: when the ranks differ by one and the larger
    has a trailing axis of 1, that axis is dropped. The function ``kl_divergence`` passes
    ``squeeze=False``: like ``tf.keras.losses.kld`` it broadcasts the inputs as given.

    ``tracing``: :func:`~kldiv._namespace.torch_compiling`'s answer where the caller has it
    (asked here when ``None``); asked once per call, handed to every conversion helper and
    returned in :attr:`Prepared.tracing` for the kernel's dispatch.
    """
    if y_pred is None or y_true is None:
        raise TypeError("y_true and y_pred must be arrays, lists or numbers, not None.")
    if tracing is None:
        tracing = torch_compiling()
    y_pred, xp = pred_namespace(as_pred_array(y_pred), y_true, what="y_pred", tracing=tracing)

    pred_dtype = y_pred.dtype
    kind = dtype_kind(pred_dtype, tracing=tracing)
    if kind in {"int", "bool"}:
        out_dtype = xp.float32
    elif kind == "float":
        out_dtype = pred_dtype
    elif kind == "complex":
        raise TypeError(f"y_pred has complex dtype {pred_dtype}; KL divergence needs real values.")
    else:
        raise TypeError(f"y_pred has dtype {pred_dtype}, which is not a numeric dtype.")
    compute_dtype = xp.float32 if is_low_precision(out_dtype, tracing=tracing) else out_dtype

    device = get_device(y_pred)
    if y_pred.dtype != compute_dtype:
        y_pred = xp.astype(y_pred, compute_dtype)
    y_true = to_namespace(y_true, xp, device, compute_dtype, what="y_true", tracing=tracing)

    given = (_known_rank(y_true, "y_true"), _known_rank(y_pred, "y_pred"))
    squeezed = ""  # which input lost its trailing axis (messages are built only on errors:
    # formatting symbolic shapes would break a torch.compile graph)
    if squeeze:
        # Keras 2's squeeze_or_expand_dimensions: ranks differing by one with a trailing axis
        # of 1 on the larger -> that axis is squeezed.
        if y_true.ndim == y_pred.ndim + 1 and y_true.shape[-1] == 1:
            y_true = _squeeze_last(xp, y_true)
            squeezed = "y_true"
        elif y_pred.ndim == y_true.ndim + 1 and y_pred.shape[-1] == 1:
            y_pred = _squeeze_last(xp, y_pred)
            squeezed = "y_pred"

    if y_true.ndim == 0 and y_pred.ndim == 0:
        # A scalar broadcasts against an array (Python scalars are accepted), but with no
        # array at all there is no class axis to sum over.
        raise ValueError(
            f"kl_divergence needs a class axis (an input of at least 1-d); got {_given(given)}."
        )
    try:
        broadcast_shapes(tuple(y_true.shape), tuple(y_pred.shape), what="y_true and y_pred")
    except ValueError:
        note = ""
        if squeezed:
            now = tuple((y_true if squeezed == "y_true" else y_pred).shape)
            note = (f" (after Keras' rank rule for losses and metrics: {squeezed}'s trailing axis "
                    f"of 1 squeezed, giving {shape_str(now)})")
        raise ValueError(f"{_given(given)} do not broadcast{note}.") from None
    if is_dask(y_pred):
        y_true, y_pred = single_block_if_empty(y_true), single_block_if_empty(y_pred)
    return Prepared(xp, y_true, y_pred, out_dtype, device, tracing)



# ------------------------------------------------------------------------------ the spaces
SPACES = ("probs", "log_probs", "logits")


def parse_inputs(inputs: Any) -> tuple[str, str]:
    """``inputs=`` as ``(y_true's space, y_pred's space)``.

    A single name applies to both inputs; a pair (tuple or list of two names) gives them
    separately, e.g. ``("probs", "logits")`` for soft labels against logits.

    Raises
    ------
    TypeError
        If ``inputs`` is neither a string nor a pair of strings.
    ValueError
        If a name is not one of :data:`SPACES`.
    """
    if isinstance(inputs, str):
        pair: tuple[Any, ...] = (inputs, inputs)
    elif isinstance(inputs, (tuple, list)) and len(inputs) == 2:
        pair = tuple(inputs)
    else:
        raise TypeError(
            f"inputs must be one of {', '.join(map(repr, SPACES))} or a pair of them (y_true's "
            f"space, y_pred's space), e.g. ('probs', 'logits'); got {short_repr(inputs)}."
        )
    for name in pair:
        if not isinstance(name, str) or name not in SPACES:
            raise ValueError(
                f"inputs: unknown input space {short_repr(name)}; expected one of "
                f"{', '.join(map(repr, SPACES))} (or a pair of them)."
            )
    return str(pair[0]), str(pair[1])  # plain names (a np.str_ would show in configs)


def short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)`` for a message, shortened past ``limit`` characters: an option echoed
    back (a 401-digit integer, a 5000-character string) is named, not printed whole.

    Examples
    --------
    >>> short_repr(0.5), short_repr(10**400)
    ('0.5', '10000000000000000000...(401 characters)')
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[:20]}...({len(text)} characters)"


def _real(value: Any, what: str) -> float:
    """``value`` as a Python float: a real number (Python or NumPy scalar), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__} "
                        f"{short_repr(value)}.")
    try:
        return float(value)
    except OverflowError:  # an int (or Fraction) beyond the float range: out of range
        raise ValueError(f"{what}={short_repr(value)} is out of the range of a float.") from None


def validate_temperature(temperature: Any, spaces: tuple[str, str]) -> float:
    """``temperature`` as a float, checked: finite, > 0, and only with ``"logits"``.

    Raises
    ------
    TypeError
        If ``temperature`` is not a real number.
    ValueError
        If it is not finite and > 0, or differs from 1 while neither input is logits.
    """
    t = _real(temperature, "temperature")
    # comparisons, not math.isfinite: a symbolic float (torch.compile(dynamic=True)) traces
    # them; the same test, NaN included
    if not (-math.inf < t < math.inf and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {short_repr(temperature)}.")
    if t != 1.0 and "logits" not in spaces:
        raise ValueError(
            f"temperature={short_repr(temperature)} only applies to logits (inputs='logits' or a pair "
            f"with 'logits'); got inputs {spaces!r}. Divide logits by the temperature, or "
            "pass inputs='logits'."
        )
    return t


def _block_max(x: Any, axis: Any = None, keepdims: bool = False, **_: Any) -> Any:
    # a Dask block's (or partial result's) maximum over the class axis, by the block's own
    # method: Dask's own chunk function returns a block of no rows as an empty (1, 0) array,
    # whose maximum over the class axis then fails ("zero-size array to reduction operation
    # maximum"). A block of no classes (chunks such as (2, 0, 3) on the class axis) has the
    # maximum -inf, the identity of the maximum.
    axes = tuple(a % x.ndim for a in (axis if isinstance(axis, tuple) else (axis,)))
    if any(x.shape[a] == 0 for a in axes):
        shape = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
        out = np.full_like(x, -math.inf, shape=shape)
        return out if keepdims else out.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))
    return x.max(axis=axis, keepdims=keepdims)


def row_max(xp: ModuleType, x: Any) -> Any:
    """``max(x, axis=-1, keepdims=True)``; on Dask by a reduction that takes blocks of no
    rows (``x[mask]`` after ``compute_chunk_sizes()``, chunks such as ``((2, 0, 2), (5,))``),
    where Dask's own ``max`` fails. The class axis must not be empty."""
    if is_dask(x):
        lazy = _LAZY.loaded()
        assert lazy is not None
        return lazy.reduction(x, _block_max, _block_max, axis=-1, keepdims=True,
                              dtype=x.dtype, meta=x._meta)
    return xp.max(x, axis=-1, keepdims=True)


def single_block_if_empty(x: Any) -> Any:
    """A Dask array of size 0 (a known size of 0 on some axis) in one block.

    Dask gives such an array one (empty) task but keeps its chunks: any binary operation
    on one of several empty blocks, ``x == 0`` or ``x - m``, then fails at ``compute()`` (a
    ``KeyError`` or ``IndexError`` inside Dask). Nothing else changes.
    """
    if is_dask(x) and 0 in x.shape and math.prod(x.numblocks) > 1:
        return x.rechunk(tuple(-1 for _ in x.shape))
    return x


def log_softmax(xp: ModuleType, x: Any, temperature: float = 1.0) -> Any:
    """``log_softmax(x / temperature)`` over the last axis, stable, in ``x``'s dtype.

    Max-shifted, then scaled: ``z = (x - max(x)) / temperature``, ``z - log(sum(exp(z)))``
    (``max(x / T) = max(x) / T`` for ``T > 0``; shifting first keeps ``z <= 0``, so that a tiny
    temperature gives the one-hot limit, ``-inf`` off the row maximum, rather than an
    overflowing ``x / T`` and NaN); a temperature below the dtype's smallest normal number
    (0 in the dtype: :func:`temperature_limit`) gives that limit exactly, with a zero
    gradient; a temperature whose reciprocal is below that number (:func:`temperature_flat`)
    gives the ``T -> inf`` limit, uniform over the entries that are not ``-inf``. A row of
    all ``-inf`` gives all ``-inf`` (not NaN), with
    zero gradients: the ``where`` calls replace the undefined ``-inf - (-inf)`` and ``log(0)``
    by safe values on both branches, so that no NaN reaches the backward pass either.
    """
    if x.shape[-1] == 0:  # no classes: nothing to normalise
        return x / temperature if temperature != 1.0 else x
    m = row_max(xp, x)
    m = xp.where(m == -math.inf, 0.0, m)
    z = x - m
    if temperature_limit(temperature, x.dtype):
        z = limit_logits(xp, z)
    elif temperature_flat(temperature, x.dtype):
        z = uniform_logits(xp, z)
    elif temperature != 1.0:
        z = z / temperature
    s = xp.sum(xp.exp(z), axis=-1, keepdims=True)
    lse = xp.log(xp.where(s == 0.0, 1.0, s))
    return z - lse


def to_log_space(xp: ModuleType, x: Any, space: str, temperature: float) -> Any:
    """``x`` (in ``space``) as natural-log probabilities, in namespace ``xp``.

    Raises
    ------
    TypeError
        For a NumPy masked array: NumPy's reductions skip its masked entries while ``where``
        drops the mask, so the divergence would be neither that of the data nor that of the
        unmasked entries.
    """
    if isinstance(x, np.ma.MaskedArray):
        fill = "0.0" if space == "probs" else "-np.inf"
        raise TypeError(
            f"y_true or y_pred is a NumPy masked array, whose mask the divergence family's "
            f"kernels cannot honour. Fill the masked entries with a probability of 0 "
            f"(x.filled({fill}) for {space!r} inputs), or pass the data (np.ma.getdata) and "
            "give a mask of whole rows as sample_weight to a loss class."
        )
    if space == "log_probs":
        return x
    if space == "logits":
        return log_softmax(xp, x, temperature)
    return xp.log(clip_unit(xp, x))
