"""Sampled-token KL estimators (Schulman's k1, k2, k3) for reinforcement-learning fine-tuning.

RL trainers penalise ``KL(policy || reference)`` from the log-probabilities of the tokens the
policy sampled, one number per token. With ``d = logprob - ref_logprob``:

- ``k1 = d``: unbiased, high variance, negative for some tokens;
- ``k2 = d**2 / 2``: biased, low variance, never negative; its gradient is the unbiased
  estimate of the gradient of the KL;
- ``k3 = exp(-d) + d - 1``: unbiased, low variance, never negative.

This module holds the arithmetic once, for every array library: the functional face
:func:`kl_estimate`, and the pieces the loss class (``_estimator_loss``) and the metric
(``_estimator_metric``) share: option validation, input preparation, the per-token terms.
The docs page ``docs/estimators.md`` says which estimator to choose and how verl, TRL and
OpenRLHF name them.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._functional import broadcast_shapes
from ._namespace import (
    array_namespace,
    as_pred_array,
    device_scope,
    dtype_kind,
    get_device,
    is_array,
    is_dask,
    is_low_precision,
    namespace_name,
    numpy_result,
    to_namespace,
)
from ._reduction import apply_sample_weight

__all__ = ["ESTIMATORS", "GRADIENTS", "EstimatorOptions", "kl_estimate"]

ESTIMATORS = ("k1", "k2", "k3")
"""The estimator names, exactly as :func:`kl_estimate` takes them."""

GRADIENTS = ("same", "k2")
"""``"same"``: each estimator's own gradient; ``"k2"``: straight-through, k2's gradient."""

# k3 = d**2 * P(-d) on |d| < _SERIES_RADIUS, where expm1(-d) + d would cancel (it loses
# 2 eps / |d| of relative precision: all of it at |d| = 1e-8 in float32); outside, the
# closed form expm1(-d) + d is within a few ulp.
_SERIES_RADIUS = 0.5


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


class EstimatorOptions(NamedTuple):
    """Validated options of one estimator (see :func:`kl_estimate`)."""

    estimator: str
    log_ratio_clamp: float | None
    value_clamp: float | None
    gradient: str


def _validate_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"Invalid {what} {value!r}. Expected one of: " + ", ".join(repr(c) for c in choices) + ".")


def _validate_clamp(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a positive number or None, got {type(value).__name__} {value!r}.")
    bound = float(value)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"{what} must be a positive, finite number or None, got {value!r}.")
    return bound


def estimator_options(
    estimator: Any = "k3", log_ratio_clamp: Any = None, value_clamp: Any = None, gradient: Any = "same"
) -> EstimatorOptions:
    """Validate the options shared by :func:`kl_estimate`, the loss class and the metric.

    Raises
    ------
    ValueError
        For an unknown estimator or gradient name, or a clamp that is not positive and finite.
    TypeError
        For a clamp that is not a real number (``True`` is not a clamp).
    """
    return EstimatorOptions(
        _validate_choice(estimator, ESTIMATORS, "estimator"),
        _validate_clamp(log_ratio_clamp, "log_ratio_clamp"),
        _validate_clamp(value_clamp, "value_clamp"),
        _validate_choice(gradient, GRADIENTS, "gradient"),
    )


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


class Inputs(NamedTuple):
    """``logprob`` and ``ref_logprob`` in one library, device and compute dtype."""

    xp: ModuleType
    logprob: Any
    ref_logprob: Any
    out_dtype: Any  # logprob's floating dtype: what the caller gets back
    device: Any


def _python_to_numpy(x: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{what} could not be converted to an array: {exc}") from None
    if dtype_kind(arr.dtype) == "float" and not isinstance(x, np.generic):
        arr = arr.astype(np.float32)  # Python floats are Keras floatx (float32), as elsewhere
    return arr


def prepare_estimate(logprob: Any, ref_logprob: Any) -> Inputs:
    """Validate both inputs and bring ``ref_logprob`` to ``logprob``'s library, device, dtype.

    Follows :func:`kldiv.kl_divergence`'s rules, with ``logprob`` in ``y_pred``'s place:
    integer and bool ``logprob`` give float32, half precision is computed in float32, a Dask
    ``ref_logprob`` against a NumPy ``logprob`` keeps the call lazy. Unlike the KL function,
    there is no class axis: 0-d inputs are fine and no axis is squeezed; the shapes must
    broadcast.
    """
    if logprob is None or ref_logprob is None:
        raise TypeError("logprob and ref_logprob must be arrays, lists or numbers, not None.")
    lp = as_pred_array(logprob) if is_array(logprob) else _python_to_numpy(logprob, "logprob")
    ref = ref_logprob if is_array(ref_logprob) else _python_to_numpy(ref_logprob, "ref_logprob")
    if is_dask(ref) and isinstance(lp, np.ndarray):
        import dask.array as da  # Dask is NumPy's lazy container: stay lazy, as dask + ndarray

        lp = da.asarray(lp)
    try:
        xp = array_namespace(lp)
    except TypeError as exc:
        raise TypeError(f"logprob of type {type(lp).__name__} is not a supported array: {exc}") from None

    kind = dtype_kind(lp.dtype)
    if kind in {"int", "bool"}:
        out_dtype = xp.float32
    elif kind == "float":
        out_dtype = lp.dtype
    else:
        raise TypeError(f"logprob has dtype {lp.dtype}; log-probabilities must be real numbers.")
    ref_kind = dtype_kind(ref.dtype)
    if ref_kind not in {"float", "int", "bool"}:
        raise TypeError(
            f"ref_logprob has dtype {ref.dtype}, which cannot be cast to logprob's dtype {out_dtype}; "
            "log-probabilities must be real numbers."
        )
    compute_dtype = xp.float32 if is_low_precision(out_dtype) else out_dtype

    device = get_device(lp)
    if lp.dtype != compute_dtype:
        lp = xp.astype(lp, compute_dtype)
    ref = to_namespace(ref, xp, device, compute_dtype, what="ref_logprob")
    broadcast_shapes(tuple(lp.shape), tuple(ref.shape), what="logprob and ref_logprob")
    return Inputs(xp, lp, ref, out_dtype, device)


# --------------------------------------------------------------------------------------
# Per-library operations the array API leaves out (stop_gradient) or kldiv's TensorFlow
# shim does not hold
# --------------------------------------------------------------------------------------


class Ops(NamedTuple):
    """The few operations the estimators need, for one namespace."""

    where: Callable[[Any, Any, Any], Any]
    expm1: Callable[[Any], Any]
    isfinite: Callable[[Any], Any]
    isnan: Callable[[Any], Any]
    # None where the library has no automatic differentiation: nothing to stop
    stop_gradient: Callable[[Any], Any] | None


def _torch_detach(x: Any) -> Any:
    return x.detach()


def ops_for(xp: ModuleType) -> Ops:
    """:class:`Ops` for namespace ``xp`` (torch's own functions for torch: no wrapper in a
    ``torch.compile`` graph)."""
    name = namespace_name(xp)
    if name == "torch":
        torch = sys.modules["torch"]
        return Ops(torch.where, torch.expm1, torch.isfinite, torch.isnan, _torch_detach)
    if name == "tensorflow":
        tf = sys.modules["tensorflow"]
        return Ops(xp.where, tf.math.expm1, tf.math.is_finite, tf.math.is_nan, tf.stop_gradient)
    if name == "jax":
        import jax

        return Ops(xp.where, xp.expm1, xp.isfinite, xp.isnan, jax.lax.stop_gradient)
    return Ops(xp.where, xp.expm1, xp.isfinite, xp.isnan, None)


_LOG_MAX: dict[str, float] = {}


def _log_max(xp: ModuleType, dtype: Any) -> float:
    """Slightly less than ``log(largest finite value of dtype)``: ``exp`` of anything up to
    it is finite, so are k3 and its derivative."""
    key = str(dtype)
    value = _LOG_MAX.get(key)
    if value is None:
        try:
            largest = float(xp.finfo(dtype).max)
        except Exception:  # TensorFlow's shim has no finfo; its dtypes know their range
            largest = float(getattr(dtype, "max", np.finfo(np.float32).max))
        value = _LOG_MAX[key] = math.log(largest) - 1e-3
    return value


_COEFFICIENTS: dict[str, tuple[float, ...]] = {}


def _series_coefficients(xp: ModuleType, dtype: Any) -> tuple[float, ...]:
    """``1 / (m + 2)!`` for m = 0..M, M the smallest that keeps the truncation of
    ``(exp(u) - 1 - u) / u**2`` on ``|u| < 0.5`` below an eighth of dtype's epsilon."""
    key = str(dtype)
    coeffs = _COEFFICIENTS.get(key)
    if coeffs is None:
        try:
            eps = float(xp.finfo(dtype).eps)
        except Exception:  # TensorFlow's shim has no finfo
            eps = float(np.finfo(np.float64 if "64" in key else np.float32).eps)
        m = 1
        while 2 * _SERIES_RADIUS ** (m + 1) / math.factorial(m + 3) >= eps / 8:
            m += 1
        coeffs = _COEFFICIENTS[key] = tuple(1.0 / math.factorial(k + 2) for k in range(m + 1))
    return coeffs


