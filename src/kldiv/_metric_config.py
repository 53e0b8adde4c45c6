"""How a metric is named, configured and shown: the config half of every kldiv metric.

:class:`MetricConfig` is the base of :class:`kldiv._metric_base.RunningMean` (so of every
kldiv metric): the ``name`` (a plain ``str``; ``None`` is the class' default name, as in
Keras) and the ``dtype`` (a name, checked again when read), ``get_config`` /
``from_config`` (unknown keys are a ``TypeError`` naming the class as users know it), the
items of the ``repr``, and the wording that names the class in messages
(:func:`kldiv._metric_restore.public_name`). It holds no state: the running sums, merging
and pickling are :mod:`kldiv._metric_base`'s.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from ._accumulate import metric_dtype
from ._metric_restore import public_name

__all__ = ["MetricConfig"]

_C = TypeVar("_C", bound="MetricConfig")


class MetricConfig:
    """A metric's name, dtype and config (see the module docstring).

    Subclasses set :attr:`_CONFIG_KEYS` (what :meth:`from_config` accepts) and extend
    :meth:`get_config` / :meth:`_config_arguments` when they have options.
    """

    _CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("name", "dtype")
    # How messages name the class, where its released wording differs from its public name.
    _DTYPE_OWNER: ClassVar[str | None] = None
    _CONFIG_OWNER: ClassVar[str | None] = None

    name: str
    dtype: Any

    @classmethod
    def _owner(cls) -> str:
        return public_name(cls)

    @classmethod
    def _check_name(cls, name: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"{cls._owner()} name must be a str, got {public_name(type(name))}.")

    @classmethod
    def _named(cls, name: Any) -> str:
        """``name`` as a plain ``str`` (a ``np.str_`` is stored as one, for configs and the
        repr); ``None`` is the class' default name, as in Keras
        (``keras.metrics.KLDivergence(name=None).name == "kl_divergence"``)."""
        if name is None:
            plain = getattr(cls, "_kldiv_class", cls)
            default = inspect.signature(plain.__init__).parameters.get("name")
            name = default.default if default is not None else None
        cls._check_name(name)
        return str(name)

    def _config_name(self) -> Any:
        """The ``name`` attribute for a config: a plain ``str`` also when a ``np.str_`` was
        set after construction."""
        name = self.name
        return str(name) if isinstance(name, str) else name

    @classmethod
    def _normalize_dtype(cls, dtype: Any) -> str:
        return metric_dtype(dtype, owner=cls._DTYPE_OWNER or cls._owner())

    def _dtype_name(self) -> str:
        """The ``dtype`` attribute as a name, checked again (it may be set after construction)."""
        return type(self)._normalize_dtype(self.dtype)

    def _describe(self) -> str:
        """``kldiv.metrics.KLDivergence(name=...)``: unambiguous in messages (the loss class is
        also called ``KLDivergence``)."""
        return f"{self._owner()}{repr(self)[len(type(self).__name__):]}"

    def get_config(self) -> dict[str, Any]:
        """``{"name": ..., "dtype": ...}``, as Keras saves a metric."""
        return {"name": self._config_name(), "dtype": self._dtype_name()}

    @classmethod
    def _config_arguments(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The constructor's arguments from a config (a copy): subclasses drop what Keras adds."""
        return dict(config)

    @classmethod
    def _config_keys(cls) -> tuple[str, ...]:
        return cls._CONFIG_KEYS

    @classmethod
    def from_config(cls: type[_C], config: dict[str, Any]) -> _C:
        """Rebuild a metric from :meth:`get_config` output; unknown keys raise ``TypeError``."""
        if not isinstance(config, Mapping):
            raise TypeError(f"{cls._CONFIG_OWNER or cls._owner()}.from_config takes a dict (what "
                            f"get_config() returns), got {public_name(type(config))}.")
        config = cls._config_arguments(config)
        unknown = set(config) - set(cls._config_keys())
        if unknown:
            owner = cls._CONFIG_OWNER or cls._owner()
            raise TypeError(f"Unknown {owner} config keys: {sorted(unknown, key=repr)}.")
        return cls(**config)

    def _repr_items(self) -> str:
        try:
            config = self.get_config()
        except (TypeError, ValueError):  # a dtype attribute set to a bad value: repr never raises
            config = {"name": self._config_name(), "dtype": self.dtype}
        return ", ".join(f"{key}={value!r}" for key, value in config.items())
