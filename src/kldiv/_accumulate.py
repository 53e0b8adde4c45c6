"""The metrics' accumulation engine: running sums in the inputs' library, batch sums, checks.

Shared by the metric classes (:mod:`kldiv._metric_base`, :mod:`kldiv._estimator_metric`) and
the streaming evaluation (:mod:`kldiv._chunked`), and re-exported by :mod:`kldiv.metrics`.
The accumulator dtype is chosen by ``kldiv.metrics.accumulator_dtype`` (which asks
``kldiv.metrics.has_float64``), read through that module at call time: it is the one place
that says where float64 is missing.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._divergence import KL
from ._family import Call, compute_family, prepare_family, resolve
from ._namespace import array_namespace, get_device, is_dask, namespace_name
from ._reduction import apply_sample_weight
from ._spaces import Prepared

__all__ = [
    "BatchSums",
    "RunningSum",
    "batch_sums",
    "check_same_place",
    "metric_dtype",
    "qualified",
    "safe_divide",
]

FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


class RunningSum:
    """A 0-d running sum in an array library, with Neumaier compensation when float32.

    ``value`` and ``comp`` are 0-d arrays of the inputs' library and device; nothing is
    read back to the host. In float64 the sum is plain; in float32 (libraries or devices
    without float64) every addition also carries its rounding error in ``comp``, so the sum
    of millions of batch totals keeps float32's full precision.

    Dask is lazy: a chain of additions would make a graph as deep as the number of updates
    (quadratic to build and to optimise, and a ``RecursionError`` at compute time). So Dask
    addends are kept in ``parts`` and summed as a tree: every ``_FANOUT`` of them collapse
    into one (``stack(...).sum()``), level after level, so the depth grows as log(updates).
    """

    __slots__ = ("comp", "parts", "value")
    _FANOUT = 64

    def __init__(self, value: Any, compensated: bool) -> None:
        self.value = value
        self.comp = array_namespace(value).zeros_like(value) if compensated else None
        # Dask: levels of pending addends (level i holds sums of _FANOUT**i updates each)
        self.parts: list[list[Any]] | None = [[value]] if is_dask(value) else None

    def add(self, x: Any) -> None:
        """Add ``x`` (a 0-d array of the same library, device and dtype, or a number)."""
        s = self.value
        if self.parts is not None:
            if not hasattr(x, "shape"):
                x = array_namespace(s).zeros_like(s) + x
            self._push(x, 0)
            return
        t = s + x
        if self.comp is not None:
            xp = array_namespace(s)
            if not hasattr(x, "shape"):
                x = xp.zeros_like(s) + x
            # Neumaier: the part of the smaller addend that t could not hold.
            err = xp.where(xp.abs(s) >= xp.abs(x), (s - t) + x, (x - t) + s)
            self.comp = self.comp + err
        self.value = t

    def _push(self, x: Any, level: int) -> None:
        assert self.parts is not None
        while len(self.parts) <= level:
            self.parts.append([])
        self.parts[level].append(x)
        if len(self.parts[level]) >= self._FANOUT:
            items, self.parts[level] = self.parts[level], []
            self._push(_tree_sum(items), level + 1)

    def merge(self, other: RunningSum) -> None:
        """Add another running sum (its value and its compensation) to this one."""
        xp = array_namespace(self.value)

        def cast(v: Any) -> Any:
            return v if v.dtype == self.value.dtype else xp.astype(v, self.value.dtype)

        self.add(cast(other.total() if other.parts is not None else other.value))
        if other.comp is not None:
            self.add(cast(other.comp))

    def total(self) -> Any:
        """The sum: ``value + comp`` (a 0-d array)."""
        if self.parts is not None:
            return _tree_sum([v for level in self.parts for v in level])
        return self.value if self.comp is None else self.value + self.comp

    def copy(self) -> RunningSum:
        out = RunningSum.__new__(RunningSum)
        out.value, out.comp = self.value, self.comp
        out.parts = None if self.parts is None else [list(level) for level in self.parts]
        return out


def _tree_sum(items: list[Any]) -> Any:
    """Sum 0-d Dask arrays as one tree reduction (not a chain of additions)."""
    if len(items) == 1:
        return items[0]
    xp = array_namespace(items[0])
    return xp.sum(xp.stack(items))


class BatchSums(NamedTuple):
    """One batch, reduced to what a running mean needs (all in the accumulator dtype)."""

    xp: ModuleType
    out_dtype: Any  # y_pred's floating dtype (what the loss class would return)
    weighted_sum: Any  # sum(w * loss), 0-d array
    n: Any  # number of per-sample losses: an int, or a 0-d array when the size is lazy
    weight_sum: Any  # sum of the weights broadcast to the loss, 0-d array; None: no weights
    loss: Any  # the weighted per-sample loss, in the accumulator dtype


def num_elements(shape: tuple[Any, ...]) -> int | None:
    """The number of elements of ``shape``; ``None`` when a size is unknown."""
    n = 1
    for d in shape:
        if d is None or d != d:  # unknown (a tracer's None, Dask's NaN)
            return None
        n *= int(d)
    return n


def _detached(prep: Prepared) -> Prepared:
    """No autograd graph in accumulated state: torch inputs are detached."""
    if namespace_name(prep.xp) != "torch":
        return prep
    return prep._replace(y_true=prep.y_true.detach(), y_pred=prep.y_pred.detach())


_KERAS_KL = resolve(KL)  # the Keras KL: probabilities, no options


def accumulator_dtype(xp: ModuleType, device: Any) -> Any:
    """``kldiv.metrics.accumulator_dtype``, looked up when called (see the module's docs)."""
    from . import metrics

    return metrics.accumulator_dtype(xp, device)


def batch_sums(y_true: Any, y_pred: Any, sample_weight: Any = None, *, call: Call | None = None) -> BatchSums:
    """Per-sample divergence of one batch (in float64 where the library has it), weighted and
    summed.

    ``call`` is the family member with its options (:func:`kldiv._family.resolve`); ``None``
    is the Keras KL. Uses the same preparation (Keras' rank rule), kernel and Keras 2
    sample-weight rules as the loss classes; the per-sample values are cast to the
    accumulator dtype before they are weighted and summed.
    """
    prep = _detached(prepare_family(y_true, y_pred, squeeze=True))
    xp = prep.xp
    acc = accumulator_dtype(xp, prep.device)
    loss = compute_family(_KERAS_KL if call is None else call, prep._replace(out_dtype=acc))
    weight_sum = None
    if sample_weight is not None:
        loss, w = apply_sample_weight(xp, loss, sample_weight)
        shape = tuple(loss.shape)
        if num_elements(shape) is None:
            weight_sum = xp.sum(w * xp.ones_like(loss))
        else:
            weight_sum = xp.sum(xp.broadcast_to(w, shape))
    n: Any = num_elements(tuple(loss.shape))
    if n is None:
        n = xp.sum(xp.ones_like(loss))
    return BatchSums(xp, prep.out_dtype, xp.sum(loss), n, weight_sum, loss)


def check_same_place(state: Any, new: Any, *, what: str, owner: str) -> None:
    """Raise if 0-d arrays ``state`` (held) and ``new`` (incoming) differ in library or device."""
    held_lib = namespace_name(array_namespace(state))
    new_lib = namespace_name(array_namespace(new))
    if held_lib != new_lib:
        raise TypeError(
            f"{owner} holds {held_lib} state but {what} gave {new_lib} arrays; a metric "
            f"accumulates in one library. Convert the inputs to {held_lib}, or call "
            "reset_state() first (or use one metric per library)."
        )
    held_dev, new_dev = get_device(state), get_device(new)
    if held_dev is not None and new_dev is not None and held_dev != new_dev:
        raise ValueError(
            f"{owner} holds {held_lib} state on device {held_dev} but {what} gave arrays on "
            f"device {new_dev}; move the inputs to {held_dev}, or call reset_state() first "
            "(or use one metric per device)."
        )


def safe_divide(xp: ModuleType, num: Any, den: Any) -> Any:
    """``num / den``, and 0 where ``den`` is 0 (Keras' ``divide_no_nan``), lazily."""
    zero = den == 0
    return xp.where(zero, xp.zeros_like(num), num / xp.where(zero, xp.ones_like(den), den))


def metric_dtype(dtype: Any, *, owner: str) -> str:
    """A metric's ``dtype`` argument as a name: ``None`` is ``"float32"``; names, Keras
    ``DTypePolicy`` objects and configs (``"mixed_..."`` gives the compute dtype) and any
    library's dtype object are accepted. ``owner`` starts the message of the ``ValueError``."""
    if dtype is None:
        return "float32"
    given = dtype
    if isinstance(dtype, dict):  # Keras 3 DTypePolicy config
        dtype = dtype.get("config", {}).get("name", "float32")
    elif isinstance(getattr(dtype, "compute_dtype", None), str):  # a Keras DTypePolicy
        dtype = dtype.compute_dtype
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            # torch.float64 -> "float64"; TensorFlow's DType has a .name
            attr = getattr(dtype, "name", None)
            name = attr if isinstance(attr, str) else str(dtype).rsplit(".", 1)[-1]
    name = name.lower().removeprefix("mixed_")
    if name not in FLOAT_NAMES:
        raise ValueError(
            f"{owner} dtype must be one of {', '.join(FLOAT_NAMES)} (or a Keras 'mixed_...' "
            f"policy); got {given!r}."
        )
    return name


def qualified(tp: type) -> str:
    """``module.QualName`` of a class (``kldiv.losses.KLDivergence``, ``numpy.ndarray``, ``int``)."""
    plain = getattr(tp, "_kldiv_class", tp)  # a Keras-aware class: its kldiv class
    module = getattr(plain, "__module__", "") or ""
    name = getattr(plain, "__qualname__", getattr(plain, "__name__", repr(plain)))
    return name if module == "builtins" else f"{module}.{name}"