# --------------------------------------------------------------------------------------
# The terms
# --------------------------------------------------------------------------------------


def log_ratio(ops: Ops, logprob: Any, ref_logprob: Any) -> Any:
    """``d = logprob - ref_logprob``, and 0 where both are the same infinity (``-inf``: a
    token neither model can produce, such as padding), where the difference is NaN.

    ``where`` keeps that NaN out of the gradient too: the unused branch's derivatives are
    the constants 1 and -1. (Finite equal inputs take the subtraction, whose gradient k1
    needs: a policy initialised from the reference has ``d = 0`` everywhere.)
    """
    same_infinity = (logprob == ref_logprob) & ~ops.isfinite(logprob)
    return ops.where(same_infinity, 0.0, logprob - ref_logprob)


def _clamp(ops: Ops, x: Any, bound: float) -> Any:
    # where, not clip: gradient 1 on the closed interval and 0 outside on every library
    # (JAX's clip would halve it at the bounds); NaN passes through
    return ops.where(x < -bound, -bound, ops.where(x > bound, bound, x))


def _k3_finite(ops: Ops, xp: ModuleType, x: Any) -> Any:
    """``exp(-x) + x - 1`` for finite ``x > -log_max``, to a few ulp, never negative."""
    small = (x > -_SERIES_RADIUS) & (x < _SERIES_RADIUS)
    u = ops.where(small, -x, 0.0)  # bounded, so the unused series terms cannot overflow
    coeffs = _series_coefficients(xp, x.dtype)
    poly = coeffs[-1] * u + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        poly = poly * u + c
    series = (u * u) * poly  # P(u) > 0.4 on |u| < 0.5: exactly non-negative
    closed = ops.expm1(-x) + x  # >= 0.1 for |x| >= 0.5, far above its rounding error
    return ops.where(small, series, closed)


