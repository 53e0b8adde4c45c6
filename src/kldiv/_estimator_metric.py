"""The :class:`KLEstimator` metric: a running (weighted) mean of per-token KL estimates.

Exported as ``kldiv.metrics.KLEstimator``. It is a :class:`kldiv._metric_base.RunningMean`,
the engine of every kldiv metric (state, ``result``, ``merge_state``, config, pickling); what
it adds is one batch's sums (:meth:`KLEstimator.update_state`), which leave masked tokens out
entirely. It is not Keras-aware: Keras' ``MeanMetricWrapper`` multiplies per-sample values by
the weights, so an ``inf`` or NaN at a masked token would reach its mean.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ._accumulate import accumulator_dtype, detached, num_elements
from ._estimators import compute_estimate, estimator_options, prepare_estimate
from ._libraries import library
from ._metric_base import RunningMean

__all__ = ["KLEstimator"]


class KLEstimator(RunningMean):
    """Running mean of per-token ``KL(policy || reference)`` estimates over many batches.

    Each :meth:`update_state` computes the estimates of :func:`kldiv.kl_estimate`, adds
    ``sum(w * est)`` to a total and ``sum(w)`` (without weights: the number of tokens) to a
    count; :meth:`result` is ``total / count``, 0 while the count is 0. A mask is a weight:
    with ``sample_weight=mask`` the result is the mean over unmasked tokens, and masked
    tokens are left out entirely (an ``inf`` or NaN there does not reach the total).

    The state lives in the first batch's library (``logprob``'s) and on its device, as 0-d
    arrays, accumulated in float64 where the library has it there, else in float32 with
    compensated summation, like :class:`kldiv.metrics.KLDivergence`. No gradient is kept.

    Parameters
    ----------
    estimator : {"k3", "k1", "k2"}, default "k3"
    log_ratio_clamp, value_clamp : float, optional
        See :func:`kldiv.kl_estimate`.
    name : str, default "kl_estimator"
    dtype : str or dtype, default "float32"
        The dtype of :meth:`result`: ``"float32"``, ``"float64"``, ``"float16"`` or
        ``"bfloat16"``.

    Examples
    --------
    >>> import numpy as np
    >>> from kldiv.metrics import KLEstimator
    >>> m = KLEstimator(estimator="k1")
    >>> m.update_state([-0.5, -1.0], [-0.7, -0.9])
    >>> m.update_state([-0.1, -3.0], [-0.2, -2.5], sample_weight=[1, 0])
    >>> print(round(float(m.result()), 6))
    0.066667
    >>> m.get_config()
    {'estimator': 'k1', 'log_ratio_clamp': None, 'value_clamp': None, 'name': 'kl_estimator', 'dtype': 'float32'}
    """

    _CONFIG_KEYS: ClassVar[tuple[str, ...]] = ("estimator", "log_ratio_clamp", "value_clamp", "name", "dtype")
    # the wording of this metric's messages since its release
    _DTYPE_OWNER = "Metric"
    _CONFIG_OWNER = "KLEstimator metric"

    def __init__(self, estimator: str = "k3", *, log_ratio_clamp: float | None = None,
                 value_clamp: float | None = None, name: str = "kl_estimator",
                 dtype: Any = None) -> None:
        options = estimator_options(estimator, log_ratio_clamp, value_clamp)
        self.estimator, self.log_ratio_clamp, self.value_clamp = options[:3]
        self._kldiv_init(name, dtype)

    def _batch(self, inputs: Any, sample_weight: Any) -> tuple[Any, Any]:
        """``(sum(w * est), sum(w) or the count)`` of one batch, in the accumulator dtype."""
        xp = inputs.xp
        options = estimator_options(self.estimator, self.log_ratio_clamp, self.value_clamp)
        acc = accumulator_dtype(xp, inputs.device)
        est, weights = compute_estimate(inputs, options, sample_weight)
        est = est if est.dtype == acc else xp.astype(est, acc)
        n = num_elements(tuple(est.shape))
        if weights is None:
            count: Any = xp.sum(xp.ones_like(est)) if n is None else n
            return xp.sum(est), count
        # the inputs are detached (update_state), the weights too: weights that require grad
        # made the state a graph that grew with every update
        (weights,) = detached(xp, weights)
        weights = weights if weights.dtype == acc else xp.astype(weights, acc)
        full = weights * xp.ones_like(est)  # the weights broadcast to the estimate's shape
        return xp.sum(est * weights), xp.sum(full)

    def update_state(self, logprob: Any, ref_logprob: Any, sample_weight: Any = None) -> None:
        """Add one batch: ``sum(w * est)`` to the total, ``sum(w)`` (or the count) to the count.

        ``logprob``, ``ref_logprob`` as for :func:`kldiv.kl_estimate`; ``sample_weight``
        (a mask, or weights) follows Keras 2's rank rules, as for the loss class.
        """
        inputs = prepare_estimate(logprob, ref_logprob)
        xp = inputs.xp
        logprob, ref_logprob = detached(xp, inputs.logprob, inputs.ref_logprob)
        inputs = inputs._replace(logprob=logprob, ref_logprob=ref_logprob)
        scope = library(xp, tracing=inputs.tracing).device_scope(inputs.device)
        if scope is None:
            total, count = self._batch(inputs, sample_weight)
        else:
            with scope:  # TensorFlow, eagerly: on logprob's device
                total, count = self._batch(inputs, sample_weight)
        self._add(xp, total, count)

    def merge_state(self, *others: Any) -> None:
        """Add the states of other ``KLEstimator`` metrics of the same options (workers' parts).

        Raises
        ------
        TypeError
            If an argument is not a ``KLEstimator`` metric or holds another library.
        ValueError
            If its options differ (its mean is of other numbers) or its state is on another
            device.
        """
        super().merge_state(*others)

    def _options(self) -> tuple[Any, ...]:
        return (self.estimator, self.log_ratio_clamp, self.value_clamp)

    # -- config --------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments."""
        return {
            "estimator": self.estimator,
            "log_ratio_clamp": self.log_ratio_clamp,
            "value_clamp": self.value_clamp,
            "name": self._config_name(),
            "dtype": self._dtype_name(),
        }
