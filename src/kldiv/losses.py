"""Keras-style losses: the functional aliases and the divergence loss classes
:class:`KLDivergence`, :class:`ReverseKLDivergence` and :class:`JensenShannonDivergence`."""

from __future__ import annotations

import sys
from typing import Any, ClassVar, TypeVar

import numpy as np

from ._divergence import JS, KL, REVERSE_KL, Divergence
from ._family import (
    Call,
    compute_family,
    jensen_shannon_divergence,
    js_divergence,
    prepare_family,
    resolve,
    reverse_kl_divergence,
)
from ._functional import KLD, kl_divergence, kld, kullback_leibler_divergence
from ._namespace import device_scope, dtype_name, namespace_name, numpy_result, torch_compiling
from ._reduction import Reduction, reduce_loss, validate_reduction

__all__ = [
    "KLD",
    "JensenShannonDivergence",
    "KLDivergence",
    "Reduction",
    "ReverseKLDivergence",
    "jensen_shannon_divergence",
    "js_divergence",
    "kl_divergence",
    "kld",
    "kullback_leibler_divergence",
    "reverse_kl_divergence",
]


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


def _validate_dtype(dtype: Any, *, owner: str = "KLDivergence") -> str | None:
    """``None``, or the name of a floating dtype: a name (Keras' ``"mixed_..."`` policies give
    their compute dtype), a Keras ``DTypePolicy``, or any library's dtype object
    (``np.float64``, ``torch.float64``, ``tf.float64``, ``ml_dtypes.bfloat16``, ...). Stored as
    the name, so that configs hold a string that Keras and :meth:`KLDivergence.from_config`
    read back. ``owner`` is the class the messages name."""
    if dtype is None:
        return None
    given = dtype
    if not isinstance(dtype, str):
        policy_dtype = getattr(dtype, "compute_dtype", None)  # a Keras DTypePolicy
        dtype = policy_dtype if isinstance(policy_dtype, str) else dtype_name(dtype)
    name = dtype[len("mixed_"):] if dtype in _MIXED_POLICIES else dtype
    if name not in _DTYPE_NAMES:
        raise ValueError(
            f"Invalid dtype {given!r} for {owner}: expected one of "
            f"{', '.join(sorted(_DTYPE_NAMES))} (a name, a Keras 'mixed_float16' / "
            "'mixed_bfloat16' policy, or a library's floating dtype object) or None."
        )
    return name


def _result_dtype(xp: Any, name: str, *, owner: str = "KLDivergence") -> Any:
    """The dtype called ``name`` in ``xp`` (NumPy's and Dask's bfloat16 from ml_dtypes)."""
    dtype = getattr(xp, name, None)
    if dtype is None and name != "bfloat16" and namespace_name(xp) in {"numpy", "dask"}:
        dtype = np.dtype(name)  # float16: not in the array API, so not in every compat namespace
    if dtype is None and name == "bfloat16" and namespace_name(xp) in {"numpy", "dask"}:
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError(
                f"{owner}(dtype='bfloat16'): NumPy has no bfloat16 of its own; install "
                "ml_dtypes (pip install ml_dtypes) for it, or choose another dtype."
            ) from None
        dtype = np.dtype(ml_dtypes.bfloat16)
    if dtype is None:
        raise ValueError(
            f"{owner}(dtype={name!r}): {namespace_name(xp)} has no {name} dtype; choose "
            "one y_pred's library holds."
        )
    return dtype


