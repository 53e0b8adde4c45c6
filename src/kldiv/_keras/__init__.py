"""Keras interop, in one place: kldiv's losses and metrics as Keras ``Loss``/``Metric`` objects.

kldiv never imports Keras: everything here looks in ``sys.modules``.

- :mod:`kldiv._keras.detect`: which Keras is loaded, and whether Keras is calling.
- :mod:`kldiv._keras.loss`: the Keras-aware loss classes (:class:`KerasAwareLoss`).
- :mod:`kldiv._keras.metric`: the Keras-aware metric classes (:func:`metric_class`).
- :mod:`kldiv._keras.registry`: kldiv's classes in Keras' registry of serializable classes
  (``"kldiv>KLDivergence"``, ``"kldiv.metrics>KLDivergence"``), so saved models load without
  ``custom_objects``.
"""

from .detect import (
    called_by_keras3_compile,
    called_by_keras_deserialize,
    called_by_keras_wrapper,
    called_by_tf_keras_compile,
    in_graph,
    in_keras_scope,
    keras_mask,
    loaded_keras,
)
from .loss import (
    KerasAwareLoss,
    keras_aware_class,
    keras_loss_bases,
    keras_masked_weight,
    kldiv_class,
    kldiv_class_of_type,
    with_keras_bases,
)
from .metric import metric_class
from .registry import install as _install_registry

_install_registry()  # kldiv's classes in Keras' registry, now or when Keras is imported

__all__ = [
    "KerasAwareLoss",
    "called_by_keras3_compile",
    "called_by_keras_deserialize",
    "called_by_keras_wrapper",
    "called_by_tf_keras_compile",
    "in_graph",
    "in_keras_scope",
    "keras_aware_class",
    "keras_loss_bases",
    "keras_mask",
    "keras_masked_weight",
    "kldiv_class",
    "kldiv_class_of_type",
    "loaded_keras",
    "metric_class",
    "with_keras_bases",
]
