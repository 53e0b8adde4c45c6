"""Keras interop for the losses: a kldiv loss that is a ``keras.losses.Loss``.

kldiv never imports Keras: everything here looks in ``sys.modules``. A loss class that
subclasses :class:`KerasAwareLoss` is made, while a Keras is loaded, as a subclass of that
Keras' ``Loss`` (:func:`with_keras_bases`); an instance made before Keras was imported
becomes one the first time Keras checks ``isinstance(loss, keras.losses.Loss)``
(:data:`keras_aware_class`, its ``__class__``).
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

from .detect import graph_safe

__all__ = ["KerasAwareLoss", "keras_aware_class", "keras_loss_bases", "kldiv_class",
           "kldiv_class_of_type", "with_keras_bases"]


def keras_loss_bases() -> tuple[type, ...]:
    """``Loss`` of each Keras already imported (Keras 3 / Keras 2 as ``keras``, and tf-keras).

    Looks only in ``sys.modules``: kldiv never imports Keras.
    """
    bases = []
    for package in ("keras", "tf_keras"):
        losses = getattr(sys.modules.get(package), "losses", None)
        base = getattr(losses, "Loss", None)
        if isinstance(base, type) and base not in bases:
            bases.append(base)
    return tuple(bases)


_KERAS_CLASSES: dict[tuple[type, tuple[type, ...]], type] = {}


def with_keras_bases(cls: type, bases: tuple[type, ...]) -> type:
    """``cls`` that also subclasses Keras' ``Loss`` class(es), under the same name and module.

    Keras' ``compile`` calls a ``Loss`` as ``loss(y_true, y_pred, sample_weight)`` and uses
    the result as is, while any other callable is wrapped in Keras' ``LossFunctionWrapper``,
    which would weight and reduce kldiv's already reduced loss a second time. Only kldiv's
    own methods run: they come first in the MRO, and Keras' ``__init__`` is never called.
    """
    made = _KERAS_CLASSES.get((cls, bases))
    if made is not None:
        return made
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "_kldiv_class": cls,
        # Keras 3's Loss.dtype is a read-only property: kldiv keeps its own attribute.
        "dtype": None,
    }
    made = _KERAS_CLASSES[(cls, bases)] = type(cls.__name__, (cls, *bases), namespace)
    return made


def kldiv_class_of_type(cls: type) -> type:
    """The kldiv class behind ``cls`` (itself, or the class a Keras-aware subclass was made of)."""
    return getattr(cls, "_kldiv_class", cls)


def kldiv_class(obj: object) -> type:
    """The kldiv class of ``obj``, seen through the Keras-aware subclass."""
    return kldiv_class_of_type(type(obj))


_set_class = object.__dict__["__class__"].__set__  # the slot behind ``obj.__class__ = cls``


def _keras_aware_class(obj: Any) -> type:
    """``type(obj)``, first moved to the Keras-aware subclass if a Keras was imported after
    ``obj`` was made (or since it was last looked at).

    Installed as ``__class__`` (a property), which ``isinstance`` consults when ``type(obj)``
    alone does not answer: Keras' ``compile`` asks ``isinstance(loss, keras.losses.Loss)``
    before it ever calls the loss, and from then on ``obj`` really is an instance of the
    subclass (the same class an instance made after the import gets). kldiv never imports
    Keras: this only looks in ``sys.modules``.
    """
    cls = type(obj)
    bases = keras_loss_bases()
    if bases and not all(issubclass(cls, b) for b in bases):
        made = with_keras_bases(kldiv_class(obj), bases)
        _set_class(obj, made)
        # isinstance() only trusts a __class__ that differs from type(obj): this once, answer
        # with an empty subclass of the new class
        return _fresh_view(made)
    return cls


_VIEWS: dict[type, type] = {}


def _fresh_view(cls: type) -> type:
    view = _VIEWS.get(cls)
    if view is None:
        view = _VIEWS[cls] = type(cls.__name__, (cls,), {"__module__": cls.__module__,
                                                         "__qualname__": cls.__qualname__})
    return view


keras_aware_class = property(_keras_aware_class, doc="The instance's class (Keras-aware).")
"""A ``__class__`` property for kldiv classes that may become Keras ``Loss`` subclasses."""

_L = TypeVar("_L", bound="KerasAwareLoss")


def _graph_safe_methods(cls: type) -> None:
    """Mark ``cls`` (its instances are called: ``loss(y_true, y_pred)``) and the public methods
    and ``__call__`` it defines (``loss.call(...)`` is a bound method, whose attributes are its
    function's) as :func:`~kldiv._keras.detect.graph_safe`."""
    graph_safe(cls)
    for name, value in vars(cls).items():
        if callable(value) and (name == "__call__" or not name.startswith("_")):
            graph_safe(value)


class KerasAwareLoss:
    """Base of kldiv's loss classes: with a Keras loaded, an instance is also a
    ``keras.losses.Loss``, so that ``model.compile(loss=kldiv.KLDivergence())`` calls it with
    the sample weights: from the start when Keras was imported first, else at the first
    ``isinstance`` check (Keras' ``compile``)."""

    __class__ = keras_aware_class

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each loss class and its methods are called unconverted by autograph inside a
        ``tf.function`` (:func:`kldiv._keras.detect.graph_safe`)."""
        super().__init_subclass__(**kwargs)
        _graph_safe_methods(cls)

    def __new__(cls: type[_L], *args: Any, **kwargs: Any) -> _L:
        bases = keras_loss_bases()
        if any(not issubclass(cls, b) for b in bases):
            cls = with_keras_bases(kldiv_class_of_type(cls), bases)
        obj: _L = super().__new__(cls)
        return obj
