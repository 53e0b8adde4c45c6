"""The :class:`KLEstimator` metric: a running (weighted) mean of per-token KL estimates.

Exported as ``kldiv.metrics.KLEstimator``. It accumulates with the KL metric's engine
(``RunningSum`` and friends in :mod:`kldiv.metrics`), read through the module at call time
so that ``kldiv.metrics`` can import this module wherever it likes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import metrics as _metrics
from ._estimators import compute_estimate, estimator_options, prepare_estimate
from ._namespace import array_namespace, device_scope, get_device, namespace_name

__all__ = ["KLEstimator"]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(dtype: Any) -> str:
    if dtype is None:
        return "float32"
    if isinstance(dtype, dict):  # Keras 3 DTypePolicy config
        dtype = dtype.get("config", {}).get("name", "float32")
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype).rsplit(".", 1)[-1]
    name = name.lower().removeprefix("mixed_")
    if name not in _FLOAT_NAMES:
        raise ValueError(f"Metric dtype must be one of {', '.join(_FLOAT_NAMES)}; got {dtype!r}.")
    return name


def _num_elements(shape: tuple[Any, ...]) -> int | None:
    n = 1
    for d in shape:
        if d is None or d != d:  # unknown (a tracer's None, Dask's NaN)
            return None
        n *= int(d)
    return n


class KLEstimator:
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

    def __init__(
        self,
        estimator: str = "k3",
        *,
        log_ratio_clamp: float | None = None,
        value_clamp: float | None = None,
        name: str = "kl_estimator",
        dtype: Any = None,
    ) -> None:
        options = estimator_options(estimator, log_ratio_clamp, value_clamp)
        self.estimator, self.log_ratio_clamp, self.value_clamp = options[:3]
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")
        self.name = name
        self.dtype = _dtype_name(dtype)
        self._total: Any = None  # kldiv.metrics.RunningSum once updated
        self._count: Any = None

    # -- state ---------------------------------------------------------------------------

    @property
    def library(self) -> str | None:
        """The library holding the state, ``None`` before any update."""
        return None if self._total is None else namespace_name(array_namespace(self._total.value))

    @property
    def device(self) -> Any:
        """The device holding the state, ``None`` before any update."""
        return None if self._total is None else get_device(self._total.value)

    @property
    def variables(self) -> list[Any]:
        """The state arrays ``[total, count]``; empty before any update."""
        if self._total is None or self._count is None:
            return []
        return [self._total.total(), self._count.total()]

    def _batch(self, inputs: Any, sample_weight: Any) -> tuple[Any, Any]:
        """``(sum(w * est), sum(w) or the count)`` of one batch, in the accumulator dtype."""
        xp = inputs.xp
        options = estimator_options(self.estimator, self.log_ratio_clamp, self.value_clamp)
        acc = _metrics.accumulator_dtype(xp, inputs.device)
        est, weights = compute_estimate(inputs, options, sample_weight)
        est = est if est.dtype == acc else xp.astype(est, acc)
        n = _num_elements(tuple(est.shape))
        if weights is None:
            count: Any = xp.sum(xp.ones_like(est)) if n is None else n
            return xp.sum(est), count
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
        if namespace_name(xp) == "torch":  # no autograd graph in accumulated state
            inputs = inputs._replace(logprob=inputs.logprob.detach(), ref_logprob=inputs.ref_logprob.detach())
        scope = device_scope(xp, inputs.device)
        if scope is None:
            total, count = self._batch(inputs, sample_weight)
        else:
            with scope:  # TensorFlow, eagerly: on logprob's device
                total, count = self._batch(inputs, sample_weight)
        if self._total is None or self._count is None:
            compensated = total.dtype != xp.float64
            self._total = _metrics.RunningSum(total, compensated)
            if not hasattr(count, "shape"):
                count = xp.zeros_like(total) + count
            self._count = _metrics.RunningSum(count, compensated)
            return
        _metrics.check_same_place(self._total.value, total, what="update_state", owner=repr(self))
        self._total.add(total)
        self._count.add(count)

    def result(self) -> Any:
        """``total / count`` (0 when the count is 0): a 0-d array of the state's library."""
        if self._total is None or self._count is None:
            return np.asarray(0.0, dtype=np.dtype(self.dtype if self.dtype != "bfloat16" else "float32"))
        total, count = self._total.total(), self._count.total()
        xp = array_namespace(total)
        out = _metrics.safe_divide(xp, total, count)
        dtype = getattr(xp, self.dtype, None)
        if dtype is None:  # e.g. bfloat16 in NumPy
            dtype = xp.float32
        elif self.dtype == "float64" and out.dtype != xp.float64:  # no float64 here
            dtype = out.dtype
        return out if out.dtype == dtype else xp.astype(out, dtype)

    def reset_state(self) -> None:
        """Forget every update."""
        self._total = None
        self._count = None

    reset_states = reset_state  # Keras 2's older name

    def merge_state(self, *others: KLEstimator) -> None:
        """Add the states of other ``KLEstimator`` metrics of the same options (workers' parts).

        Raises
        ------
        TypeError
            If an argument is not a ``KLEstimator`` metric or holds another library.
        ValueError
            If its options differ (its mean is of other numbers) or its state is on another
            device.
        """
        for other in others:
            if not isinstance(other, KLEstimator):
                raise TypeError(f"merge_state takes kldiv.metrics.KLEstimator metrics, got {type(other).__name__}.")
            if other._options() != self._options():
                raise ValueError(f"merge_state: {other!r} estimates with other options than {self!r}.")
        for other in others:
            if other._total is None or other._count is None:
                continue
            if self._total is None or self._count is None:
                self._total, self._count = other._total.copy(), other._count.copy()
                continue
            _metrics.check_same_place(self._total.value, other._total.value, what=f"merge_state({other!r})",
                                      owner=repr(self))
            self._total.merge(other._total)
            self._count.merge(other._count)

    def _options(self) -> tuple[Any, ...]:
        return (self.estimator, self.log_ratio_clamp, self.value_clamp)

    def __call__(self, logprob: Any, ref_logprob: Any, sample_weight: Any = None) -> Any:
        """:meth:`update_state`, then :meth:`result` (Keras' ``Metric.__call__``)."""
        self.update_state(logprob, ref_logprob, sample_weight)
        return self.result()

    # -- config --------------------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments."""
        return {
            "estimator": self.estimator,
            "log_ratio_clamp": self.log_ratio_clamp,
            "value_clamp": self.value_clamp,
            "name": self.name,
            "dtype": self.dtype,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KLEstimator:
        """Rebuild a metric from :meth:`get_config` output; unknown keys raise ``TypeError``."""
        config = dict(config)
        unknown = set(config) - {"estimator", "log_ratio_clamp", "value_clamp", "name", "dtype"}
        if unknown:
            raise TypeError(f"Unknown KLEstimator metric config keys: {sorted(unknown)}.")
        return cls(**config)

    def __repr__(self) -> str:
        where = "" if self._total is None else f", state on {self.library}:{self.device}"
        return (
            f"{type(self).__name__}(estimator={self.estimator!r}, log_ratio_clamp={self.log_ratio_clamp!r}, "
            f"value_clamp={self.value_clamp!r}, name={self.name!r}, dtype={self.dtype!r}{where})"
        )
