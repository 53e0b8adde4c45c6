"""Keras-style metrics: the functional aliases and the stateful :class:`KLDivergence` metric.

``kldiv.metrics.KLDivergence`` is Keras' ``metrics.KLDivergence`` (a ``MeanMetricWrapper``
of the KL divergence): a running, optionally weighted, mean of the per-sample loss over
every batch passed to :meth:`~KLDivergence.update_state`. Its state lives in the inputs' own
library and on their device, so a stream of GPU batches never waits on the host. (The loss
class is ``kldiv.KLDivergence`` / ``kldiv.losses.KLDivergence``.)

Created while Keras is imported, the metric is also a ``keras.metrics.Metric`` and works in
``model.compile(metrics=[...])``: see the class' Notes and ``kldiv._keras``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from . import _keras
from ._functional import (
    KLD,
    Prepared,
    compute,
    kl_divergence,
    kld,
    kullback_leibler_divergence,
    prepare,
)
from ._namespace import array_namespace, get_device, is_dask, namespace_name
from ._reduction import apply_sample_weight

__all__ = [
    "KLD",
    "KLDivergence",
    "KLEstimator",
    "kl_divergence",
    "kld",
    "kullback_leibler_divergence",
]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


# --------------------------------------------------------------------------------------
# Accumulation helpers (shared with kldiv._chunked)
# --------------------------------------------------------------------------------------


def has_float64(xp: ModuleType, device: Any) -> bool:
    """True when namespace ``xp`` can hold float64 arrays on ``device``.

    JAX has float64 only with ``jax_enable_x64``; torch has none on Apple's MPS; other
    libraries are asked through the array API's inspection API where they have it.
    """
    name = namespace_name(xp)
    if name == "jax":
        import jax

        try:
            return bool(jax.config.read("jax_enable_x64"))
        except Exception:  # older JAX
            return bool(getattr(jax.config, "jax_enable_x64", False))
    if name == "torch":
        return getattr(device, "type", str(device)) != "mps"
    if getattr(xp, "float64", None) is None:
        return False
    try:
        info = xp.__array_namespace_info__()
        return "float64" in info.dtypes(device=device, kind="real floating")
    except Exception:
        return True


def accumulator_dtype(xp: ModuleType, device: Any) -> Any:
    """float64 where ``xp`` has it on ``device``, else float32 (summed with compensation)."""
    return xp.float64 if has_float64(xp, device) else xp.float32


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


def _num_elements(shape: tuple[Any, ...]) -> int | None:
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


def batch_sums(y_true: Any, y_pred: Any, sample_weight: Any = None) -> BatchSums:
    """Per-sample loss of one batch (in float64 where the library has it), weighted and summed.

    Uses the same preparation, kernel and Keras 2 sample-weight rules as the loss class;
    the per-sample loss is cast to the accumulator dtype before it is weighted and summed.
    """
    prep = _detached(prepare(y_true, y_pred))
    xp = prep.xp
    acc = accumulator_dtype(xp, prep.device)
    loss = compute(prep._replace(out_dtype=acc))
    weight_sum = None
    if sample_weight is not None:
        loss, w = apply_sample_weight(xp, loss, sample_weight)
        shape = tuple(loss.shape)
        if _num_elements(shape) is None:
            weight_sum = xp.sum(w * xp.ones_like(loss))
        else:
            weight_sum = xp.sum(xp.broadcast_to(w, shape))
    n: Any = _num_elements(tuple(loss.shape))
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


def _dtype_name(dtype: Any) -> str:
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
    if name not in _FLOAT_NAMES:
        raise ValueError(
            f"{_METRIC} dtype must be one of {', '.join(_FLOAT_NAMES)} (or a Keras 'mixed_...' "
            f"policy); got {given!r}."
        )
    return name


_METRIC = "kldiv.metrics.KLDivergence"


def _qualified(tp: type) -> str:
    """``module.QualName`` of a class (``kldiv.losses.KLDivergence``, ``numpy.ndarray``, ``int``)."""
    plain = getattr(tp, "_kldiv_class", tp)  # a Keras-aware class: its kldiv class
    module = getattr(plain, "__module__", "") or ""
    name = getattr(plain, "__qualname__", getattr(plain, "__name__", repr(plain)))
    return name if module == "builtins" else f"{module}.{name}"


def _restore_metric(cls: Any, config: dict[str, Any], mode: str | None, state: Any) -> Any:
    """Unpickle (or deep-copy) a metric: constructed anew, so it is Keras-aware exactly when a
    Keras is loaded here, then given its state (Keras variables' values become kldiv's own
    NumPy float64 state in a process without Keras)."""
    obj = cls.from_config(config)
    if mode == "keras" and not hasattr(obj, "_kldiv_keras_engine"):
        total, count = (np.asarray(v, dtype=np.float64) for v in state)
        mode, state = "plain", (RunningSum(total, False), RunningSum(count, False))
    obj._kldiv_set_state(mode, state)
    return obj


# --------------------------------------------------------------------------------------
# The metric
# --------------------------------------------------------------------------------------


class KLDivergence:
    """Keras' ``metrics.KLDivergence``: a running (weighted) mean of the KL divergence.

    Each :meth:`update_state` computes the per-sample loss ``sum(t * log(t / p), axis=-1)``
    (both inputs clipped to ``[1e-7, 1]``), weights it by ``sample_weight`` (Keras 2 rules,
    as for the loss class), and adds ``sum(w * loss)`` to a total and ``sum(w)`` (without
    weights: the number of per-sample losses) to a count. :meth:`result` is
    ``total / count``, 0 while the count is 0.

    The state lives in the first batch's library (``y_pred``'s) and on its device, as 0-d
    arrays: an update never reads anything back to the host, and a Dask batch keeps the
    state lazy. It is accumulated in float64 where the library has it on that device
    (JAX with ``jax_enable_x64``, everything but torch on MPS), else in float32 with
    compensated (Neumaier) summation, so a stream of millions of rows loses no precision.

    Parameters
    ----------
    name : str, default "kullback_leibler_divergence"
        The metric's name (Keras 2's default).
    dtype : str or dtype, default "float32"
        The dtype of :meth:`result` (Keras' metric dtype): ``"float32"``, ``"float64"``,
        ``"float16"`` or ``"bfloat16"``. Accumulation is in float64 regardless, where the
        library has it; without float64, a ``"float64"`` result is float32.

    Raises
    ------
    TypeError
        From :meth:`update_state` or :meth:`merge_state` when a batch or another metric is
        of a different library than the state held; ``ValueError`` when it is on a
        different device.

    See Also
    --------
    kldiv.losses.KLDivergence : the loss class (reductions instead of a running mean).
    kldiv.evaluate_files : the metric (or loss) over ``.npy`` files, in bounded memory.

    Notes
    -----
    Before the first update the metric has no library: :meth:`result` then returns a NumPy
    0-d array holding 0. Under ``jax.jit`` use the functional ``kldiv.kld`` and sum the
    result yourself: the metric is an eager, stateful Python object.

    **In Keras.** Created while a Keras is imported (Keras 3 on any backend, or tf.keras 2
    through ``tf_keras``; kldiv never imports Keras itself), the metric is also a
    ``keras.metrics.Metric``: a ``MeanMetricWrapper`` of :func:`kldiv.kl_divergence`, as
    ``keras.metrics.KLDivergence`` is one of Keras' own function. So
    ``model.compile(metrics=[kldiv.metrics.KLDivergence()])`` (or ``weighted_metrics=``) logs
    Keras' numbers batch for batch, in ``fit`` and ``evaluate``, compiled or eagerly. Once
    Keras drives it (``compile``'s symbolic build, a compiled step, the ``stateless_*`` API, a
    TensorFlow graph, or TensorFlow tensors while Keras runs on TensorFlow), its state is two
    Keras variables updated with ``assign_add`` (stateless under ``jax.jit`` in Keras' JAX
    trainer), and it stays so; what it had accumulated before moves into them (except inside
    the symbolic build, where Keras resets its metrics anyway). Before that it is the metric
    described above, so a process where Keras is merely loaded (``import tensorflow`` loads
    Keras 3) keeps kldiv's behaviour: ``variables`` is empty until the first update (a custom
    JAX loop may pass that empty list to ``stateless_update_state``). tf.keras takes the
    metric over at ``compile``.

    Created *before* Keras is imported, the metric is kldiv's own. ``compile`` then wraps it in
    Keras' ``MeanMetricWrapper``, which calls it as a per-sample function: the metric
    recognises that caller and returns the per-sample divergence, so the logged values are
    the same (the state is then the wrapper's, and this object is left untouched). The same
    holds for a metric of one Keras given to the other (tf-keras wins when both are loaded).

    The default name is Keras 2's ``"kullback_leibler_divergence"`` (Keras 3 names its own
    ``"kl_divergence"``); ``get_config()`` is ``{"name": ..., "dtype": ...}`` either way, and
    a pickled metric is rebuilt through the constructor, with its state.

    Examples
    --------
    >>> import numpy as np
    >>> from kldiv.metrics import KLDivergence
    >>> y_true = np.array([[0, 1], [0, 0]], dtype=np.float32)
    >>> y_pred = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)
    >>> m = KLDivergence()
    >>> m.update_state(y_true, y_pred, sample_weight=[1, 0])
    >>> print(m.result())
    0.9162892
    >>> m.update_state(y_true, y_pred)
    >>> print(m.result())
    0.61085844
    >>> m.get_config()
    {'name': 'kullback_leibler_divergence', 'dtype': 'float32'}
    >>> m.reset_state()
    >>> print(m.result())
    0.0

    Partial results of several workers combine with :meth:`merge_state`:

    >>> a, b = KLDivergence(), KLDivergence()
    >>> a.update_state(y_true[:1], y_pred[:1])
    >>> b.update_state(y_true[1:], y_pred[1:])
    >>> a.merge_state(b)
    >>> print(a.result())
    0.45814306
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> KLDivergence:
        # With a Keras loaded, the instance is also a keras.metrics.Metric (see kldiv._keras),
        # so that model.compile(metrics=[kldiv.metrics.KLDivergence()]) uses it as one.
        made = _keras.metric_class(cls)
        if made is not None:
            return made.__new__(made, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, name: str = "kullback_leibler_divergence", dtype: Any = None) -> None:
        self._check_name(name)
        self.name = name
        self.dtype = self._normalize_dtype(dtype)
        self._total: RunningSum | None = None
        self._count: RunningSum | None = None

    @staticmethod
    def _check_name(name: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"{_METRIC} name must be a str, got {_qualified(type(name))}.")

    _normalize_dtype = staticmethod(_dtype_name)

    # what each update averages; Keras' MeanMetricWrapper averages it too (kldiv._keras)
    _per_sample = staticmethod(kl_divergence)

    def _describe(self) -> str:
        """``kldiv.metrics.KLDivergence(name=...)``: unambiguous in messages (the loss class is
        also called ``KLDivergence``)."""
        return f"{_qualified(type(self))}{repr(self)[len(type(self).__name__):]}"

    # -- state ---------------------------------------------------------------------------

    @property
    def library(self) -> str | None:
        """The library holding the state (``"torch"``, ``"jax"``, ...), ``None`` before any update."""
        return None if self._total is None else namespace_name(array_namespace(self._total.value))

    @property
    def device(self) -> Any:
        """The device holding the state, ``None`` before any update."""
        return None if self._total is None else get_device(self._total.value)

    @property
    def variables(self) -> list[Any]:
        """The state arrays ``[total, count]`` (compensation folded in); empty before any update."""
        if self._total is None or self._count is None:
            return []
        if _keras.called_by_tf_keras_compile():
            # tf.keras checks a compiled metric's variables are TensorFlow's; it wraps this one
            # (created before tf.keras was imported) and keeps the state in the wrapper
            return []
        return [self._total.total(), self._count.total()]

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Add one batch: ``sum(w * loss)`` to the total, ``sum(w)`` (or the count) to the count.

        Parameters
        ----------
        y_true, y_pred : array_like
            As for :func:`kldiv.kl_divergence`; the batch runs in ``y_pred``'s library and
            on its device, which must be those of the state (after the first update).
        sample_weight : array_like or float, optional
            Keras 2 rules: a scalar, a weight per sample (shape of the per-sample loss, or
            with a trailing axis of 1), or a weight of one rank less (scales each row).
        """
        sums = batch_sums(y_true, y_pred, sample_weight)
        total = sums.weighted_sum
        count = sums.n if sums.weight_sum is None else sums.weight_sum
        if self._total is None or self._count is None:
            compensated = total.dtype != sums.xp.float64
            self._total = RunningSum(total, compensated)
            if not hasattr(count, "shape"):
                count = sums.xp.zeros_like(total) + count
            self._count = RunningSum(count, compensated)
            return
        check_same_place(self._total.value, total, what="update_state", owner=self._describe())
        self._total.add(total)
        self._count.add(count)

    def result(self) -> Any:
        """``total / count`` (0 when the count is 0): a 0-d array of the state's library.

        The value stays on the state's device (lazy for Dask) in the metric's ``dtype``; read
        it with ``float(...)`` (or ``.compute()`` for Dask) when needed.
        """
        if self._total is None or self._count is None:
            return np.asarray(0.0, dtype=np.dtype(self.dtype if self.dtype != "bfloat16" else "float32"))
        total, count = self._total.total(), self._count.total()
        xp = array_namespace(total)
        out = safe_divide(xp, total, count)
        dtype = getattr(xp, self.dtype, None)
        if dtype is None:  # e.g. bfloat16 in NumPy
            dtype = xp.float32
        elif self.dtype == "float64" and out.dtype != xp.float64:  # no float64 here
            dtype = out.dtype
        return out if out.dtype == dtype else xp.astype(out, dtype)

    def reset_state(self) -> None:
        """Forget every update: the metric is as new (and has no library or device)."""
        self._total = None
        self._count = None

    reset_states = reset_state  # Keras 2's older name

    def merge_state(self, *others: KLDivergence) -> None:
        """Add the states of other ``KLDivergence`` metrics (e.g. workers' partial results).

        Metrics with no update are skipped; if this one has none, it takes the first other
        state as its own. The states must be of one library and device.

        Raises
        ------
        TypeError
            If an argument is not a ``kldiv.metrics.KLDivergence`` (the message names the fully
            qualified class: the loss ``kldiv.losses.KLDivergence`` is not a metric), holds
            another library, or holds its state in Keras variables.
        ValueError
            If a state is on another device.
        """
        self._check_mergeable(others)
        for other in others:
            if getattr(other, "_kldiv_mode", None) == "keras":
                raise TypeError(
                    f"merge_state cannot add the Keras variables of {other._describe()} to "
                    f"{self._describe()}, which accumulates outside Keras. Merge metrics that "
                    "were updated the same way."
                )
        for other in others:
            if other._total is None or other._count is None:
                continue
            if self._total is None or self._count is None:
                self._total, self._count = other._total.copy(), other._count.copy()
                continue
            check_same_place(self._total.value, other._total.value,
                             what=f"merge_state({other._describe()})", owner=self._describe())
            self._total.merge(other._total)
            self._count.merge(other._count)

    @staticmethod
    def _check_mergeable(others: tuple[Any, ...]) -> None:
        for other in others:
            if not isinstance(other, KLDivergence):
                hint = (" (a loss, not a metric)" if _qualified(type(other)) == "kldiv.losses.KLDivergence"
                        else "")
                raise TypeError(
                    f"merge_state takes {_METRIC} metrics, got {_qualified(type(other))}{hint}."
                )

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Keras' ``Metric.__call__``: :meth:`update_state`, then return :meth:`result`.

        Called by a Keras ``MeanMetricWrapper`` that wraps this metric (``compile`` does that
        with a metric created before Keras was imported), it returns the per-sample KL
        divergence instead, which is what the wrapper averages: Keras then computes this
        metric's running mean in its own variables.
        """
        if _keras.called_by_keras_wrapper(self):
            return self._per_sample(y_true, y_pred)
        self.update_state(y_true, y_pred, sample_weight)
        return self.result()

    # -- config --------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """``{"name": ..., "dtype": ...}``, as Keras saves a metric."""
        return {"name": self.name, "dtype": self.dtype}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KLDivergence:
        """Rebuild a metric from :meth:`get_config` output (or a Keras 2 / Keras 3 config).

        A Keras 3 ``DTypePolicy`` dict is accepted for ``dtype``; a Keras 2 ``"fn"`` key must
        name the KL divergence. Unknown keys raise ``TypeError``.
        """
        config = dict(config)
        fn = config.pop("fn", None)
        if fn is not None and fn not in {"kl_divergence", "kld", "KLD", "kullback_leibler_divergence"}:
            raise ValueError(f"{_METRIC} config names function {fn!r}, not the KL divergence.")
        unknown = set(config) - {"name", "dtype"}
        if unknown:
            raise TypeError(f"Unknown {_METRIC} config keys: {sorted(unknown)}.")
        return cls(**config)

    def __repr__(self) -> str:
        where = "" if self._total is None else f", state on {self.library}:{self.device}"
        return f"{type(self).__name__}(name={self.name!r}, dtype={self.dtype!r}{where})"

    # -- pickling --------------------------------------------------------------------------

    def _kldiv_state(self) -> tuple[str | None, Any]:
        if self._total is None or self._count is None:
            return None, None
        return "plain", (self._total.copy(), self._count.copy())

    def _kldiv_set_state(self, mode: str | None, state: Any) -> None:
        if mode == "plain":
            self._total, self._count = state

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through the constructor, so that it is Keras-aware exactly when the
        # unpickling process has a Keras loaded (see __new__).
        return (_restore_metric, (type(self), self.get_config(), *self._kldiv_state()))


from ._estimator_metric import KLEstimator  # noqa: E402  (reads kldiv.metrics at call time)
