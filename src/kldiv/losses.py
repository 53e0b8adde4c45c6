"""Keras-style losses: the functional aliases and the :class:`KLDivergence` class."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import numpy as np

from ._functional import KLD, compute, kl_divergence, kld, kullback_leibler_divergence, prepare
from ._namespace import device_scope, dtype_name, namespace_name, numpy_result
from ._reduction import Reduction, reduce_loss, validate_reduction

__all__ = [
    "KLD",
    "KLDivergence",
    "Reduction",
    "kl_divergence",
    "kld",
    "kullback_leibler_divergence",
]

_FN_NAMES = {"kl_divergence", "kld", "KLD", "kullback_leibler_divergence"}


def _keras_loss_bases() -> tuple[type, ...]:
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


def _with_keras_bases(cls: type, bases: tuple[type, ...]) -> type:
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


def _kldiv_class(obj: object) -> type:
    """The kldiv class of ``obj``, seen through the Keras-aware subclass."""
    return getattr(type(obj), "_kldiv_class", type(obj))


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
    bases = _keras_loss_bases()
    if bases and not all(issubclass(cls, b) for b in bases):
        made = _with_keras_bases(_kldiv_class(obj), bases)
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


_DTYPE_NAMES = frozenset({"float16", "bfloat16", "float32", "float64"})
_MIXED_POLICIES = frozenset({"mixed_float16", "mixed_bfloat16"})  # Keras' mixed precision policies


def _validate_dtype(dtype: Any) -> str | None:
    """``None``, or the name of a floating dtype: a name (Keras' ``"mixed_..."`` policies give
    their compute dtype), a Keras ``DTypePolicy``, or any library's dtype object
    (``np.float64``, ``torch.float64``, ``tf.float64``, ``ml_dtypes.bfloat16``, ...). Stored as
    the name, so that configs hold a string that Keras and :meth:`KLDivergence.from_config`
    read back."""
    if dtype is None:
        return None
    given = dtype
    if not isinstance(dtype, str):
        policy_dtype = getattr(dtype, "compute_dtype", None)  # a Keras DTypePolicy
        dtype = policy_dtype if isinstance(policy_dtype, str) else dtype_name(dtype)
    name = dtype[len("mixed_"):] if dtype in _MIXED_POLICIES else dtype
    if name not in _DTYPE_NAMES:
        raise ValueError(
            f"Invalid dtype {given!r} for KLDivergence: expected one of "
            f"{', '.join(sorted(_DTYPE_NAMES))} (a name, a Keras 'mixed_float16' / "
            "'mixed_bfloat16' policy, or a library's floating dtype object) or None."
        )
    return name


def _result_dtype(xp: Any, name: str) -> Any:
    """The dtype called ``name`` in ``xp`` (NumPy's and Dask's bfloat16 from ml_dtypes)."""
    dtype = getattr(xp, name, None)
    if dtype is None and name != "bfloat16" and namespace_name(xp) in {"numpy", "dask"}:
        dtype = np.dtype(name)  # float16: not in the array API, so not in every compat namespace
    if dtype is None and name == "bfloat16" and namespace_name(xp) in {"numpy", "dask"}:
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError(
                "KLDivergence(dtype='bfloat16'): NumPy has no bfloat16 of its own; install "
                "ml_dtypes (pip install ml_dtypes) for it, or choose another dtype."
            ) from None
        dtype = np.dtype(ml_dtypes.bfloat16)
    if dtype is None:
        raise ValueError(
            f"KLDivergence(dtype={name!r}): {namespace_name(xp)} has no {name} dtype; choose "
            "one y_pred's library holds."
        )
    return dtype


def _restore(cls: Any, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


class KLDivergence:
    """Keras' ``KLDivergence`` loss, on any array library and device.

    ``loss = y_true * log(y_true / y_pred)`` summed over the last axis (both clipped to
    ``[1e-7, 1]``), then weighted by ``sample_weight`` and reduced.

    Parameters
    ----------
    reduction : str or None, default "auto"
        ``"auto"`` / ``"sum_over_batch_size"`` / ``"mean"``: the weighted sum divided by the
        number of per-sample losses; ``"sum"``: the weighted sum; ``"none"`` (or ``None``):
        the weighted per-sample losses; ``"mean_with_sample_weight"``: the weighted sum divided
        by the sum of the weights. See :class:`Reduction`.
    name : str, default "kl_divergence"
        The loss' name (Keras uses it to label logs).
    dtype : str or dtype, optional
        If given, the result is cast to the dtype of this name in the result's library (Keras
        3's ``dtype`` argument): ``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``,
        a Keras ``"mixed_float16"``/``"mixed_bfloat16"`` policy, or any library's floating
        dtype object (``np.float64``, ``torch.float64``, ...), stored as its name. NumPy's
        bfloat16 is ``ml_dtypes``'. By default the result has ``y_pred``'s floating dtype.

    Notes
    -----
    Before the kernel, Keras 2's ``squeeze_or_expand_dimensions`` applies: when the ranks of
    ``y_true`` and ``y_pred`` differ by one and the larger has a trailing axis of 1, that axis
    is dropped (``(3, 1)`` against ``(3,)`` is one sample of 3 classes). The function
    :func:`kldiv.kl_divergence` broadcasts instead, as Keras' function does.

    On NumPy a reduced result is a NumPy scalar of the result dtype (``np.float32`` for
    float32 inputs) for every reduction, also for an empty batch or a zero weight sum; an
    unreduced one is an ndarray. Other libraries return their 0-d array.

    Made before Keras (or tf_keras) is imported, an instance becomes a Keras ``Loss`` the
    first time Keras checks ``isinstance(loss, keras.losses.Loss)``, so the order of the
    imports does not matter.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> y_true = np.array([[0, 1], [0, 0]], dtype=np.float32)
    >>> y_pred = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)
    >>> kl = kldiv.KLDivergence()
    >>> kl(y_true, y_pred)
    np.float32(0.45814306)
    >>> kl(y_true, y_pred, sample_weight=[0.8, 0.2])
    np.float32(0.3665154)
    >>> kldiv.KLDivergence(reduction="none")(y_true, y_pred)
    array([ 9.1628921e-01, -3.0809074e-06], dtype=float32)
    """

    # With Keras loaded, the instance is also a keras.losses.Loss (see _with_keras_bases), so
    # that model.compile(loss=kldiv.KLDivergence()) calls it with the sample weights: from the
    # start when Keras was imported first, else at the first isinstance check (Keras' compile).
    __class__ = keras_aware_class

    def __new__(cls, *args: Any, **kwargs: Any) -> KLDivergence:
        bases = tuple(b for b in _keras_loss_bases() if not issubclass(cls, b))
        if bases:
            cls = _with_keras_bases(_kldiv_class_of_type(cls), _keras_loss_bases())
        return super().__new__(cls)

    def __init__(
        self, reduction: str | None = "auto", name: str = "kl_divergence", *, dtype: Any = None
    ) -> None:
        self.reduction = validate_reduction(reduction)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")
        self.name = name
        self.dtype = _validate_dtype(dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """The unreduced, unweighted per-sample loss (Keras' ``Loss.call``), after Keras 2's
        rank squeeze (see :meth:`__call__`)."""
        return numpy_result(compute(prepare(y_true, y_pred)))

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Weighted, reduced loss. ``sample_weight`` follows Keras 2's rank rules."""
        prep = prepare(y_true, y_pred)
        xp = prep.xp
        scope = device_scope(xp, prep.device)
        # weighted and reduced in the compute dtype (float32 for float16/bfloat16: a sum of
        # many float16 losses overflows), then cast once
        if scope is None:
            out = reduce_loss(xp, compute(prep, cast=False), sample_weight, reduction=self.reduction)
        else:
            with scope:  # TensorFlow, eagerly: on y_pred's device
                out = reduce_loss(xp, compute(prep, cast=False), sample_weight, reduction=self.reduction)
        dtype = prep.out_dtype if self.dtype is None else _result_dtype(xp, self.dtype)
        if out.dtype != dtype:
            try:
                out = xp.astype(out, dtype)
            except (TypeError, ValueError, RuntimeError) as exc:  # e.g. no float64 on the device
                raise ValueError(
                    f"KLDivergence(dtype={self.dtype!r}): the result cannot be cast to {dtype} "
                    f"on y_pred's device {prep.device}: {exc}"
                ) from None
        return numpy_result(out)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras would save them."""
        config: dict[str, Any] = {"reduction": self.reduction, "name": self.name}
        if self.dtype is not None:
            config["dtype"] = self.dtype
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KLDivergence:
        """Rebuild a loss from :meth:`get_config` output, or a Keras 2 / Keras 3 config.

        Keras 2 configs carry an ``"fn"`` key naming the function; Keras 3 configs may hold
        ``"reduction": None`` and a ``"dtype"``. Unknown keys raise ``TypeError``.
        """
        config = dict(config)
        fn = config.pop("fn", None)
        if fn is not None and fn not in _FN_NAMES:
            raise ValueError(f"config names function {fn!r}, not the KL divergence.")
        dtype = config.pop("dtype", None)
        if isinstance(dtype, dict):  # Keras 3 DTypePolicy config
            dtype = dtype.get("config", {}).get("name")
        unknown = set(config) - {"reduction", "name"}
        if unknown:
            raise TypeError(f"Unknown KLDivergence config keys: {sorted(unknown)}.")
        return cls(**config, dtype=dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r}, name={self.name!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The kldiv class, not the Keras-aware subclass (nor Keras' own __reduce__)
        return (_restore, (_kldiv_class(self), dict(self.__dict__)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KLDivergence) or _kldiv_class(other) is not _kldiv_class(self):
            return NotImplemented
        return self.get_config() == other.get_config()

    __hash__ = None  # type: ignore[assignment]


def _kldiv_class_of_type(cls: type) -> type:
    return getattr(cls, "_kldiv_class", cls)


# ``inspect.signature(KLDivergence)`` (IDEs, ``help()``) reads ``__new__``, which only takes
# ``*args, **kwargs`` to pass them on: show ``__init__``'s parameters instead (inspect drops
# the first one, ``self``, as it would ``cls``). Subclasses with their own ``__init__`` show theirs.
KLDivergence.__new__.__signature__ = inspect.signature(KLDivergence.__init__).replace(  # type: ignore[attr-defined]
    return_annotation=inspect.Signature.empty
)
