"""The loss classes' common base.

:class:`LossBase` is what every kldiv loss class shares: Keras interop
(:class:`kldiv._keras.KerasAwareLoss`), the ``reduction``/``name``/``dtype`` arguments, the
reduction run on the inputs' device and the final cast, config (``get_config`` /
``from_config``), ``repr``, pickling and equality. :class:`DivergenceLoss` is the loss of one
member of the divergence family (:mod:`kldiv._divergence`) with its options; the public
classes are in :mod:`kldiv.losses`. :class:`kldiv.KLEstimator` (:mod:`kldiv._estimator_loss`)
is a :class:`LossBase` too.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from ._cast import cast_quietly
from ._dispatch import Call, compute, resolve, resolve_traced
from ._divergence import Divergence
from ._keras import KerasAwareLoss, kldiv_class
from ._libraries import library
from ._namespace import dtype_name, namespace_name, numpy_result, torch_compiling
from ._reduction import reduce_loss, validate_reduction
from ._spaces import prepare

__all__ = ["DivergenceLoss", "LossBase", "restore", "result_dtype", "validate_dtype"]

_DTYPE_NAMES = frozenset({"float16", "bfloat16", "float32", "float64"})
_MIXED_POLICIES = frozenset({"mixed_float16", "mixed_bfloat16"})  # Keras' mixed precision policies


def validate_dtype(dtype: Any, *, owner: str = "KLDivergence") -> str | None:
    """``None``, or the name of a floating dtype: a name (Keras' ``"mixed_..."`` policies give
    their compute dtype), a Keras ``DTypePolicy``, or any library's dtype object
    (``np.float64``, ``torch.float64``, ``tf.float64``, ``ml_dtypes.bfloat16``, ...). Stored as
    the name, so that configs hold a string that Keras and :meth:`LossBase.from_config`
    read back. ``owner`` is the class the messages name."""
    if dtype is None:
        return None
    if dtype is float:  # Python's float: float32, as in Keras (and kldiv's metrics), not NumPy's float64
        return "float32"
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


def result_dtype(xp: Any, name: str, *, owner: str = "KLDivergence", what: str = "y_pred") -> Any:
    """The dtype called ``name`` in ``xp`` (NumPy's and Dask's bfloat16 from ml_dtypes);
    ``what`` names the input whose library ``xp`` is, in messages."""
    dtype = getattr(xp, name, None)
    numpy_dtypes = library(xp).numpy_dtypes  # NumPy's and Dask's dtypes are NumPy's
    if dtype is None and name != "bfloat16" and numpy_dtypes:
        dtype = np.dtype(name)  # float16: not in the array API, so not in every compat namespace
    if dtype is None and name == "bfloat16" and numpy_dtypes:
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
            f"one {what}'s library holds."
        )
    return dtype


def restore(cls: Any, state: dict[str, Any]) -> Any:
    """Unpickle a loss: an instance of ``cls`` (Keras-aware when a Keras is loaded) with ``state``."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


# Pickles name it as they always have (``kldiv.losses`` re-exports it under this name).
restore.__module__, restore.__qualname__ = "kldiv.losses", "_restore"

_L = TypeVar("_L", bound="LossBase")


