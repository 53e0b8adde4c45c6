"""The :class:`KLEstimator` loss: sampled-token KL estimates, masked, weighted and reduced."""

from __future__ import annotations

import inspect
from typing import Any

from ._estimators import (
    EstimatorOptions,
    compute_estimate,
    estimator_options,
    kl_estimate,
    prepare_estimate,
)
from ._namespace import device_scope, numpy_result
from ._reduction import reduce_loss, validate_reduction
from .losses import (
    _keras_loss_bases,
    _kldiv_class,
    _kldiv_class_of_type,
    _restore,
    _result_dtype,
    _validate_dtype,
    _with_keras_bases,
    keras_aware_class,
)

__all__ = ["KLEstimator"]

_OPTION_KEYS = ("estimator", "log_ratio_clamp", "value_clamp", "gradient")


def _as_ours(exc: ValueError) -> ValueError:
    """The KL loss' dtype error, naming this class."""
    return ValueError(str(exc).replace("KLDivergence", "KLEstimator"))


class KLEstimator:
    """Loss: the mean (or another reduction) of per-token estimates of ``KL(policy || reference)``.

    Called as ``loss(logprob, ref_logprob, sample_weight=None)``: the per-token estimates of
    :func:`kldiv.kl_estimate` (same options, same argument order as verl's ``kl_penalty`` and
    OpenRLHF's ``compute_approx_kl``), weighted by ``sample_weight`` and reduced over every
    token. There is no class axis: the estimate has the broadcast shape of the inputs, e.g.
    ``(batch, tokens)``, and the reduction runs over all of it.

    Parameters
    ----------
    estimator : {"k3", "k1", "k2"}, default "k3"
        See :func:`kldiv.kl_estimate`.
    reduction : str or None, default "mean_with_sample_weight"
        ``"mean_with_sample_weight"``: ``sum(w * est) / sum(w)``, the mean over unmasked tokens
        (verl's ``"token-mean"``), the plain mean without weights, and 0 when every weight is
        0 (with zero, finite gradients). ``"auto"`` / ``"sum_over_batch_size"`` / ``"mean"``:
        ``sum(w * est)`` divided by the number of tokens, masked ones included; ``"sum"``;
        ``"none"`` (or ``None``): the weighted per-token estimates. See :class:`kldiv.Reduction`.
    name : str, default "kl_estimator"
    log_ratio_clamp, value_clamp : float, optional
        See :func:`kldiv.kl_estimate`; verl's k3 is ``log_ratio_clamp=20, value_clamp=10``.
    gradient : {"same", "k2"}, default "same"
        See :func:`kldiv.kl_estimate` (``"k2"``: verl's ``"+"`` straight-through variants).
    dtype : dtype or str, optional
        If given, the result is cast to this dtype (Keras 3's ``dtype``); by default it has
        ``logprob``'s floating dtype. Half precision is weighted and reduced in float32.

    Notes
    -----
    ``sample_weight`` follows Keras 2's rank rules, as for :class:`kldiv.KLDivergence`, with
    the per-token estimate as the loss: a scalar; the estimate's shape, or one more axis of
    size 1; one rank less (a ``(batch,)`` weight scales each sequence of a ``(batch, tokens)``
    estimate); or anything that broadcasts to it. A mask is a weight: ``sample_weight=mask``.
    A token of weight 0 is left out rather than multiplied by 0, so that an ``inf`` or NaN
    log-probability at a padded position reaches neither the loss nor its gradient.

    The argument order is the RL libraries' ``(logprob, ref_logprob)``, not Keras'
    ``(y_true, y_pred)``. With Keras loaded the instance is also a ``keras.losses.Loss``; but
    Keras' ``compile`` passes ``(targets, model outputs)``, so there give it a function with
    the order turned round instead: ``loss=lambda ref, lp: kldiv.kl_estimate(lp, ref)``.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> logprob = np.array([[-0.5, -1.0, -2.0], [-0.1, -3.0, -9.0]], dtype=np.float32)
    >>> ref_logprob = np.array([[-0.7, -0.9, -2.0], [-0.2, -2.5, 0.0]], dtype=np.float32)
    >>> mask = np.array([[1, 1, 1], [1, 1, 0]])  # the last token is padding
    >>> loss = kldiv.KLEstimator()  # k3, mean over unmasked tokens
    >>> print(round(float(loss(logprob, ref_logprob, sample_weight=mask)), 6))
    0.035492
    >>> print(round(float(kldiv.KLEstimator(estimator="k1")(logprob, ref_logprob, sample_weight=mask)), 6))
    -0.06
    """

    # With Keras loaded, the instance is also a keras.losses.Loss, as kldiv.KLDivergence is
    # (see kldiv.losses): from the start when Keras was imported first, else at the first
    # isinstance check
    __class__ = keras_aware_class

    def __new__(cls, *args: Any, **kwargs: Any) -> KLEstimator:
        bases = tuple(b for b in _keras_loss_bases() if not issubclass(cls, b))
        if bases:
            cls = _with_keras_bases(_kldiv_class_of_type(cls), _keras_loss_bases())
        return super().__new__(cls)

    def __init__(
        self,
        estimator: str = "k3",
        *,
        reduction: str | None = "mean_with_sample_weight",
        name: str = "kl_estimator",
        log_ratio_clamp: float | None = None,
        value_clamp: float | None = None,
        gradient: str = "same",
        dtype: Any = None,
    ) -> None:
        options = estimator_options(estimator, log_ratio_clamp, value_clamp, gradient)
        self.estimator, self.log_ratio_clamp, self.value_clamp, self.gradient = options
        self.reduction = validate_reduction(reduction, batchmean=True)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")
        self.name = name
        try:
            self.dtype = _validate_dtype(dtype)
        except ValueError as exc:
            raise _as_ours(exc) from None

    @property
    def options(self) -> EstimatorOptions:
        """The estimator's options (validated again: attributes may have been set since)."""
        return estimator_options(self.estimator, self.log_ratio_clamp, self.value_clamp, self.gradient)

    def call(self, logprob: Any, ref_logprob: Any) -> Any:
        """The unweighted, unreduced per-token estimates (Keras' ``Loss.call``)."""
        return kl_estimate(logprob, ref_logprob, **self.options._asdict())

    def __call__(self, logprob: Any, ref_logprob: Any, sample_weight: Any = None) -> Any:
        """The weighted, reduced estimate (a 0-d array of ``logprob``'s library)."""
        options = self.options
        inputs = prepare_estimate(logprob, ref_logprob)
        xp = inputs.xp
        scope = device_scope(xp, inputs.device)
        # weighted and reduced in the compute dtype (float32 for half precision), then cast
        if scope is None:
            est, weights = compute_estimate(inputs, options, sample_weight)
            out = reduce_loss(xp, est, weights, reduction=self.reduction)
        else:
            with scope:  # TensorFlow, eagerly: on logprob's device
                est, weights = compute_estimate(inputs, options, sample_weight)
                out = reduce_loss(xp, est, weights, reduction=self.reduction)
        try:
            dtype = inputs.out_dtype if self.dtype is None else _result_dtype(xp, self.dtype)
        except ValueError as exc:
            raise _as_ours(exc) from None
        if out.dtype != dtype:
            try:
                out = xp.astype(out, dtype)
            except (TypeError, ValueError, RuntimeError) as exc:  # e.g. no float64 on the device
                raise ValueError(
                    f"KLEstimator(dtype={self.dtype!r}): the result cannot be cast to {dtype} "
                    f"on logprob's device {inputs.device}: {exc}"
                ) from None
        return numpy_result(out)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as Keras would save them."""
        config: dict[str, Any] = {
            "estimator": self.estimator,
            "reduction": self.reduction,
            "name": self.name,
            "log_ratio_clamp": self.log_ratio_clamp,
            "value_clamp": self.value_clamp,
            "gradient": self.gradient,
        }
        if self.dtype is not None:
            config["dtype"] = self.dtype
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KLEstimator:
        """Rebuild a loss from :meth:`get_config` output (a Keras 3 config may hold
        ``"reduction": None`` and a ``"dtype"`` policy). Unknown keys raise ``TypeError``."""
        config = dict(config)
        dtype = config.pop("dtype", None)
        if isinstance(dtype, dict):  # Keras 3 DTypePolicy config
            dtype = dtype.get("config", {}).get("name")
        unknown = set(config) - {"reduction", "name", *_OPTION_KEYS}
        if unknown:
            raise TypeError(f"Unknown KLEstimator config keys: {sorted(unknown)}.")
        return cls(**config, dtype=dtype)

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The kldiv class, not the Keras-aware subclass (nor Keras' own __reduce__)
        return (_restore, (_kldiv_class(self), dict(self.__dict__)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KLEstimator) or _kldiv_class(other) is not _kldiv_class(self):
            return NotImplemented
        return self.get_config() == other.get_config()

    __hash__ = None  # type: ignore[assignment]


# ``inspect.signature(KLEstimator)`` (IDEs, ``help()``) reads ``__new__``: show ``__init__``'s
KLEstimator.__new__.__signature__ = inspect.signature(KLEstimator.__init__).replace(  # type: ignore[attr-defined]
    return_annotation=inspect.Signature.empty
)