def _terms(ops: Ops, xp: ModuleType, x: Any, estimator: str) -> Any:
    """The estimator at (already clamped) log-ratios ``x``.

    Where ``x`` is ±inf (or NaN), or k3 would overflow (``x < -log_max``), the value is the
    limit (k1: ±inf; k2, k3: +inf; NaN stays NaN) and the gradient 0: the formula is
    evaluated at a safe 0 there and the limit is a constant, so no ``inf * 0`` reaches the
    gradient (also under a later value clamp or mask).
    """
    ok = ops.isfinite(x)
    if estimator == "k3":
        ok = ok & (x > -_log_max(xp, x.dtype))
    safe = ops.where(ok, x, 0.0)
    if estimator == "k1":
        value = safe
    elif estimator == "k2":
        value = 0.5 * (safe * safe)
    else:
        value = _k3_finite(ops, xp, safe)
    const = x if ops.stop_gradient is None else ops.stop_gradient(x)
    # k1: ±inf; k2, k3: +inf; NaN stays NaN
    limit = const if estimator == "k1" else ops.where(ops.isnan(const), const, math.inf)
    return ops.where(ok, value, limit)


def _straight_through(ops: Ops, value: Any, d: Any) -> Any:
    """``value``, with the gradient ``d`` (k2's) with respect to ``d``.

    ``stop(value) + (s - stop(s)) * stop(s)`` with ``s = d`` where finite, else 0: the second
    term is exactly 0 and its derivative is ``d``. (``k2 + stop(value - k2)``, verl's form,
    turns ``inf - inf`` into NaN where k2 or the value overflows.)
    """
    stop = ops.stop_gradient
    assert stop is not None
    s = ops.where(ops.isfinite(d), d, 0.0)
    return stop(value) + (s - stop(s)) * stop(s)