def _restore(cls: Any, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


_L = TypeVar("_L", bound="_DivergenceLoss")


class _DivergenceLoss:
    """The loss classes' common base: a member of the divergence family (``divergence``),
    its options, Keras-style reductions and sample weights, config, pickling and Keras
    interop. A subclass names its member and gives ``__init__`` its defaults and docstring.

    An instance made before Keras (or tf_keras) is imported becomes a Keras ``Loss`` the first
    time Keras checks ``isinstance(loss, keras.losses.Loss)`` (see ``_with_keras_bases``).
    """

    divergence: ClassVar[Divergence]
    _title: ClassVar[str]  # what the member is called in messages

    # Defaults for instances unpickled from before these options existed
    inputs: str | tuple[str, str] = "probs"
    temperature: float = 1.0

    # With Keras loaded, the instance is also a keras.losses.Loss (see _with_keras_bases), so
    # that model.compile(loss=kldiv.KLDivergence()) calls it with the sample weights: from the
    # start when Keras was imported first, else at the first isinstance check (Keras' compile).
    __class__ = keras_aware_class

    def __new__(cls: type[_L], *args: Any, **kwargs: Any) -> _L:
        bases = tuple(b for b in _keras_loss_bases() if not issubclass(cls, b))
        if bases:
            cls = _with_keras_bases(_kldiv_class_of_type(cls), _keras_loss_bases())
        obj: _L = super().__new__(cls)
        return obj

    def __init__(self, reduction: str | None, name: str, *, inputs: Any = "probs",
                 temperature: Any = 1.0, dtype: Any = None, **params: Any) -> None:
        owner = type(self).__name__
        self.reduction = validate_reduction(reduction, batchmean=True)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")
        self.name = name
        call = resolve(self.divergence, inputs=inputs, temperature=temperature, **params)
        self._call = call
        spaces = call.spaces
        self.inputs = spaces[0] if spaces[0] == spaces[1] else spaces
        self.temperature = call.temperature
        for key, value in call.params.items():  # the member's parameters (beta)
            setattr(self, key, value)
        self.dtype = _validate_dtype(dtype, owner=owner)

    def _resolved(self) -> Call:
        """The member with this loss' options (validated again: attributes may be set).

        While ``torch.compile`` traces, the options last validated eagerly are used as they
        are: dynamo may trace Python float attributes as symbolic values (dynamic shapes),
        and checks such as ``math.isfinite`` on them cannot be traced.
        """
        cached: Call | None = self.__dict__.get("_call")  # absent in pickles of older versions
        if cached is not None and torch_compiling():
            return cached
        params = {key: getattr(self, key) for key in self.divergence.params}
        self._call = resolve(self.divergence, inputs=self.inputs,
                                   temperature=self.temperature, **params)
        return self._call

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """The unreduced, unweighted per-sample loss (Keras' ``Loss.call``), after Keras 2's
        rank squeeze (see :meth:`__call__`)."""
        call = self._resolved()
        return numpy_result(compute_family(call, prepare_family(y_true, y_pred, squeeze=True)))

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Weighted, reduced loss. ``sample_weight`` follows Keras 2's rank rules; a mask
        (``labels != -100``, bool or 0/1) is a sample weight."""
        call = self._resolved()
        prep = prepare_family(y_true, y_pred, squeeze=True)
        xp = prep.xp
        scope = device_scope(xp, prep.device)
        # weighted and reduced in the compute dtype (float32 for float16/bfloat16: a sum of
        # many float16 losses overflows), then cast once
        if scope is None:
            out = reduce_loss(xp, compute_family(call, prep, cast=False), sample_weight,
                              reduction=self.reduction)
        else:
            with scope:  # TensorFlow, eagerly: on y_pred's device
                out = reduce_loss(xp, compute_family(call, prep, cast=False), sample_weight,
                                  reduction=self.reduction)
        owner = type(self).__name__
        dtype = prep.out_dtype if self.dtype is None else _result_dtype(xp, self.dtype, owner=owner)
        if out.dtype != dtype:
            try:
                out = xp.astype(out, dtype)
            except (TypeError, ValueError, RuntimeError) as exc:  # e.g. no float64 on the device
                raise ValueError(
                    f"{owner}(dtype={self.dtype!r}): the result cannot be cast to {dtype} "
                    f"on y_pred's device {prep.device}: {exc}"
                ) from None
        return numpy_result(out)

    def _options(self) -> dict[str, Any]:
        """The member's options as config entries: its parameters always, ``inputs`` and
        ``temperature`` when not the defaults (so that a default KL's config is Keras')."""
        options: dict[str, Any] = {key: getattr(self, key) for key in self.divergence.params}
        if self.inputs != "probs":
            options["inputs"] = self.inputs if isinstance(self.inputs, str) else list(self.inputs)
        if self.temperature != 1.0:
            options["temperature"] = self.temperature
        return options

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras would save them (JSON-ready: a pair of input
        spaces is a list)."""
        config: dict[str, Any] = {"reduction": self.reduction, "name": self.name}
        config.update(self._options())
        if self.dtype is not None:
            config["dtype"] = self.dtype
        return config

    @classmethod
    def from_config(cls: type[_L], config: dict[str, Any]) -> _L:
        """Rebuild a loss from :meth:`get_config` output, or a Keras 2 / Keras 3 config.

        Keras 2 configs carry an ``"fn"`` key naming the function; Keras 3 configs may hold
        ``"reduction": None`` and a ``"dtype"``. Unknown keys raise ``TypeError``.
        """
        config = dict(config)
        div = cls.divergence
        fn = config.pop("fn", None)
        if fn is not None and fn not in {div.name, *div.aliases}:
            raise ValueError(f"config names function {fn!r}, not the {cls._title}.")
        dtype = config.pop("dtype", None)
        if isinstance(dtype, dict):  # Keras 3 DTypePolicy config
            dtype = dtype.get("config", {}).get("name")
        unknown = set(config) - {"reduction", "name", "inputs", "temperature", *div.params}
        if unknown:
            raise TypeError(f"Unknown {cls.__name__} config keys: {sorted(unknown)}.")
        return cls(**config, dtype=dtype)

    def __repr__(self) -> str:
        options = "".join(f", {key}={getattr(self, key)!r}" for key in self._options())
        return f"{type(self).__name__}(reduction={self.reduction!r}, name={self.name!r}{options})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The kldiv class, not the Keras-aware subclass (nor Keras' own __reduce__)
        state = {k: v for k, v in self.__dict__.items() if k != "_call"}  # rebuilt on use
        return (_restore, (_kldiv_class(self), state))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _DivergenceLoss) or _kldiv_class(other) is not _kldiv_class(self):
            return NotImplemented
        return self.get_config() == other.get_config()

    __hash__ = None  # type: ignore[assignment]