class LossBase(KerasAwareLoss):
    """A Keras-style loss: ``loss(a, b, sample_weight=None)`` weighted, reduced and cast.

    A subclass calls :meth:`_set_common` and :meth:`_set_dtype` from ``__init__``, implements ``call`` and
    ``__call__`` (through :meth:`_reduced`), :meth:`_config` (its constructor arguments but
    ``dtype``) and :meth:`_config_keys`; it may override :meth:`_config_arguments` (what
    Keras adds to a config) and :meth:`_repr_items`.
    """

    _INPUT: ClassVar[str] = "y_pred"  # the argument whose library, device and dtype the result has

    reduction: str
    name: str
    dtype: str | None

    def _set_common(self, reduction: str | None, name: Any) -> None:
        """Validate and set ``reduction`` and ``name``: a plain ``str`` (a ``np.str_`` is
        stored as one, for configs and the repr); ``None`` is the class' default name, as in
        Keras (``keras.losses.KLDivergence(name=None).name == "kl_divergence"``)."""
        self.reduction = validate_reduction(reduction, batchmean=True)
        self.name = self._checked_name(name)

    def _checked_name(self, name: Any) -> str:
        """``name`` as a plain ``str`` (``None``: the class' default); ``TypeError`` otherwise."""
        if name is None:
            name = _default_name(kldiv_class(self))
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")
        return str(name)

    def _set_dtype(self, dtype: Any) -> None:
        """Validate and set ``dtype`` (messages name this class)."""
        self.dtype = validate_dtype(dtype, owner=type(self).__name__)

    def _reduced(self, xp: Any, device: Any, out_dtype: Any, reduce: Callable[[], Any],
                 tracing: bool | None = None) -> Any:
        """``reduce()`` (the weighted, reduced loss in the compute dtype: float32 for half
        precision, as a sum of many float16 losses overflows) run on the inputs' ``device``,
        then cast once to ``self.dtype`` (by default ``out_dtype``, the inputs').
        ``tracing``: :func:`torch_compiling`'s answer where the caller has it."""
        scope = library(xp, tracing=tracing).device_scope(device)
        if scope is None:
            out = reduce()
        else:
            with scope:  # TensorFlow, eagerly: on the inputs' device
                out = reduce()
        owner = type(self).__name__
        # checked again: the attribute may have been set after construction ("int32" would
        # truncate the loss silently)
        name = validate_dtype(self.dtype, owner=owner)
        if tracing is None:
            tracing = torch_compiling()
        if name == "float64" and not tracing and dtype_name(out_dtype) != "float64":
            lib = library(xp)
            if not lib.has_float64(xp, device):
                # JAX without jax_enable_x64 would cast to float32 (with its own warning), torch
                # on MPS refuse: the loss' error, not a result in another dtype
                raise ValueError(
                    f"{owner}(dtype='float64'): {lib.name} holds no float64 on {self._INPUT}'s "
                    f"device {device} (JAX: only with jax_enable_x64); choose a dtype it holds, "
                    "or leave dtype=None."
                )
        dtype = out_dtype if name is None else result_dtype(xp, name, owner=owner, what=self._INPUT)
        if out.dtype != dtype:
            try:
                out = cast_quietly(xp, out, dtype)  # beyond a half dtype's range: inf
            except (TypeError, ValueError, RuntimeError) as exc:  # e.g. no float64 on the device
                raise ValueError(
                    f"{owner}(dtype={self.dtype!r}): the result cannot be cast to {dtype} "
                    f"on {self._INPUT}'s device {device}: {exc}"
                ) from None
        return numpy_result(out)

    # -- config, repr, pickling --------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def _config_keys(cls) -> tuple[str, ...]:
        raise NotImplementedError

    @classmethod
    def _config_arguments(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The constructor's arguments from a config (a copy): subclasses drop what Keras adds."""
        return dict(config)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras would save them (JSON-ready: a pair of input
        spaces is a list).

        Attributes set after construction are validated here as the constructor validates
        them (its ``TypeError``/``ValueError``) and saved as it stores them: plain ``str`` and
        ``float`` values, never a NumPy scalar (which JSON cannot hold) nor a value that
        :meth:`from_config` would refuse or read as another option.
        """
        config = self._config()
        if "reduction" in config:
            config["reduction"] = validate_reduction(config["reduction"], batchmean=True)
        if "name" in config:
            config["name"] = self._checked_name(config["name"])
        # by name, also when the attribute was set after construction (a dtype object)
        name = validate_dtype(self.dtype, owner=type(self).__name__)
        if name is not None:
            config["dtype"] = name
        return config

    @classmethod
    def from_config(cls: type[_L], config: dict[str, Any]) -> _L:
        """Rebuild a loss from :meth:`get_config` output, or a Keras 2 / Keras 3 config.

        Keras 2 configs of a divergence carry an ``"fn"`` key naming the function; Keras 3
        configs may hold ``"reduction": None`` and a ``"dtype"`` policy (its serialized
        dict). A config that is not a mapping, or has unknown (or non-string) keys, raises
        ``TypeError``; a malformed ``"dtype"`` entry raises ``ValueError``.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls.__name__}.from_config: config must be a dict (what "
                            f"get_config() returns), got {type(config).__name__}.")
        config = cls._config_arguments(dict(config))
        dtype = config.pop("dtype", None)
        if isinstance(dtype, Mapping):  # Keras 3 DTypePolicy config
            policy = dtype.get("config")
            dtype = policy.get("name") if isinstance(policy, Mapping) else None
            if not isinstance(dtype, str):
                raise ValueError(
                    f"{cls.__name__}.from_config: the 'dtype' entry is not a Keras DTypePolicy "
                    "config (a dict whose 'config' holds a 'name' string)."
                )
        unknown = set(config) - set(cls._config_keys())
        if unknown:
            raise TypeError(f"Unknown {cls.__name__} config keys: {sorted(unknown, key=repr)}.")
        return cls(**config, dtype=dtype)

    def _repr_items(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_items()})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The kldiv class, not the Keras-aware subclass (nor Keras' own __reduce__)
        state = {k: v for k, v in self.__dict__.items() if k != "_call"}  # rebuilt on use
        return (restore, (kldiv_class(self), state))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LossBase) or kldiv_class(other) is not kldiv_class(self):
            return NotImplemented
        if other is self:
            return True
        try:
            return self.get_config() == other.get_config()
        except (TypeError, ValueError):  # an invalid attribute set since: identity (see __hash__)
            return False

    def __hash__(self) -> int:
        """The hash of the class and config, as ``==`` compares them: lets ``jax.jit(loss)``
        and Keras (which hashes the objects it is given) take a loss object.

        ``jax.jit`` keys its traces on the callable's hash and ``==``: with the class' hash
        alone, a loss traced, then given other options (``loss.temperature = 3.0``), left a
        trace that any later loss with those options (``jax.jit(KLDivergence(...,
        temperature=3.0))``) was served, computed with the old ones. (The changed object
        itself keeps its traces, as any state a jitted function captures: set a loss' options
        before its first ``jax.jit``.)
        """
        try:
            config = self.get_config()
        except (TypeError, ValueError):  # an invalid attribute set since: no == either
            return hash(kldiv_class(self))
        return hash((kldiv_class(self), _frozen(config)))


