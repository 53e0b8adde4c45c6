"""Where a metric stands with Keras: which Keras is loaded, and whether Keras is calling.

kldiv never imports Keras: everything here looks in ``sys.modules`` (and, for who is calling,
at the caller's frames). Used by the Keras-aware metric class (:mod:`kldiv._keras.metric`) and
the metrics (:mod:`kldiv._metric_base`, through :mod:`kldiv._keras`, which re-exports them).
"""

from __future__ import annotations

import sys
from types import FrameType, ModuleType
from typing import Any, TypeVar

from .._libraries import graph_library
from .._namespace import torch_compiling

__all__ = ["AUTOGRAPH_MARK", "TF_BACKEND", "called_by_keras3_compile", "called_by_keras_deserialize", "called_by_keras_wrapper",
           "called_by_tf_keras_compile", "graph_module", "graph_safe", "host_float", "in_graph",
           "in_keras_scope", "is_tf_tensor", "keras3_floatx", "keras_mask", "loaded_keras"]

TF_BACKEND = "tensorflow"
"""Keras' own name of its TensorFlow backend (``keras.backend.backend()``); tf-keras (Keras 2)
runs on nothing else."""

_GRAPHS = graph_library()  # the table's record of the library building graphs (TensorFlow)


AUTOGRAPH_MARK = "autograph_info__"
"""The attribute by which TensorFlow's autograph recognises code it must call as it is:
what ``tf.autograph.experimental.do_not_convert`` sets on its wrapper (autograph's
``is_autograph_artifact`` only asks ``hasattr``)."""

_F = TypeVar("_F")


def graph_safe(obj: _F) -> _F:
    """Mark ``obj`` (a function, or a class whose instances are called) so that autograph calls
    it unconverted inside a user's ``tf.function``; returns ``obj``.

    kldiv's Python is graph-safe as written (no Python control flow on tensor values), but
    autograph would otherwise rewrite every kldiv function a ``tf.function`` reaches, at each
    trace, and print "AutoGraph could not transform ... Please report this to the TensorFlow
    team" for those it cannot parse. The same as ``tf.autograph.experimental.do_not_convert``
    without importing TensorFlow; nothing else reads the attribute.
    """
    setattr(obj, AUTOGRAPH_MARK, None)
    return obj


def graph_module() -> ModuleType | None:
    """TensorFlow's module where it is loaded (the table's :func:`~kldiv._libraries.graph_library`;
    never imports it)."""
    return _GRAPHS.loaded()


# ---- which Keras ----------------------------------------------------------------------------


def _usable(module: ModuleType | None) -> bool:
    metrics = getattr(module, "metrics", None)
    return isinstance(getattr(metrics, "MeanMetricWrapper", None), type)


def loaded_keras() -> tuple[ModuleType, int] | None:
    """The loaded Keras a new metric subclasses, and its major version; ``None`` without one.

    tf-keras (``tf_keras``, tf.keras 2 as ``tf.keras`` with ``TF_USE_LEGACY_KERAS=1``) is only
    ever loaded by a user who chose it, while Keras 3 is also loaded by ``import tensorflow``:
    with both loaded, tf-keras wins. A metric handed to the other Keras still works (see
    :func:`called_by_keras_wrapper`).
    """
    tf_keras = sys.modules.get("tf_keras")
    if _usable(tf_keras):
        assert tf_keras is not None
        return tf_keras, 2
    keras = sys.modules.get("keras")
    if _usable(keras):
        assert keras is not None
        version = str(getattr(keras, "__version__", "3"))
        major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 3
        return keras, major
    return None


def _wrapper_classes() -> tuple[type, ...]:
    return tuple(
        sys.modules[name].metrics.MeanMetricWrapper
        for name in ("keras", "tf_keras")
        if _usable(sys.modules.get(name))
    )


def called_by_keras_wrapper(metric: object, depth: int = 8) -> bool:
    """True when a Keras ``MeanMetricWrapper`` whose function is ``metric`` is calling it.

    That is how ``compile`` uses a metric object that is not a ``Metric`` of its Keras (one
    created before Keras was imported, or one made for the other Keras): it wraps the object
    and calls it as ``fn(y_true, y_pred)`` for per-sample values. Looks at most ``depth``
    frames up (tf.keras calls through autograph's wrappers); costs nothing without Keras.
    """
    wrappers = _wrapper_classes()
    if not wrappers:
        return False
    frame: FrameType | None = sys._getframe(2)  # the caller of metric.__call__
    for _ in range(depth):
        if frame is None:
            return False
        caller = frame.f_locals.get("self")
        if isinstance(caller, wrappers) and getattr(caller, "_fn", None) is metric:
            return True
        frame = frame.f_back
    return False