_PARAMETERS = """
    Parameters
    ----------
    reduction : str or None, default "auto"
        ``"auto"`` / ``"sum_over_batch_size"`` / ``"mean"``: the weighted sum divided by the
        number of per-sample losses; ``"sum"``: the weighted sum; ``"none"`` (or ``None``):
        the weighted per-sample losses; ``"mean_with_sample_weight"``: the weighted sum divided
        by the sum of the weights (0 when they sum to 0); ``"batchmean"``: the weighted sum
        divided by the size of the per-sample loss' first axis (torch's). See
        :class:`Reduction`."""

_OPTIONS = """
    inputs : {"probs", "log_probs", "logits"} or pair of them, default "probs"
        The space of both inputs, or ``(y_true's, y_pred's)``; see
        :func:`kldiv.kl_divergence`. Stored as given (a pair as a list in the config).
    temperature : float, default 1.0
        Divides logits (> 0, only with ``"logits"`` inputs); the loss is not multiplied by
        ``temperature ** 2``.
    dtype : str or dtype, optional
        If given, the result is cast to the dtype of this name in the result's library (Keras
        3's ``dtype`` argument): ``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``,
        a Keras ``"mixed_float16"``/``"mixed_bfloat16"`` policy, or any library's floating
        dtype object (``np.float64``, ``torch.float64``, ...), stored as its name. NumPy's
        bfloat16 is ``ml_dtypes``'. By default the result has ``y_pred``'s floating dtype."""

_NOTES = """

    Notes
    -----
    Before the kernel, Keras 2's ``squeeze_or_expand_dimensions`` applies: when the ranks of
    ``y_true`` and ``y_pred`` differ by one and the larger has a trailing axis of 1, that axis
    is dropped (``(3, 1)`` against ``(3,)`` is one sample of 3 classes). The functions
    broadcast instead, as Keras' functions do.

    ``sample_weight`` follows Keras 2's rank rules (a ``(B,)`` weight scales the rows of a
    ``(B, T)`` loss). A mask is a weight: ``sample_weight=(labels != -100)`` with
    ``reduction="mean_with_sample_weight"`` is the mean over the unmasked tokens, 0 (with zero
    gradients) when every token is masked. A masked token's divergence must still be finite
    (padding holds ordinary logits, or ``-inf`` on both sides): its weight multiplies it, as
    in Keras, and ``0 * inf`` is NaN.

    On NumPy a reduced result is a NumPy scalar of the result dtype (``np.float32`` for
    float32 inputs) for every reduction, also for an empty batch or a zero weight sum; an
    unreduced one is an ndarray. Other libraries return their 0-d array.

    Made before Keras (or tf_keras) is imported, an instance becomes a Keras ``Loss`` the
    first time Keras checks ``isinstance(loss, keras.losses.Loss)``, so the order of the
    imports does not matter."""