def _default_name(cls: type) -> str:
    """The default of ``name`` in ``cls``' constructor (its snake-case name where it has none)."""
    default = inspect.signature(cls).parameters.get("name")
    if default is not None and isinstance(default.default, str):
        return default.default
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", cls.__name__).lower()


def _frozen(value: Any) -> Any:
    """A config value made hashable, equal values alike (``1 == 1.0``, lists as tuples)."""
    if isinstance(value, Mapping):
        return frozenset((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


class DivergenceLoss(LossBase):
    """The loss of a member of the divergence family (``divergence``) with its options,
    Keras-style reductions and sample weights. A subclass names its member (class keywords
    ``member=`` and ``title=``) and gives ``__init__`` its defaults and docstring.

    An instance made before Keras (or tf_keras) is imported becomes a Keras ``Loss`` the first
    time Keras checks ``isinstance(loss, keras.losses.Loss)`` (see :mod:`kldiv._keras.loss`).
    """

    divergence: ClassVar[Divergence]
    _title: ClassVar[str]  # what the member is called in messages

    # Defaults for instances unpickled from before these options existed
    inputs: str | tuple[str, str] = "probs"
    temperature: float = 1.0

    def __init_subclass__(cls, member: Divergence | None = None, title: str = "",
                          **kwargs: Any) -> None:
        """``class KLDivergence(DivergenceLoss, member=KL, title="KL divergence")``: the
        member and its name in messages (subclasses without them inherit their base's)."""
        super().__init_subclass__(**kwargs)
        if member is not None:
            cls.divergence, cls._title = member, title

    def __init__(self, reduction: str | None, name: str | None, *, inputs: Any = "probs",
                 temperature: Any = 1.0, dtype: Any = None, **params: Any) -> None:
        self._set_common(reduction, name)
        call = resolve(self.divergence, inputs=inputs, temperature=temperature, **params)
        spaces = call.spaces
        self.inputs = spaces[0] if spaces[0] == spaces[1] else spaces
        self.temperature = call.temperature
        for key, value in call.params.items():  # the member's parameters (beta)
            setattr(self, key, value)
        self.__dict__["_call"] = call  # after the options: setting one forgets it (__setattr__)
        self._set_dtype(dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        """Setting an option (``inputs``, ``temperature``, the member's parameters) after
        construction forgets the options resolved so far: the next call resolves and checks
        them again, also when ``torch.compile`` traces it (which otherwise uses the options
        last resolved, unchecked: the constructor's would be used silently)."""
        super().__setattr__(name, value)
        if name in ("inputs", "temperature") or name in self.divergence.params:
            self.__dict__.pop("_call", None)

    def _resolved(self, compiling: bool | None = None) -> Call:
        """The member with this loss' options (validated again: attributes may be set).

        While ``torch.compile`` traces, the options last validated eagerly are used as they
        are, unless an option was set since (:meth:`__setattr__` forgets them then): dynamo
        may trace Python float attributes as symbolic values (dynamic shapes).
        """
        cached: Call | None = self.__dict__.get("_call")  # absent in pickles (rebuilt on use)
        if compiling is None:
            compiling = torch_compiling()
        if cached is not None and compiling:
            return cached
        params = {key: getattr(self, key) for key in self.divergence.params}
        call = resolve_traced(self.divergence, self.inputs, self.temperature, params, compiling)
        if not compiling:  # (no side effect in a traced graph)
            self.__dict__["_call"] = call  # not through __setattr__: once per call
        return call

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """The unreduced, unweighted per-sample loss (Keras' ``Loss.call``), after Keras 2's
        rank squeeze (see :meth:`__call__`)."""
        compiling = torch_compiling()  # asked once here
        call = self._resolved(compiling)
        prep = prepare(y_true, y_pred, squeeze=True, tracing=compiling)
        return numpy_result(compute(call, prep, compiling=compiling))

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
        """Weighted, reduced loss. ``sample_weight`` follows Keras 2's rank rules; a mask
        (``labels != -100``, bool or 0/1) is a sample weight."""
        compiling = torch_compiling()  # asked once here (each check costs about 0.1 us)
        call = self._resolved(compiling)
        prep = prepare(y_true, y_pred, squeeze=True, tracing=compiling)

        def reduce() -> Any:
            per_sample = compute(call, prep, cast=False, compiling=compiling)
            return reduce_loss(prep.xp, per_sample, sample_weight, reduction=self.reduction,
                               tracing=compiling)

        return self._reduced(prep.xp, prep.device, prep.out_dtype, reduce, compiling)

    def _options(self) -> dict[str, Any]:
        """The member's options as config entries, validated (:meth:`_resolved`: the
        constructor's errors for a value set since) and as the constructor stores them: its
        parameters always, ``inputs`` and ``temperature`` when not the defaults (so that a
        default KL's config is Keras')."""
        call = self._resolved()
        options: dict[str, Any] = {key: call.params.get(key, getattr(self, key))
                                   for key in self.divergence.params}
        first, second = call.spaces
        if (first, second) != ("probs", "probs"):
            options["inputs"] = first if first == second else [first, second]
        if call.temperature != 1.0:
            options["temperature"] = call.temperature
        return options

    def _raw_options(self) -> dict[str, Any]:
        """The options as the attributes hold them (unvalidated: for the repr, which must not
        raise for an invalid value set after construction)."""
        options: dict[str, Any] = {key: getattr(self, key) for key in self.divergence.params}
        if self.inputs != "probs":
            options["inputs"] = self.inputs
        if self.temperature != 1.0 or type(self.temperature) is bool:
            options["temperature"] = self.temperature
        return options

    def _config(self) -> dict[str, Any]:
        return {"reduction": self.reduction, "name": self.name, **self._options()}

    @classmethod
    def _config_keys(cls) -> tuple[str, ...]:
        return ("reduction", "name", "inputs", "temperature", *cls.divergence.params)

    @classmethod
    def _config_arguments(cls, config: dict[str, Any]) -> dict[str, Any]:
        config = dict(config)
        div = cls.divergence
        fn = config.pop("fn", None)  # Keras 2 configs name the function
        if fn is not None and (not isinstance(fn, str) or fn not in {div.name, *div.aliases}):
            raise ValueError(f"config names function {fn!r}, not the {cls._title}.")
        return config

    def _repr_items(self) -> str:
        # the validated values where they are valid (a pair of spaces as a tuple, as given),
        # else the attributes as they are: repr must not raise for an invalid value set after
        # construction (the next call, or get_config, refuses it)
        try:
            options = self._options()
            reduction: Any = validate_reduction(self.reduction, batchmean=True)
            name: Any = self._checked_name(self.name)
        except (TypeError, ValueError):
            options, reduction, name = self._raw_options(), self.reduction, self.name
        if isinstance(options.get("inputs"), list):
            options["inputs"] = tuple(options["inputs"])
        items = "".join(f", {key}={value!r}" for key, value in options.items())
        dtype = getattr(self, "dtype", None)  # as stored (a name), not validated either
        dtype_item = "" if dtype is None else f", dtype={dtype!r}"
        return f"reduction={reduction!r}, name={name!r}{dtype_item}{items}"
