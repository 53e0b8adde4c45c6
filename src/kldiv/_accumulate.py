"""The metrics' accumulation engine: running sums in the inputs' library, batch sums, checks.

Shared by the metric classes (:mod:`kldiv._metric_base`, :mod:`kldiv._estimator_metric`) and
the streaming evaluation, and re-exported by :mod:`kldiv.metrics`. It imports nothing from the
faces above it. :func:`accumulator_dtype` is the one place that chooses the accumulator dtype
(float64 where the library has it on the device, :func:`has_float64`).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._cast import cast_result
from ._dispatch import Call, compute, resolve
from ._divergence import KL
from ._libraries import compiling, library, traced_rule
from ._namespace import array_namespace, get_device, is_dask, namespace_name
from ._reduction import apply_sample_weight, num_elements
from ._spaces import prepare

__all__ = [
    "BatchSums",
    "RunningSum",
    "accumulator_dtype",
    "batch_sums",
    "cast_result",
    "check_same_place",
    "detached",
    "has_float64",
    "metric_dtype",
    "named_dtype",
    "num_elements",
    "qualified",
    "running_sums",
    "safe_divide",
    "traced",
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
            # Neumaier: the part of the smaller addend that t could not hold. An infinite (or
            # NaN) t holds everything there is: no error term, which would be inf - inf = NaN
            # (computed on zeros there, so that no invalid-value warning is raised either).
            finite = xp.isfinite(t)
            zero = xp.zeros_like(t)
            s0, x0, t0 = (xp.where(finite, v, zero) for v in (s, x, t))
            err = xp.where(xp.abs(s0) >= xp.abs(x0), (s0 - t0) + x0, (x0 - t0) + s0)
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


def detached(xp: ModuleType, *arrays: Any) -> tuple[Any, ...]:
    """``arrays`` without an autograd graph (torch's are detached: the table's
    :attr:`~kldiv._libraries.Library.detach`): accumulated state keeps none."""
    detach = library(xp).detach
    if not detach:
        return arrays
    return tuple(getattr(a, detach)() for a in arrays)


_KERAS_KL = resolve(KL)  # the Keras KL: probabilities, no options


def has_float64(xp: ModuleType, device: Any) -> bool:
    """True when namespace ``xp`` can hold float64 arrays on ``device`` (the libraries table
    answers: JAX only with ``jax_enable_x64``, torch not on Apple's MPS, other libraries
    through the array API's inspection API where they have it)."""
    return library(xp).has_float64(xp, device)


def accumulator_dtype(xp: ModuleType, device: Any) -> Any:
    """float64 where ``xp`` has it on ``device``, else float32 (summed with compensation)."""
    return xp.float64 if has_float64(xp, device) else xp.float32


def running_sums(total: Any, count: Any, xp: ModuleType) -> tuple[RunningSum, RunningSum]:
    """A new state ``(total, count)`` from one batch's ``total`` (a 0-d array in the
    accumulator dtype) and ``count`` (the same, or an int): compensated unless float64."""
    compensated = total.dtype != xp.float64
    if not hasattr(count, "shape"):
        count = xp.zeros_like(total) + count
    return RunningSum(total, compensated), RunningSum(count, compensated)


def batch_sums(y_true: Any, y_pred: Any, sample_weight: Any = None, *, call: Call | None = None) -> BatchSums:
    """Per-sample divergence of one batch (in float64 where the library has it), weighted and
    summed.

    ``call`` is the family member with its options (:func:`kldiv._dispatch.resolve`); ``None``
    is the Keras KL. Uses the same preparation (Keras' rank rule), kernel and Keras 2
    sample-weight rules as the loss classes; the per-sample values are cast to the
    accumulator dtype before they are weighted and summed.
    """
    prep = prepare(y_true, y_pred, squeeze=True)
    xp = prep.xp
    y_true, y_pred = detached(xp, prep.y_true, prep.y_pred)
    prep = prep._replace(y_true=y_true, y_pred=y_pred)
    acc = accumulator_dtype(xp, prep.device)
    loss = compute(_KERAS_KL if call is None else call, prep._replace(out_dtype=acc))
    weight_sum = None
    if sample_weight is not None:
        # A weight that requires grad (a torch tensor) would put its graph into the state:
        # accumulated sums keep none, whatever input carries it.
        loss, w = detached(xp, *apply_sample_weight(xp, loss, sample_weight))
        shape = tuple(loss.shape)
        if num_elements(shape) is None:
            weight_sum = xp.sum(w * xp.ones_like(loss))
        else:
            weight_sum = xp.sum(xp.broadcast_to(w, shape))
    n: Any = num_elements(tuple(loss.shape))
    if n is None:
        n = xp.sum(xp.ones_like(loss))
    return BatchSums(xp, prep.out_dtype, xp.sum(loss), n, weight_sum, loss)


def check_same_place(state: Any, new: Any, *, what: str,
                     owner: str | Callable[[], str], metric: bool = True) -> None:
    """Raise if 0-d arrays ``state`` (held) and ``new`` (incoming) differ in library or device.
    ``owner`` names the holder in the message (a callable: evaluated only for a message);
    ``metric=False``: the holder is a stream of batches, which has no ``reset_state()``."""
    held_lib = namespace_name(array_namespace(state))
    new_lib = namespace_name(array_namespace(new))
    if held_lib != new_lib:
        owner = owner() if callable(owner) else owner
        advice = (f"a metric accumulates in one library. Convert the inputs to {held_lib}, or "
                  "call reset_state() first (or use one metric per library)." if metric else
                  f"every batch must be of one library. Convert the batches to {held_lib} "
                  "(convert= does that for evaluate_batches).")
        raise TypeError(f"{owner} holds {held_lib} state but {what} gave {new_lib} arrays; {advice}")
    held_dev, new_dev = get_device(state), get_device(new)
    if held_dev is not None and new_dev is not None and held_dev != new_dev:
        owner = owner() if callable(owner) else owner
        advice = (f"move the inputs to {held_dev}, or call reset_state() first (or use one "
                  "metric per device)." if metric else
                  f"every batch must be on one device. Move the batches to {held_dev}.")
        raise ValueError(
            f"{owner} holds {held_lib} state on device {held_dev} but {what} gave arrays on "
            f"device {new_dev}; {advice}"
        )


def traced(x: Any) -> bool:
    """True for an abstract value of a tracing transformation: a JAX tracer (``jax.jit``,
    ``jax.grad``, ``jax.vmap``) or a tensor wrapped by a ``torch.func`` transform (``vmap``,
    ``grad``). It exists only while the transformed function runs, so a running state must
    never hold one (a compiled function would not update it again, and the next eager use
    would meet an escaped tracer or wrapper).

    Runs on every metric update: the answer for ``type(x)`` is looked up once per type
    (:data:`_TRACED_BY_TYPE`), so a call costs a dict lookup (and, for a torch tensor,
    torch's own C check for a ``torch.func`` wrapper)."""
    if compiling():  # torch.compile traces Python state faithfully; no cache read there
        return False
    tp = type(x)
    rule = _TRACED_BY_TYPE.get(tp)
    if rule is None:
        rule = _TRACED_BY_TYPE.setdefault(tp, traced_rule(tp))
    return rule if isinstance(rule, bool) else bool(rule(x))


_TRACED_BY_TYPE: dict[type, bool | Callable[[Any], Any]] = {}
"""Per array type: ``True`` (every instance is a tracer), ``False`` (none is) or the check
that answers per instance (torch's: a ``torch.func`` wrapper is a plain ``torch.Tensor``).
A type is classified once, when first seen: a tracer type or a tensor type exists only once
its library is imported, so nothing imported later changes an entry."""

def safe_divide(xp: ModuleType, num: Any, den: Any) -> Any:
    """``num / den``, and 0 where ``den`` is 0 (Keras' ``divide_no_nan``), lazily."""
    zero = den == 0
    return xp.where(zero, xp.zeros_like(num), num / xp.where(zero, xp.ones_like(den), den))


def metric_dtype(dtype: Any, *, owner: str) -> str:
    """A metric's ``dtype`` argument as a name: ``None`` and ``float`` are ``"float32"``; names, Keras
    ``DTypePolicy`` objects and configs (``"mixed_..."`` gives the compute dtype) and any
    library's dtype object are accepted. ``owner`` starts the message of the ``ValueError``."""
    if dtype is None or dtype is float:  # Python's float: float32, as in Keras (not NumPy's float64)
        return "float32"
    given = dtype
    if isinstance(dtype, dict):  # Keras 3 DTypePolicy config: its name, nothing else
        config = dtype.get("config", {})
        dtype = config.get("name", "float32") if isinstance(config, dict) else None
        if not isinstance(dtype, str):
            raise ValueError(f"{owner} dtype must be one of {', '.join(FLOAT_NAMES)} (or a Keras "
                             f"DTypePolicy config naming one); got {given!r}.")
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


def named_dtype(xp: ModuleType, name: str) -> Any:
    """The floating dtype called ``name`` in namespace ``xp``, or ``None`` where it has none.

    Dask's (and NumPy's) dtypes are NumPy's: float16 is one even where the array-API wrapper
    does not name it (it is not in the standard). bfloat16 is none of NumPy's own."""
    dtype = getattr(xp, name, None)
    if dtype is None and name != "bfloat16" and library(xp).numpy_dtypes:
        dtype = np.dtype(name)
    return dtype


def qualified(tp: type) -> str:
    """``module.QualName`` of a class (``kldiv.losses.KLDivergence``, ``numpy.ndarray``, ``int``)."""
    plain = getattr(tp, "_kldiv_class", tp)  # a Keras-aware class: its kldiv class
    module = getattr(plain, "__module__", "") or ""
    name = getattr(plain, "__qualname__", getattr(plain, "__name__", repr(plain)))
    return name if module == "builtins" else f"{module}.{name}"
