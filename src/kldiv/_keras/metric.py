"""Keras interop for the metrics: a ``kldiv.metrics.KLDivergence`` (or ``ReverseKLDivergence``,
``JensenShannonDivergence``) that is a ``keras.metrics.Metric``.

kldiv never imports Keras: everything here looks in ``sys.modules``. When a metric is created
while a Keras is loaded, :func:`metric_class` gives the class it is made of: kldiv's metric
class that also subclasses that Keras' ``MeanMetricWrapper`` (so ``model.compile(metrics=[...])``
takes it as a metric, and Keras' logs, callbacks and saving see a Keras metric).

Such a metric has two engines, because Keras being loaded does not mean Keras is using it
(``import tensorflow`` loads Keras 3, for instance):

- **Keras' own**: state in Keras variables, updated with ``assign_add`` (stateless under JAX
  tracing, graph-safe under ``tf.function``), exactly ``keras.metrics.KLDivergence``'s
  ``MeanMetricWrapper`` arithmetic with kldiv's per-sample function (the metric's member of
  the divergence family, its options passed as the wrapper's ``fn`` keyword arguments). Used once Keras drives the
  metric: under a Keras stateless or symbolic scope (``compile``'s symbolic build on every
  Keras 3 backend, the JAX trainer's stateless steps), any ``stateless_*`` call, an update in
  a TensorFlow graph (compiled steps on TensorFlow, tf.keras' ``fit``) or with Keras symbolic
  tensors, or an update with TensorFlow tensors while Keras runs on TensorFlow (Keras 3 with
  ``run_eagerly=True`` calls its metrics eagerly). From then on the metric stays a Keras metric
  (Keras keeps references to its variables); what kldiv's engine had accumulated moves into
  the variables, as a Keras metric keeps what it was given, except inside a Keras scope, where
  no variable can be written (the symbolic build: Keras resets its metrics afterwards anyway).
- **kldiv's own** (:class:`kldiv.metrics.KLDivergence` without Keras): state in the inputs'
  library and device, float64 accumulation. Used for updates outside Keras, until Keras drives
  the metric.

A metric created before any Keras was imported is a plain kldiv metric. Keras' ``compile``
wraps a callable that is not a ``Metric`` in its own ``MeanMetricWrapper``, which calls it as
``fn(y_true, y_pred)`` for per-sample values: :func:`called_by_keras_wrapper` recognises that
caller, and the metric then answers with its per-sample divergence, so Keras' wrapper
computes the same running mean (in Keras variables) either way.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any

from .._namespace import get_device
from .detect import (
    TF_BACKEND,
    called_by_keras_wrapper,
    called_by_tf_keras_compile,
    graph_module,
    host_float,
    in_graph,
    in_keras_scope,
    is_tf_tensor,
    loaded_keras,
)
from .registry import METRIC_PACKAGE, register_class

__all__ = ["metric_class"]


def _holds_keras(metric: Any) -> bool:
    return getattr(metric, "_kldiv_mode", None) == "keras"


# ---- the Keras-aware metric class ------------------------------------------------------------

_CLASSES: dict[tuple[type, type], type] = {}


def metric_class(cls: type) -> type | None:
    """``cls`` (kldiv's metric class) made a subclass of the loaded Keras' ``MeanMetricWrapper``.

    ``cls`` (a :class:`kldiv._metric_base.DivergenceMetric`) provides the plain engine
    (``update_state``, ``result``, ``reset_state``, ``merge_state``, ``variables``,
    ``library``, ``device``, ``get_config``/``from_config``, ``_kldiv_state``/``_kldiv_set_state``),
    ``_kldiv_init(name, dtype)`` (called by its ``__init__`` once its options are set),
    ``_kldiv_function()`` (the per-sample function Keras' wrapper averages and its keyword
    arguments) and ``_per_sample``, plus the helpers ``_check_name``, ``_normalize_dtype``,
    ``_check_mergeable``, ``_describe`` and ``_repr_items``.

    ``None`` without a loaded Keras, or when ``cls`` already is such a class. The class has
    ``cls``'s name, module and docstring, and is cached per (``cls``, Keras).
    """
    if getattr(cls, "_kldiv_keras", None) is not None:
        return None
    found = loaded_keras()
    if found is None:
        return None
    module, major = found
    base = module.metrics.MeanMetricWrapper
    made = _CLASSES.get((cls, base))
    if made is None:
        mixin = _Keras3Metric if major >= 3 else _Keras2Metric
        namespace = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "_kldiv_class": cls,
            "_kldiv_keras": module,
        }
        made = _CLASSES[(cls, base)] = type(cls.__name__, (mixin, base, cls), namespace)
        register_class(made, METRIC_PACKAGE)  # saved as "kldiv.metrics>ClassName"
    return made


class _KerasMetric:
    """What the Keras-aware metric adds to Keras' ``MeanMetricWrapper`` and kldiv's metric.

    The MRO is ``(this, Keras' MeanMetricWrapper ..., kldiv's metric class)``: the methods here
    choose an engine and call Keras' (through ``super()``) or kldiv's (through ``_kldiv_class``).
    ``_kldiv_mode`` is ``None`` (no state), ``"plain"`` (kldiv's state) or ``"keras"`` (for good).
    """

    _kldiv_class: Any  # kldiv's metric class (set on the made class)
    _kldiv_keras: ModuleType  # the Keras module (set on the made class)
    _kldiv_mode: str | None
    _total: Any
    _count: Any
    name: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # kldiv's __init__ (the class' defaults, its options validated and set), which ends in
        # _kldiv_init below (not in Keras' __init__, which is next in the MRO)
        self._kldiv_class.__init__(self, *args, **kwargs)

    def _kldiv_init(self, name: str, dtype: Any) -> None:
        plain = self._kldiv_class
        plain._check_name(name)
        self._kldiv_keras_init(name=name, dtype=plain._normalize_dtype(dtype))
        self._kldiv_mode = None
        self._total = None
        self._count = None

    # -- flavour hooks (Keras 3 / Keras 2) -----------------------------------------------------

    def _kldiv_keras_init(self, name: str, dtype: str) -> None:
        raise NotImplementedError

    def _kldiv_keras_result(self) -> Any:
        return super().result()  # type: ignore[misc]

    def _kldiv_keras_library(self) -> str:
        raise NotImplementedError

    # -- engine choice ---------------------------------------------------------------------------

    def _kldiv_to_keras(self) -> None:
        """Keras' engine from now on (for good: Keras keeps references to its variables).

        What kldiv's engine had accumulated moves into the Keras variables, as a Keras metric
        keeps what it was given; inside a Keras stateless or symbolic scope no variable can be
        written, and it is dropped: that is ``compile``'s symbolic build, after which Keras
        resets the metric before fitting or evaluating, as it does its own.
        """
        if self._kldiv_mode == "keras":
            return
        held = self._kldiv_class._kldiv_state(self)[1]
        self._kldiv_mode = "keras"
        self._total = self._count = None
        if held is not None and not in_keras_scope():
            self._kldiv_keras_add([host_float(s.total()) for s in held])

    def _kldiv_keras_add(self, values: list[float]) -> None:
        """``assign_add`` host numbers ``[total, count]`` to the Keras variables, eagerly (also
        from inside a ``tf.function`` being traced: once, not at every call of the graph)."""
        tf = graph_module()
        scope = tf.init_scope() if tf is not None else contextlib.nullcontext()
        with scope:
            for variable, value in zip(super().variables, values, strict=True):  # type: ignore[misc]
                variable.assign_add(value)

    def _kldiv_keras_engine(self, *arrays: Any, updating: bool = True) -> bool:
        """Whether Keras' engine serves this call (switching to it when Keras drives the call)."""
        if self._kldiv_mode == "keras":
            return True
        if in_keras_scope() or (updating and self._kldiv_keras_wants(arrays)):
            self._kldiv_to_keras()
            return True
        return False

    def _kldiv_keras_wants(self, arrays: tuple[Any, ...]) -> bool:
        """An update for Keras' engine: one in a TensorFlow graph (kldiv's state cannot live
        there), or of TensorFlow tensors while Keras runs on TensorFlow (Keras 3's TensorFlow
        backend calls its metrics eagerly with them when ``run_eagerly=True``)."""
        return in_graph(*arrays) or (self._kldiv_on_tensorflow() and is_tf_tensor(arrays[1:2]))

    def _kldiv_on_tensorflow(self) -> bool:
        return True

    # -- the metric API --------------------------------------------------------------------------

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        if self._kldiv_keras_engine(y_true, y_pred, sample_weight):
            return super().update_state(y_true, y_pred, sample_weight=sample_weight)  # type: ignore[misc]
        self._kldiv_class.update_state(self, y_true, y_pred, sample_weight)
        self._kldiv_mode = "plain"
        return None

    def result(self) -> Any:
        if self._kldiv_keras_engine(updating=False):
            return self._kldiv_keras_result()
        return self._kldiv_class.result(self)

    def reset_state(self) -> None:
        if self._kldiv_keras_engine(updating=False):
            super().reset_state()  # type: ignore[misc]
            return
        self._kldiv_class.reset_state(self)
        self._kldiv_mode = None

    def reset_states(self) -> None:
        self.reset_state()

    reset_states._is_default = True  # type: ignore[attr-defined]  # tf.keras: not an override

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        if called_by_keras_wrapper(self):
            return self._per_sample(y_true, y_pred)  # type: ignore[attr-defined]
        if self._kldiv_keras_engine(y_true, y_pred, sample_weight):
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)  # type: ignore[misc]
        self.update_state(y_true, y_pred, sample_weight)
        return self.result()

    @property
    def variables(self) -> list[Any]:
        if self._kldiv_mode == "keras":
            return list(super().variables)  # type: ignore[misc]
        return self._kldiv_class.variables.fget(self)

    @property
    def library(self) -> str | None:
        if self._kldiv_mode == "keras":
            return self._kldiv_keras_library()
        return self._kldiv_class.library.fget(self)

    @property
    def device(self) -> Any:
        if self._kldiv_mode == "keras":
            try:
                return get_device(self._kldiv_keras_values()[0])
            except Exception:
                return None
        return self._kldiv_class.device.fget(self)

    def _kldiv_keras_values(self) -> list[Any]:
        """The current values of the Keras variables ``[total, count]``, as tensors."""
        return [getattr(v, "value", v) for v in super().variables]  # type: ignore[misc]

    def merge_state(self, *others: Any) -> Any:
        """Add other metrics' states. Keras 2's form, one list of metrics, is accepted too.

        Metrics that all hold kldiv's state merge as kldiv's metric does. Once one of them
        holds Keras variables, every state is added to this metric's Keras variables.
        """
        if len(others) == 1 and isinstance(others[0], (list, tuple)):
            others = tuple(others[0])
        plain = self._kldiv_class
        plain._check_mergeable(self, others)
        if self._kldiv_mode != "keras" and not any(_holds_keras(o) for o in others):
            return plain.merge_state(self, *others)
        self._kldiv_to_keras()
        for other in others:
            if _holds_keras(other):
                self._kldiv_keras_add([float(v) for v in other._kldiv_state()[1]])
            elif other._total is not None:
                self._kldiv_keras_add([host_float(s.total()) for s in (other._total, other._count)])
        return None

    # -- config, copies, repr --------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return self._kldiv_class.get_config(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        return cls._kldiv_class.from_config.__func__(cls, config)

    def _kldiv_state(self) -> tuple[str | None, Any]:
        if self._kldiv_mode == "keras":
            import numpy as np

            return "keras", [np.asarray(self._kldiv_keras_numpy(v)) for v in super().variables]  # type: ignore[misc]
        if self._total is None:
            return None, None
        return "plain", (self._total.copy(), self._count.copy())

    def _kldiv_keras_numpy(self, variable: Any) -> Any:
        raise NotImplementedError

    def _kldiv_set_state(self, mode: str | None, state: Any) -> None:
        if mode == "keras":
            self._kldiv_to_keras()
            for v, value in zip(super().variables, state, strict=True):  # type: ignore[misc]
                v.assign(value)
        elif mode == "plain":
            self._total, self._count = state
            self._kldiv_mode = "plain"

    def __reduce__(self) -> tuple[Any, ...]:
        # kldiv's (rebuilt through the constructor, with this engine's state), not Keras'
        return self._kldiv_class.__reduce__(self)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        restore, args = self.__reduce__()
        new = restore(*args)
        memo[id(self)] = new
        return new

    def __repr__(self) -> str:
        if self._kldiv_mode == "keras":
            return (f"{type(self).__name__}({self._repr_items()}, "  # type: ignore[attr-defined]
                    f"state in {self._kldiv_keras.__name__} variables)")
        return self._kldiv_class.__repr__(self)

    __str__ = __repr__


class _Keras3Metric(_KerasMetric):
    """Keras 3: ``stateless_*`` calls (the JAX trainer) and its scopes drive the metric."""

    def _kldiv_keras_init(self, name: str, dtype: str) -> None:
        fn, kwargs = self._kldiv_function()  # type: ignore[attr-defined]
        super(_KerasMetric, self).__init__(fn=fn, name=name, dtype=dtype, **kwargs)  # type: ignore[call-arg]
        self._direction = "down"  # a divergence: lower is better (EarlyStopping's "auto" mode)

    def _kldiv_keras_library(self) -> str:
        return str(self._kldiv_keras.backend.backend())

    def _kldiv_on_tensorflow(self) -> bool:
        return self._kldiv_keras_library() == TF_BACKEND

    def _kldiv_keras_numpy(self, variable: Any) -> Any:
        return self._kldiv_keras.ops.convert_to_numpy(variable)

    # Before Keras has used it, the metric's ``variables`` are kldiv's (none yet): a custom JAX
    # loop that read them then passes an empty list, which stands for the zero Keras state.

    def _kldiv_stateless_variables(self, metric_variables: Any) -> Any:
        self._kldiv_to_keras()
        if metric_variables is not None and len(metric_variables) == 0:
            return [v.value for v in super().variables]
        return metric_variables

    def stateless_update_state(self, metric_variables: Any, *args: Any, **kwargs: Any) -> Any:
        metric_variables = self._kldiv_stateless_variables(metric_variables)
        return super().stateless_update_state(metric_variables, *args, **kwargs)  # type: ignore[misc]

    def stateless_result(self, metric_variables: Any) -> Any:
        metric_variables = self._kldiv_stateless_variables(metric_variables)
        return super().stateless_result(metric_variables)  # type: ignore[misc]

    def stateless_reset_state(self) -> Any:
        self._kldiv_to_keras()
        return super().stateless_reset_state()  # type: ignore[misc]


def _tf() -> ModuleType:
    """TensorFlow's module: loaded wherever tf-keras is (it imports it)."""
    tf = graph_module()
    assert tf is not None
    return tf


class _Keras2Metric(_KerasMetric):
    """tf.keras (Keras 2, ``tf_keras``): TensorFlow graphs (``tf.function``) drive the metric."""

    def _kldiv_keras_init(self, name: str, dtype: str) -> None:
        tf = _tf()
        fn, kwargs = self._kldiv_function()  # type: ignore[attr-defined]
        # autograph must not rewrite kldiv's Python (it is graph-safe as written)
        fn = tf.autograph.experimental.do_not_convert(fn)
        super(_KerasMetric, self).__init__(fn=fn, name=name, dtype=dtype, **kwargs)  # type: ignore[call-arg]
        # tf.keras' Metric.__new__ put wrapped update_state/result on the instance; the
        # methods of the class choose the engine (and wrap Keras' result below).
        for attr in ("update_state", "result"):
            self.__dict__.pop(attr, None)

    def _kldiv_keras_result(self) -> Any:
        tf = _tf()
        # what tf.keras' result wrapper does outside a merge call: read the (sync-on-read)
        # variables across replicas, and order the read after the updates
        with tf.__internal__.distribute.variable_sync_on_read_context():
            return tf.identity(super()._kldiv_keras_result())

    @property
    def variables(self) -> list[Any]:
        # tf.keras' compile checks that a metric's variables are TensorFlow variables created in
        # the model's distribution scope: compile is where tf.keras takes the metric over, so
        # kldiv's state (of NumPy, torch, ... arrays) moves into the Keras variables there.
        if self._kldiv_mode == "plain" and called_by_tf_keras_compile():
            self._kldiv_to_keras()
        return super().variables

    def _kldiv_keras_library(self) -> str:
        return TF_BACKEND

    def _kldiv_keras_numpy(self, variable: Any) -> Any:
        return variable.numpy()