def in_keras_scope() -> bool:
    """True inside a Keras 3 stateless or symbolic scope: ``compile``'s symbolic build (every
    backend) and the JAX trainer's stateless steps. Keras is using the metric there."""
    backend = sys.modules.get("keras.src.backend")
    if backend is None:
        return False
    try:
        return bool(backend.in_stateless_scope() or backend.in_symbolic_scope())
    except Exception:  # another Keras 3 layout
        return False


def in_graph(*arrays: Any) -> bool:
    """True while a TensorFlow graph is built (``tf.function``: compiled Keras steps on
    TensorFlow, tf.keras' ``fit``), or with a Keras symbolic tensor among ``arrays``.

    kldiv's own state cannot live there: graph tensors would outlive their graph.
    """
    tf = _GRAPHS.loaded()
    if tf is not None:
        try:
            if not getattr(tf, _GRAPHS.eager_check)():
                return True
        except Exception:
            pass
    symbolic = tuple(
        t
        for t in (
            getattr(sys.modules.get("keras"), "KerasTensor", None),
            getattr(sys.modules.get("tf_keras.src.engine.keras_tensor"), "KerasTensor", None),
        )
        if isinstance(t, type)
    )
    return bool(symbolic) and any(isinstance(a, symbolic) for a in arrays)


def host_float(x: Any) -> float:
    """A 0-d array of any library (Dask computed) as a Python float."""
    compute = getattr(x, "compute", None)
    return float(compute() if callable(compute) else x)


def is_tf_tensor(arrays: tuple[Any, ...]) -> bool:
    """A TensorFlow tensor or variable among ``arrays`` (the table's array types)."""
    return _GRAPHS.loaded() is not None and any(_GRAPHS.is_array(a) for a in arrays)


def called_by_tf_keras_compile() -> bool:
    """True when tf.keras' ``Model.compile`` (its ``_validate_compile``) reads the property
    that calls this: it checks that a metric's ``variables`` are TensorFlow variables."""
    tf_keras = sys.modules.get("tf_keras")
    if tf_keras is None:
        return False
    caller = sys._getframe(2)  # this <- the property <- its reader
    model = getattr(getattr(tf_keras, "models", None), "Model", None)
    return (caller.f_code.co_name == "_validate_compile" and isinstance(model, type)
            and isinstance(caller.f_locals.get("self"), model))


# ---- what Keras' own Loss.__call__ does besides the loss -----------------------------------

_KERAS3_COMPILE = "keras.src.trainers.compile_utils"  # the module of Keras 3's CompileLoss


def keras_mask(x: Any) -> Any:
    """The Keras mask ``x`` carries (``None`` without one): what a masking layer
    (``Embedding(mask_zero=True)``, ``Masking``) set on its output, which Keras' ``Loss.__call__``
    and ``MeanMetricWrapper`` weight by.

    tf.keras and Keras 3 keep it as the tensor's ``_keras_mask`` attribute; Keras 3 keeps the
    mask of an array that takes no attribute (JAX's) in its own table, read through its
    ``get_keras_mask``. Never imports Keras.
    """
    try:
        mask = getattr(x, "_keras_mask", None)
    except Exception:  # an object whose attribute lookup raises
        mask = None
    if mask is None and not torch_compiling():  # dynamo cannot trace Keras' table (by id)
        backend = sys.modules.get("keras.src.backend")
        get = getattr(backend, "get_keras_mask", None)
        if callable(get):
            try:
                mask = get(x)
            except Exception:  # another Keras 3 layout
                mask = None
    return mask


def called_by_keras3_compile(depth: int = 4) -> bool:
    """True when Keras 3's compiled loss (``CompileLoss``: ``fit``/``evaluate``/``train_on_batch``)
    calls the loss whose ``__call__`` asks. Looks at most ``depth`` frames up."""
    if _KERAS3_COMPILE not in sys.modules:
        return False
    frame: FrameType | None = sys._getframe(2)  # the caller of loss.__call__
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == _KERAS3_COMPILE:
            return True
        frame = frame.f_back
    return False


def keras3_floatx() -> str | None:
    """Keras 3's ``floatx`` (``"float32"`` unless changed), ``None`` without Keras 3 loaded."""
    backend = getattr(sys.modules.get("keras"), "backend", None)
    floatx = getattr(backend, "floatx", None)
    if not callable(floatx):
        return None
    try:
        return str(floatx())
    except Exception:
        return None


_SAVING = ("keras.src.saving.", "tf_keras.src.saving.")  # Keras 3's and tf.keras' (de)serializers


def called_by_keras_deserialize(depth: int = 5) -> bool:
    """True when Keras' deserialization (``load_model``, ``deserialize_keras_object``,
    ``compile_from_config``) calls the ``from_config`` that asks. Looks at most ``depth``
    frames up; costs nothing without Keras."""
    if not any(name in sys.modules for name in ("keras.src.saving", "tf_keras.src.saving")):
        return False
    frame: FrameType | None = sys._getframe(2)  # the caller of from_config
    for _ in range(depth):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith(_SAVING):
            return True
        frame = frame.f_back
    return False
