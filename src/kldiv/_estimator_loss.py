"""The :class:`KLEstimator` loss: sampled-token KL estimates, masked, weighted and reduced."""

from __future__ import annotations

from typing import Any, ClassVar

from ._estimators import (
    EstimatorOptions,
    compute_estimate,
    estimator_options,
    kl_estimate,
    prepare_estimate,
)
from ._loss_base import LossBase
from ._reduction import reduce_loss

__all__ = ["KLEstimator"]


class KLEstimator(LossBase):
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
    A token of weight 0 whose estimate is not finite is left out rather than multiplied by 0,
    so that an ``inf`` or NaN log-probability at a padded position reaches neither the loss
    nor its gradient (a finite one is multiplied by 0: the derivative with respect to its
    weight is then right).

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

    _INPUT: ClassVar[str] = "logprob"
    _OPTION_KEYS: ClassVar[tuple[str, ...]] = ("estimator", "log_ratio_clamp", "value_clamp", "gradient")

    def __init__(self, estimator: str = "k3", *, reduction: str | None = "mean_with_sample_weight",
                 name: str = "kl_estimator", log_ratio_clamp: float | None = None,
                 value_clamp: float | None = None, gradient: str = "same", dtype: Any = None) -> None:
        options = estimator_options(estimator, log_ratio_clamp, value_clamp, gradient)
        self.estimator, self.log_ratio_clamp, self.value_clamp, self.gradient = options
        self._set_common(reduction, name)
        self._set_dtype(dtype)

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

        def reduce() -> Any:
            est, weights = compute_estimate(inputs, options, sample_weight)
            return reduce_loss(inputs.xp, est, weights, reduction=self.reduction)

        return self._reduced(inputs.xp, inputs.device, inputs.out_dtype, reduce)

    def _config(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "reduction": self.reduction, "name": self.name,
                "log_ratio_clamp": self.log_ratio_clamp, "value_clamp": self.value_clamp,
                "gradient": self.gradient}

    @classmethod
    def _config_keys(cls) -> tuple[str, ...]:
        return ("reduction", "name", *cls._OPTION_KEYS)