def estimate_terms(xp: ModuleType, ops: Ops, d: Any, options: EstimatorOptions) -> Any:
    """Per-token estimates from log-ratios ``d`` (see :func:`log_ratio`), in ``d``'s dtype."""
    estimator, c, v, gradient = options
    x = d if c is None else _clamp(ops, d, c)
    est = _terms(ops, xp, x, estimator)
    if v is not None:
        est = _clamp(ops, est, v)
    plain_k2 = estimator == "k2" and c is None and v is None  # already k2's gradient
    if gradient == "k2" and ops.stop_gradient is not None and not plain_k2:
        est = _straight_through(ops, est, d)
    return est


def compute_estimate(inputs: Inputs, options: EstimatorOptions, sample_weight: Any = None) -> tuple[Any, Any]:
    """Per-token estimates in the compute dtype (float32 for half precision), uncast, and the
    sample weights brought to their library, dtype and (Keras 2 rules) rank; ``None`` without.

    A token whose weight is 0 is left out, not multiplied by 0: its log-ratio is replaced by
    0 before anything is computed from it, so an ``inf`` or NaN there (padding) reaches
    neither the estimate nor its gradient.
    """
    xp = inputs.xp
    ops = ops_for(xp)
    # NumPy: -inf - -inf in log_ratio's unused branch is expected, not worth a warning
    quiet = np.errstate(invalid="ignore") if namespace_name(xp) == "numpy" else contextlib.nullcontext()
    with quiet:
        d = log_ratio(ops, inputs.logprob, inputs.ref_logprob)
        weights = None
        if sample_weight is not None:
            _, weights = apply_sample_weight(xp, d, sample_weight)
            d = ops.where(weights != 0, d, 0.0)
        return estimate_terms(xp, ops, d, options), weights


# --------------------------------------------------------------------------------------
# The function
# --------------------------------------------------------------------------------------