class KLDivergence(_DivergenceLoss):
    __doc__ = """Keras' ``KLDivergence`` loss, on any array library and device; also from
    log-probabilities or logits.

    ``loss = y_true * log(y_true / y_pred)`` summed over the last axis (both clipped to
    ``[1e-7, 1]``; with ``inputs=``, :func:`kldiv.kl_divergence`'s ``KL(P || Q)`` of the
    given spaces), then weighted by ``sample_weight`` and reduced.
""" + _PARAMETERS + """
    name : str, default "kl_divergence"
        The loss' name (Keras uses it to label logs).""" + _OPTIONS + _NOTES + """

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
    >>> teacher = np.array([[[2.0, 1.0, 0.0], [0.5, 0.5, -np.inf]]])  # (1, 2, 3) logits
    >>> student = np.array([[[1.0, 1.0, 0.0], [0.0, 1.0, -np.inf]]])
    >>> distill = kldiv.KLDivergence(reduction="batchmean", inputs="logits", temperature=2.0)
    >>> round(float(distill(teacher, student)), 6)
    0.06192
    """

    divergence = KL
    _title = "KL divergence"

    def __init__(self, reduction: str | None = "auto", name: str = "kl_divergence", *,
                 inputs: Any = "probs", temperature: Any = 1.0, dtype: Any = None) -> None:
        super().__init__(reduction, name, inputs=inputs, temperature=temperature, dtype=dtype)


class ReverseKLDivergence(_DivergenceLoss):
    __doc__ = """The reverse Kullback-Leibler divergence loss ``KL(Q || P)``, P from ``y_true``,
    Q from ``y_pred``: :func:`kldiv.reverse_kl_divergence`, weighted and reduced.

    Mode-seeking where :class:`KLDivergence` is mass-covering. With ``inputs="probs"`` it is
    exactly ``KLDivergence`` with the inputs swapped (computed in ``y_pred``'s library).
""" + _PARAMETERS + """
    name : str, default "reverse_kl_divergence"
        The loss' name (Keras uses it to label logs).""" + _OPTIONS + _NOTES + """

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> p = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    >>> q = np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    >>> loss = kldiv.ReverseKLDivergence(reduction="sum")
    >>> round(float(loss(p, q)), 6)
    0.116622
    >>> kldiv.ReverseKLDivergence(inputs="log_probs")
    ReverseKLDivergence(reduction='auto', name='reverse_kl_divergence', inputs='log_probs')
    """

    divergence = REVERSE_KL
    _title = "reverse KL divergence"

    def __init__(self, reduction: str | None = "auto", name: str = "reverse_kl_divergence", *,
                 inputs: Any = "probs", temperature: Any = 1.0, dtype: Any = None) -> None:
        super().__init__(reduction, name, inputs=inputs, temperature=temperature, dtype=dtype)


class JensenShannonDivergence(_DivergenceLoss):
    __doc__ = """The generalized Jensen-Shannon divergence loss: :func:`kldiv.js_divergence`
    (``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``, P from
    ``y_true``), weighted and reduced.
""" + _PARAMETERS + """
    name : str, default "js_divergence"
        The loss' name (Keras uses it to label logs).
    beta : float, default 0.5
        The weight of P in the mixture, in the open interval (0, 1) (TRL's and Liger's
        ``beta``; their 0 and 1 are :class:`KLDivergence` and :class:`ReverseKLDivergence`
        with ``inputs="logits"``).""" + _OPTIONS + _NOTES + """

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> teacher = np.array([[2.0, 1.0, -np.inf], [0.0, 0.0, 0.0]])   # logits
    >>> student = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    >>> mask = np.array([True, False])                                 # the 2nd token is padding
    >>> loss = kldiv.JensenShannonDivergence(reduction="mean_with_sample_weight",
    ...                                      beta=0.5, inputs="logits")
    >>> round(float(loss(teacher, student, sample_weight=mask)), 6)
    0.083339
    >>> loss.get_config()
    {'reduction': 'mean_with_sample_weight', 'name': 'js_divergence', 'beta': 0.5, 'inputs': 'logits'}
    """

    divergence = JS
    _title = "Jensen-Shannon divergence"

    def __init__(self, reduction: str | None = "auto", name: str = "js_divergence", *,
                 beta: Any = 0.5, inputs: Any = "probs", temperature: Any = 1.0,
                 dtype: Any = None) -> None:
        super().__init__(reduction, name, inputs=inputs, temperature=temperature, dtype=dtype,
                         beta=beta)


def _kldiv_class_of_type(cls: type) -> type:
    return getattr(cls, "_kldiv_class", cls)
