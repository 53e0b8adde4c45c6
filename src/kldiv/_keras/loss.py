"""Keras interop for the losses: a kldiv loss that is a ``keras.losses.Loss``.

kldiv never imports Keras: everything here looks in ``sys.modules``. A loss class that
subclasses :class:`KerasAwareLoss` is made, while a Keras is loaded, as a subclass of that
Keras' ``Loss`` (:func:`with_keras_bases`); an instance made before Keras was imported
becomes one the first time Keras checks ``isinstance(loss, keras.losses.Loss)``
(:data:`keras_aware_class`, its ``__class__``).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, TypeVar

from .._convert import to_namespace
from .._namespace import (
    array_namespace,
    dtype_name,
    get_device,
    is_array,
    is_low_precision,
    torch_compiling,
)
from .._reduction import (
    NamedWeight,
    Reduction,
    num_elements,
    validate_reduction,
)
from .detect import called_by_keras3_compile, graph_safe, keras3_floatx, keras_mask
from .registry import LOSS_PACKAGE, register_class

__all__ = ["KerasAwareLoss", "keras_aware_class", "keras_loss_bases", "keras_masked_weight",
           "kldiv_class", "kldiv_class_of_type", "with_keras_bases"]


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

# Keras spreads a mask's weight over the unmasked entries for these (a mean over them)
_MEAN_REDUCTIONS = frozenset({Reduction.AUTO, Reduction.SUM_OVER_BATCH_SIZE, Reduction.MEAN})


def keras_masked_weight(mask: Any, sample_weight: Any, reduction: str, like: Any,
                        of: str = "y_pred") -> NamedWeight:
    """``sample_weight`` with a Keras ``mask`` (of the per-sample loss' shape) folded in, as
    Keras' ``Loss.__call__`` folds it (``apply_mask`` of Keras 3, ``apply_valid_mask`` of
    tf.keras): for a mean (``"auto"``, ``"sum_over_batch_size"``, ``"mean"``) the unmasked entries
    weigh ``size / valid``, so that the mean is over them (0 when every entry is masked, as in
    Keras 3); for the other reductions the mask is a 0/1 weight. Computed in ``like``'s
    (``y_pred``'s) library; ``of`` is ``like``'s argument name. Returned as a
    :class:`~kldiv._reduction.NamedWeight` holding ``sample_weight`` too: the per-sample
    loss' shape is known only when the weights are applied (each by Keras 2's rank rules
    against it), and an error there names the one that does not fit.
    """
    what = f"the Keras mask (_keras_mask) of {of}"
    xp = array_namespace(like)
    # the mask in y_pred's library and device (a mask set by hand may be of another library, a
    # list, or not an array: a TypeError naming it, not a backend error)
    m = to_namespace(mask, xp, get_device(like), xp.float64 if dtype_name(like.dtype) == "float64" else xp.float32,
                     what=what)
    if reduction in _MEAN_REDUCTIONS:
        n = num_elements(tuple(m.shape))
        total = xp.sum(xp.ones_like(m)) if n is None else n
        valid = xp.sum(m)
        none = valid == 0
        m = m * xp.where(none, xp.zeros_like(valid), total / xp.where(none, xp.ones_like(valid), valid))
    return NamedWeight(m, what, sample_weight)


def _in_floatx(x: Any, floatx: str) -> Any:
    """``x`` cast to Keras 3's ``floatx`` where it is a half-precision array (what Keras 3's
    ``Loss.__call__`` does to its inputs, a loss' dtype defaulting to floatx)."""
    if not is_array(x) or not is_low_precision(getattr(x, "dtype", None)):
        return x
    xp = array_namespace(x)
    return xp.astype(x, getattr(xp, floatx))


def _keras_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    """kldiv's ``__call__``, with what Keras' ``Loss.__call__`` adds (both Keras agree):

    - a Keras mask on ``y_pred`` (:func:`kldiv._keras.detect.keras_mask`) weighs the loss
      (:func:`keras_masked_weight`), in ``compile`` and in a direct call;
    - called by Keras 3's compiled loss, a loss without a ``dtype`` computes in Keras' floatx
      (float32), as Keras 3's losses do: under a ``mixed_float16`` / ``mixed_bfloat16`` policy
      the model's half-precision output is not rounded back to its half type. A direct call
      keeps kldiv's rule (the result in ``y_pred``'s dtype).

    The arguments are kldiv's (positional or by their names: ``y_true``/``y_pred``,
    ``logprob``/``ref_logprob``, ``sample_weight``). While ``torch.compile`` traces, kldiv's call
    reads the mask only from the ``_keras_mask`` attribute of a positional ``y_pred`` (Keras'
    compiled loss passes it so): the caller's frames and Keras' mask table cannot be traced.
    """
    plain = self._kldiv_class
    if torch_compiling():
        return _traced_call(self, plain, args, kwargs)
    try:
        bound = _signature(plain).bind(self, *args, **kwargs)
    except TypeError:  # kldiv's own call raises the clear error
        return plain.__call__(self, *args, **kwargs)
    arguments = bound.arguments
    names = [name for name in arguments if name not in ("self", "sample_weight")]
    if len(names) < 2:
        return plain.__call__(self, *args, **kwargs)
    first, second = names[0], names[1]
    mask = keras_mask(arguments[second])
    if self.dtype is None and called_by_keras3_compile():
        floatx = keras3_floatx()
        if floatx is not None:
            arguments[first] = _in_floatx(arguments[first], floatx)
            arguments[second] = _in_floatx(arguments[second], floatx)
    if mask is not None:
        try:
            reduction = validate_reduction(self.reduction, batchmean=True)
        except (TypeError, ValueError):
            reduction = None  # kldiv's own call raises the clear error
        if reduction is not None:
            arguments["sample_weight"] = keras_masked_weight(
                mask, arguments.get("sample_weight"), reduction, arguments[second], second)
    return plain.__call__(*bound.args, **bound.kwargs)


def _traced_call(self: Any, plain: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """:func:`_keras_call` under ``torch.compile``: the mask of a positional ``y_pred`` only."""
    mask = getattr(args[1], "_keras_mask", None) if len(args) >= 2 else None
    if mask is None:
        return plain.__call__(self, *args, **kwargs)
    rest = dict(kwargs)
    weight = args[2] if len(args) > 2 else rest.pop("sample_weight", None)
    reduction = validate_reduction(self.reduction, batchmean=True)
    weight = keras_masked_weight(mask, weight, reduction, args[1])
    return plain.__call__(self, args[0], args[1], weight, *args[3:], **rest)


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(plain: type) -> inspect.Signature:
    """The signature of kldiv's ``__call__`` of ``plain`` (cached)."""
    sig = _SIGNATURES.get(plain)
    if sig is None:
        sig = _SIGNATURES[plain] = inspect.signature(plain.__call__)
    return sig


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
        "__call__": _keras_call,
        # kldiv's hash (class and config, as == compares them), not Keras' (the object's id)
        # nor the class' alone: jax.jit keys its traces on it (an equal hash for other
        # options served a loss a trace of those)
        "__hash__": cls.__hash__,
    }
    made = _KERAS_CLASSES[(cls, bases)] = type(cls.__name__, (cls, *bases), namespace)
    register_class(made, LOSS_PACKAGE)  # saved as "kldiv>ClassName" (kldiv._keras.registry)
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
        register_class(view, LOSS_PACKAGE)
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
