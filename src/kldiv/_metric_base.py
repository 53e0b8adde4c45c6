"""The metrics' common base: a weighted running mean of per-sample values, and its divergence
flavour.

:class:`RunningMean` is the engine every kldiv metric shares: the state (a total and a count,
:class:`kldiv._accumulate.RunningSum`, in the first batch's library and on its device, float64
where the library has it there), ``result``, ``reset_state``, ``merge_state`` (metrics of the
same class and the same options only), ``repr`` and pickling (through
:func:`kldiv._metric_restore.restore_metric`); its name, dtype and ``get_config``/``from_config``
are :class:`kldiv._metric_config.MetricConfig`'s.
A subclass says what one batch adds (``update_state``, through :meth:`RunningMean._add`) and
which options it has (:meth:`RunningMean._options`, :meth:`RunningMean.get_config`).

:class:`DivergenceMetric` is the mean of one member of the divergence family
(:mod:`kldiv._divergence`) with its options (``inputs``, ``temperature``, the member's
parameters), computed exactly as the loss classes compute it. Created while a Keras is
imported it is also a ``keras.metrics.Metric`` (:mod:`kldiv._keras.metric`): a ``MeanMetricWrapper``
of the member's public function with those options. The public classes are in
:mod:`kldiv.metrics`; :class:`kldiv.metrics.KLEstimator` uses :class:`RunningMean` too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from ._accumulate import (
    RunningSum,
    batch_sums,
    cast_result,
    check_same_place,
    named_dtype,
    running_sums,
    safe_divide,
    traced,
)
from ._dispatch import Call, resolve
from ._divergence import Divergence
from ._keras import (
    called_by_keras_deserialize,
    called_by_keras_wrapper,
    called_by_tf_keras_compile,
    keras_mask,
    keras_masked_weight,
    metric_class,
)
from ._metric_config import MetricConfig
from ._metric_restore import public_name, restore_metric
from ._namespace import array_namespace, get_device, namespace_name, numpy_result

__all__ = ["DivergenceMetric", "RunningMean"]

_M = TypeVar("_M", bound="RunningMean")


class RunningMean(MetricConfig):
    """A running, weighted mean of per-sample values: ``total / count`` over every update.

    Subclasses set :attr:`_CONFIG_KEYS` (what :meth:`from_config` accepts, see
    :class:`kldiv._metric_config.MetricConfig`), implement
    ``update_state`` (adding one batch with :meth:`_add`), :meth:`_options` (what must agree
    for :meth:`merge_state`) and :meth:`get_config` when they have options.
    """

    # True for a metric that lives for one call only (evaluate_batches(metric=True)): its state
    # cannot outlive a jax.jit trace, so traced batches are no error there.
    _kldiv_transient: bool = False

    name: str
    dtype: Any
    _total: RunningSum | None
    _count: RunningSum | None

    def _kldiv_init(self, name: str, dtype: Any) -> None:
        """Validate and set the name and dtype; no state (the Keras-aware class overrides this
        to initialise Keras' metric instead)."""
        cls = type(self)
        self.name = cls._named(name)
        self.dtype = cls._normalize_dtype(dtype)
        self._total = None
        self._count = None

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
        if called_by_tf_keras_compile():
            # tf.keras checks a compiled metric's variables are TensorFlow's; it wraps this one
            # (created before tf.keras was imported) and keeps the state in the wrapper
            return []
        return [self._total.total(), self._count.total()]

    def running_total(self) -> Any:
        """The running ``total`` (``sum(w * value)`` over every update, compensation folded in):
        a 0-d array of the state's library and device, in the accumulator dtype; ``None``
        before any update (and while Keras' variables hold the state)."""
        return None if self._total is None else self._total.total()

    def _add(self, xp: Any, total: Any, count: Any) -> None:
        """Add one batch's ``total`` (a 0-d array in the accumulator dtype) and ``count`` (the
        same, or an int): the first batch creates the state in its library and on its device."""
        if traced(total) and not self._kldiv_transient:
            fn = getattr(type(self), "_function", None)
            function = f"kldiv.{fn.__name__}" if fn is not None else "a kldiv function"
            raise TypeError(
                f"{self._owner()}.update_state was called with traced arrays (under jax.jit, "
                "jax.grad, jax.vmap or a torch.func transform): the metric keeps its state in "
                "Python, which a compiled function would not update again. Inside a "
                f"transformation use the function ({function}) and sum its result, or update "
                "the metric eagerly."
            )
        if self._total is None or self._count is None:
            self._total, self._count = running_sums(total, count, xp)
            return
        check_same_place(self._total.value, total, what="update_state", owner=self._describe)
        self._total.add(total)
        self._count.add(count)

    def result(self) -> Any:
        """``total / count`` (0 when the count is 0): a 0-d array of the state's library (on
        NumPy a NumPy scalar, as every reduced NumPy result of kldiv).

        The value stays on the state's device (lazy for Dask) in the metric's ``dtype``; read
        it with ``float(...)`` (or ``.compute()`` for Dask) when needed.
        """
        # the attribute may have been set after construction (a library's dtype object)
        name = self._dtype_name()
        if self._total is None or self._count is None:
            return np.asarray(0.0, dtype=np.dtype(name if name != "bfloat16" else "float32"))[()]
        total, count = self._total.total(), self._count.total()
        xp = array_namespace(total)
        out = safe_divide(xp, total, count)
        dtype = named_dtype(xp, name)
        if dtype is None:  # e.g. bfloat16 in NumPy, float16 in array-api-strict
            dtype = xp.float32
        elif name == "float64" and out.dtype != xp.float64:  # no float64 here
            dtype = out.dtype
        return numpy_result(cast_result(xp, out, dtype))

    def reset_state(self) -> None:
        """Forget every update: the metric is as new (and has no library or device)."""
        self._total = None
        self._count = None

    def reset_states(self) -> None:
        """Keras 2's older name of :meth:`reset_state`."""
        self.reset_state()

    def merge_state(self, *others: Any) -> None:
        """Add the states of other metrics of this class and these options (e.g. workers'
        partial results).

        Metrics with no update are skipped; if this one has none, it takes the first other
        state as its own. The states must be of one library and device; every one is checked
        before any is added, so a merge that raises leaves this metric as it was.

        Raises
        ------
        TypeError
            If an argument is not a metric of this class (the message names both classes
            fully: the loss ``kldiv.losses.KLDivergence`` is not a metric), holds another
            library, or holds its state in Keras variables.
        ValueError
            If its options differ (its mean is of other numbers), or its state is on another
            device.
        """
        self._check_mergeable(others)
        for other in others:
            if getattr(other, "_kldiv_mode", None) == "keras":
                raise TypeError(
                    f"merge_state cannot add the Keras variables of {other._describe()} to "
                    f"{self._describe()}, which accumulates outside Keras. Merge metrics that "
                    "were updated the same way."
                )
        held = [o for o in others if o._total is not None and o._count is not None]
        # Every state is checked against the first one before anything is added: a merge that
        # fails leaves this metric exactly as it was (never half of the others merged).
        first = self if self._total is not None and self._count is not None else (held[0] if held else None)
        if first is not None and first._total is not None:
            owner = (self._describe() if first is self
                     else f"merge_state's first state, {first._describe()},")
            for other in held:
                if other is not first:
                    check_same_place(first._total.value, other._total.value,
                                     what=f"merge_state({other._describe()})", owner=owner)
        # Snapshots first: merging a metric with itself (or twice) adds its state as it was.
        states = [(o._total.copy(), o._count.copy()) for o in held]
        for total, count in states:
            if self._total is None or self._count is None:
                self._total, self._count = total, count
                continue
            self._total.merge(total)
            self._count.merge(count)

    def _check_mergeable(self, others: tuple[Any, ...]) -> None:
        """Every other is a metric of this class with these options, or a clear error."""
        plain = getattr(type(self), "_kldiv_class", type(self))
        for other in others:
            if not isinstance(other, plain):
                name = public_name(type(other))
                hint = " (a loss, not a metric)" if name.startswith("kldiv.losses.") else ""
                raise TypeError(f"merge_state takes {public_name(plain)} metrics, got {name}{hint}.")
            if other._options() != self._options():
                raise ValueError(
                    f"merge_state: {other._describe()} was made with other options than "
                    f"{self._describe()}: its mean is of other numbers. Merge metrics made with "
                    "the same options."
                )

    def _options(self) -> Any:
        """What two metrics must share to be merged (their per-sample values' definition)."""
        return ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Keras' ``Metric.__call__``: :meth:`update_state`, then return :meth:`result`."""
        self.update_state(*args, **kwargs)  # type: ignore[attr-defined]
        return self.result()

    # -- repr, pickling (the config: kldiv._metric_config) ------------------------------------

    def __repr__(self) -> str:
        where = "" if self._total is None else f", state on {self.library}:{self.device}"
        return f"{type(self).__name__}({self._repr_items()}{where})"

    def _kldiv_state(self) -> tuple[str | None, Any]:
        if self._total is None or self._count is None:
            return None, None
        return "plain", (self._total.copy(), self._count.copy())

    def _kldiv_set_state(self, mode: str | None, state: Any) -> None:
        if mode == "plain":
            self._total, self._count = state

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through the constructor (of the kldiv class, not a Keras-aware subclass), so
        # that it is Keras-aware exactly when the unpickling process has a Keras loaded (see
        # DivergenceMetric.__new__).
        plain = getattr(type(self), "_kldiv_class", type(self))
        return (restore_metric, (plain, self.get_config(), *self._kldiv_state()))


class DivergenceMetric(RunningMean):
    """The running, weighted mean of one divergence of the family, with its options.

    A subclass names, as class keywords, its ``member`` (:attr:`divergence`), its public
    ``function`` (:attr:`_function`, which Keras' ``MeanMetricWrapper`` calls) and its
    ``title`` (:attr:`_title`, the member in messages), and has an ``__init__`` with its
    defaults, calling ``super().__init__``.
    """

    divergence: ClassVar[Divergence]
    _function: ClassVar[Callable[..., Any]]
    _title: ClassVar[str]
    _kldiv_call: Call

    def __init_subclass__(cls, member: Divergence | None = None,
                          function: Callable[..., Any] | None = None, title: str = "",
                          **kwargs: Any) -> None:
        """``class KLDivergence(DivergenceMetric, member=KL, function=kl_divergence,
        title="KL divergence")``: the member, its public function and its name in messages
        (subclasses without them, and Keras-aware classes, inherit their base's)."""
        super().__init_subclass__(**kwargs)
        if member is not None and function is not None:
            cls.divergence, cls._title = member, title
            cls._function = staticmethod(function)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # With a Keras loaded, the instance is also a keras.metrics.Metric (see
        # kldiv._keras.metric), so that model.compile(metrics=[kldiv.metrics.KLDivergence()])
        # uses it as one.
        made = metric_class(cls)
        if made is not None:
            return made.__new__(made, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, name: str | None, dtype: Any = None, *, inputs: Any = "probs",
                 temperature: Any = 1.0, **params: Any) -> None:
        self._kldiv_call = resolve(self.divergence, inputs=inputs, temperature=temperature, **params)
        self._kldiv_init(type(self)._named(name), dtype)

    @classmethod
    def _config_keys(cls) -> tuple[str, ...]:
        return ("name", "dtype", "inputs", "temperature", *cls.divergence.params)

    # -- the options -------------------------------------------------------------------------

    @property
    def inputs(self) -> str | tuple[str, str]:
        """The input space(s): one name for both inputs, or ``(y_true's, y_pred's)``."""
        spaces = self._kldiv_call.spaces
        return spaces[0] if spaces[0] == spaces[1] else spaces

    @property
    def temperature(self) -> float:
        """What logits are divided by (1.0 without logits)."""
        return self._kldiv_call.temperature

    def _options(self) -> Any:
        call = self._kldiv_call
        return (call.spaces, call.temperature, tuple(sorted(call.params.items())))

    def _option_config(self) -> dict[str, Any]:
        """The options as config entries: the member's parameters always, ``inputs`` and
        ``temperature`` when not the defaults (so that a default KL's config is Keras'); a pair
        of spaces as a list (JSON)."""
        options: dict[str, Any] = dict(self._kldiv_call.params)
        inputs = self.inputs
        if inputs != "probs":
            options["inputs"] = inputs if isinstance(inputs, str) else list(inputs)
        if self.temperature != 1.0:
            options["temperature"] = self.temperature
        return options

    def _kldiv_function(self) -> tuple[Callable[..., Any], dict[str, Any]]:
        """The per-sample function and its keyword arguments: what each update averages, and
        what Keras' ``MeanMetricWrapper`` calls (``fn(y_true, y_pred, **kwargs)``)."""
        kwargs = self._option_config()
        if isinstance(kwargs.get("inputs"), list):
            kwargs["inputs"] = tuple(kwargs["inputs"])
        return type(self)._function, kwargs

    def _per_sample(self, y_true: Any, y_pred: Any) -> Any:
        fn, kwargs = self._kldiv_function()
        return fn(y_true, y_pred, **kwargs)

    # -- the metric API ----------------------------------------------------------------------

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Add one batch: ``sum(w * loss)`` to the total, ``sum(w)`` (or the count) to the count.

        Parameters
        ----------
        y_true, y_pred : array_like
            As for the metric's function (:func:`kldiv.kl_divergence`, ...), with Keras' rank
            rule for losses and metrics; the batch runs in ``y_pred``'s library and on its
            device, which must be those of the state (after the first update).
        sample_weight : array_like or float, optional
            Keras 2 rules: a scalar, a weight per sample (shape of the per-sample loss, or
            with a trailing axis of 1), or a weight of one rank less (scales each row). A mask
            (``labels != -100``) is a weight: the mean is then over the unmasked samples.
            A Keras mask on ``y_pred`` (the output of a masking layer) is such a weight too,
            as in Keras' metrics.
        """
        mask = keras_mask(y_pred)
        if mask is not None:
            sample_weight = keras_masked_weight(mask, sample_weight, "sum", y_pred)
        sums = batch_sums(y_true, y_pred, sample_weight, call=self._kldiv_call)
        self._add(sums.xp, sums.weighted_sum, sums.n if sums.weight_sum is None else sums.weight_sum)

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Keras' ``Metric.__call__``: :meth:`update_state`, then return :meth:`result`.

        Called by a Keras ``MeanMetricWrapper`` that wraps this metric (``compile`` does that
        with a metric created before Keras was imported), it returns the per-sample
        divergence instead, which is what the wrapper averages: Keras then computes this
        metric's running mean in its own variables.
        """
        if called_by_keras_wrapper(self):
            return self._per_sample(y_true, y_pred)
        self.update_state(y_true, y_pred, sample_weight)
        return self.result()

    # -- config ------------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """``{"name": ..., "dtype": ...}`` and the options (``inputs``/``temperature`` where not
        the defaults, the member's parameters always), as Keras saves a metric."""
        return {"name": self._config_name(), "dtype": self._dtype_name(), **self._option_config()}

    @classmethod
    def _config_arguments(cls, config: dict[str, Any]) -> dict[str, Any]:
        config = dict(config)
        fn = config.pop("fn", None)  # Keras 2 configs name the function
        div = cls.divergence
        if callable(fn):  # the function itself rather than its name
            fn = getattr(fn, "__name__", fn)
        if fn is not None and (not isinstance(fn, str) or fn not in (div.name, *div.aliases)):
            raise ValueError(f"{cls._owner()} config names function {fn!r}, not the {cls._title}.")
        return config

    @classmethod
    def from_config(cls: type[_M], config: dict[str, Any]) -> _M:
        """Rebuild a metric from :meth:`get_config` output (or a Keras 2 / Keras 3 config).

        A Keras 3 ``DTypePolicy`` dict is accepted for ``dtype``; a Keras 2 ``"fn"`` key must
        name this metric's function. Unknown keys raise ``TypeError``.

        Inside Keras' deserialization (``load_model``), a *loss* config of the same divergence
        (one with a ``"reduction"`` entry) gives that loss (``kldiv.losses.KLDivergence``, ...):
        kldiv's loss and metric share their Keras name (``"KLDivergence"``), so a saved model
        that holds both is loaded with one entry,
        ``custom_objects={"KLDivergence": kldiv.metrics.KLDivergence}``. Called directly, such a
        config is an unknown key (``TypeError``).
        """
        if isinstance(config, Mapping) and "reduction" in config:
            loss_class = _loss_class(cls)
            if loss_class is not None and called_by_keras_deserialize():
                loss: Any = loss_class.from_config(config)
                return loss
        return super().from_config(config)


def _loss_class(cls: type) -> Any:
    """``kldiv.losses``' class of the metric class ``cls``'s divergence (``None`` if none)."""
    plain = getattr(cls, "_kldiv_class", cls)
    found = getattr(sys.modules.get("kldiv.losses"), plain.__name__, None)
    if isinstance(found, type) and getattr(found, "divergence", None) is getattr(plain, "divergence", None):
        return found
    return None