def kl_estimate(
    logprob: Any,
    ref_logprob: Any,
    *,
    estimator: str = "k3",
    log_ratio_clamp: float | None = None,
    value_clamp: float | None = None,
    gradient: str = "same",
) -> Any:
    """Per-token estimates of ``KL(policy || reference)`` from sampled tokens' log-probabilities.

    For tokens sampled from the policy, with ``d = logprob - ref_logprob``, Schulman's
    estimators ("Approximating KL Divergence", 2020):

    - ``"k1"``: ``d``. Unbiased; high variance; negative for some tokens.
    - ``"k2"``: ``d**2 / 2``. Biased (it estimates a second-order approximation of the KL),
      low variance, never negative; the mean of its gradient is the gradient of the KL.
    - ``"k3"``: ``exp(-d) + d - 1``. Unbiased, low variance, never negative. Computed as a
      series near 0 and as ``expm1(-d) + d`` elsewhere: no overflow, no cancellation.

    Parameters
    ----------
    logprob : array_like
        Log-probabilities of the sampled tokens under the policy, any shape (e.g. ``(batch,
        tokens)``). Its library and device are where the computation runs.
    ref_logprob : array_like
        Log-probabilities of the same tokens under the reference model, broadcastable with
        ``logprob``; any library, a list or a number (moved to ``logprob``'s library, device
        and dtype; an array of another library carries no gradient across).
    estimator : {"k3", "k1", "k2"}, default "k3"
    log_ratio_clamp : float, optional
        If given (``c > 0``), ``d`` is clamped to ``[-c, c]`` first; the gradient is 0 where
        it was clamped. verl clamps k3's log-ratio to 20.
    value_clamp : float, optional
        If given (``v > 0``), each estimate is clamped to ``[-v, v]``; the gradient is 0
        where it was clamped. verl and OpenRLHF clamp to 10.
    gradient : {"same", "k2"}, default "same"
        ``"same"``: the gradient of the (clamped) estimator. ``"k2"``: straight-through, the
        value of the chosen estimator with the gradient of k2, ``d`` itself: the unclamped
        ``d``, whatever the clamps (verl's ``"k1+"``/``"k3+"``).

    Returns
    -------
    array
        The per-token estimates, of the broadcast shape of the inputs, in ``logprob``'s
        library and on its device, with its floating dtype (integer and bool give float32;
        float16, bfloat16 and the float8 formats are computed in float32 and rounded back).

    Raises
    ------
    ValueError
        For an unknown ``estimator`` or ``gradient``, a clamp that is not positive and finite,
        or shapes that do not broadcast.
    TypeError
        For a clamp that is not a number, inputs that are not real numbers, or ``None``.

    Notes
    -----
    Equal inputs give 0, also where both are ``-inf``. NaN propagates. Values and gradients
    are never NaN for non-NaN inputs, and the gradients are finite: where ``d`` is infinite
    (an input was) or k3 overflows (``d < -88.72`` in float32, ``-709.78`` in float64), the
    estimate is its limit (k1: ``±inf``, k2 and k3: ``+inf``) and its gradient 0. A finite
    value that does not fit the input dtype (k3 above 65504 in float16: ``d < -11.09``) is
    ``inf`` after the rounding back, as is a gradient too large for it. ``log_ratio_clamp=20,
    value_clamp=10`` (verl's k3) keeps every value and gradient finite. The gradient with
    respect to ``ref_logprob`` is minus the one with respect to ``logprob``.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> logprob = np.log(np.array([0.5, 0.25, 0.125], dtype=np.float32))
    >>> ref_logprob = np.log(np.array([0.25, 0.5, 0.125], dtype=np.float32))
    >>> kldiv.kl_estimate(logprob, ref_logprob)
    array([0.19314718, 0.30685282, 0.        ], dtype=float32)
    >>> kldiv.kl_estimate(logprob, ref_logprob, estimator="k1")
    array([ 0.6931472, -0.6931472,  0.       ], dtype=float32)
    >>> kldiv.kl_estimate([-30.0], [0.0], log_ratio_clamp=20, value_clamp=10)  # verl's k3
    array([10.], dtype=float32)
    """
    options = estimator_options(estimator, log_ratio_clamp, value_clamp, gradient)
    inputs = prepare_estimate(logprob, ref_logprob)
    xp = inputs.xp
    scope = device_scope(xp, inputs.device)
    if scope is None:
        out, _ = compute_estimate(inputs, options)
    else:
        with scope:  # TensorFlow, eagerly: on logprob's device
            out, _ = compute_estimate(inputs, options)
    return numpy_result(out if out.dtype == inputs.out_dtype else xp.astype(out, inputs.out_dtype))
