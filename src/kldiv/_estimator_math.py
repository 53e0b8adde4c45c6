"""The arithmetic of the sampled-token KL estimators (k1, k2, k3), for every array library.

The options (:func:`estimator_options`), the few operations the array API leaves out
(:func:`ops_for`: ``stop_gradient``, and what kldiv's TensorFlow shim does not hold), and the
per-token terms (:func:`log_ratio`, :func:`estimate_terms`). The faces are
:mod:`kldiv._estimators` (:func:`kldiv.kl_estimate`), the loss class and the metric.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._libraries import compiling, library
from ._spaces import short_repr

__all__ = ["ESTIMATORS", "GRADIENTS", "EstimatorOptions", "Ops", "estimate_terms",
           "estimator_options", "finite_terms", "log_ratio", "ops_for"]

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
        return choices[choices.index(value)]  # the plain str, not a subclass (np.str_)
    raise ValueError(f"Invalid {what} {short_repr(value)}. Expected one of: " + ", ".join(repr(c) for c in choices) + ".")


def _validate_clamp(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a positive number or None, got {type(value).__name__} "
                        f"{short_repr(value)}.")
    try:
        bound = float(value)
    except OverflowError:  # an int beyond every float (10**400): not finite
        bound = math.inf
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"{what} must be a positive, finite number or None, got {short_repr(value)}.")
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
# Per-library operations the array API leaves out (stop_gradient, NumPy's error state) or
# kldiv's TensorFlow shim does not hold: each library's adapter says (``estimator_ops``)
# --------------------------------------------------------------------------------------


class Ops(NamedTuple):
    """The few operations the estimators need, for one namespace."""

    where: Callable[[Any, Any, Any], Any]
    expm1: Callable[[Any], Any]
    isfinite: Callable[[Any], Any]
    isnan: Callable[[Any], Any]
    # None where the library has no automatic differentiation: nothing to stop
    stop_gradient: Callable[[Any], Any] | None
    # the context the computation runs in (NumPy: no warning for an expected -inf - -inf)
    quiet: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    # compiling()'s answer for the call (asked once per call, by its caller)
    tracing: bool = False


def _torch_ops(xp: ModuleType) -> tuple[Any, ...]:
    # an import statement, which torch.compile traces, where the table's loader calls
    # importlib, which it cannot: a compiled call before any eager one (fullgraph) broke
    from .backends import torch_adapter

    return tuple(torch_adapter.estimator_ops(xp))


def ops_for(xp: ModuleType, *, tracing: bool | None = None) -> Ops:
    """:class:`Ops` for namespace ``xp``: its adapter's ``estimator_ops`` (the libraries
    table), else the array API's functions with nothing to stop and no context.

    ``tracing``: :func:`~kldiv._libraries.compiling`'s answer where the caller has it (asked
    here when ``None``), kept in :attr:`Ops.tracing` for the terms' computation."""
    if tracing is None:
        tracing = compiling()
    lib = library(xp, tracing=tracing)
    # one expression, no annotated assignment in branches: autograph, should it convert this
    # function, cannot make an annotated name nonlocal and gives up with a warning
    found = _torch_ops(xp) if lib.name == "torch" else lib.estimator_ops(xp)
    if found is not None:
        return Ops(*found)._replace(tracing=tracing)  # the adapter's fields, then this call's
    return Ops(xp.where, xp.expm1, xp.isfinite, xp.isnan, None, tracing=tracing)


class _Limits(NamedTuple):
    """What the estimators need to know of a compute dtype's range."""

    largest: float  # its largest finite value
    rounds_to_inf: float  # the smallest Python float it rounds to inf (max + half an ulp)
    log_max: float  # k3 and its derivative are finite for x >= -log_max
    k2_max: float  # k2 = d**2 / 2 is finite for |d| <= k2_max


_NO_LIMITS = _Limits(math.inf, math.inf, math.inf, math.inf)


def _measure(dtype: Any) -> _Limits:
    """float32's or float64's limits, measured with NumPy (once, at import: not in a
    ``torch.compile`` trace, which cannot run NumPy's ``errstate``).

    ``log_max`` and ``k2_max`` are the largest values of the dtype at which ``exp`` and
    ``(d / 2) * d``, with 16 units in the last place to spare for the libraries' rounding,
    stay finite: exact values that fit the dtype are returned finite, and nothing overflows
    where the formula is evaluated (so neither does its derivative).
    """
    info = np.finfo(dtype)
    one = dtype(1) + dtype(16) * info.eps
    with np.errstate(over="ignore"):
        log_max = np.log(info.max)
        while not np.isfinite(np.exp(log_max) * one):
            log_max = np.nextafter(log_max, dtype(0))
        k2_max = np.sqrt(info.max) * np.sqrt(dtype(2))
        while not np.isfinite((k2_max / 2) * k2_max * one):
            k2_max = np.nextafter(k2_max, dtype(0))
    largest = float(info.max)
    half_ulp = float(np.spacing(np.nextafter(info.max, dtype(0)))) / 2  # the ulp at max
    rounds_to_inf = largest + half_ulp if dtype is np.float32 else math.inf
    return _Limits(largest, rounds_to_inf, float(log_max), float(k2_max))


_KNOWN_LIMITS = {float(np.finfo(t).max): _measure(t) for t in (np.float32, np.float64)}
_LIMITS: dict[str, _Limits] = {}


def _limits(xp: ModuleType, dtype: Any) -> _Limits:
    """The range of compute dtype ``dtype``: float32's or float64's; none (every bound
    infinite) for a wider one, such as NumPy's longdouble, whose range Python floats do not
    reach."""
    key = str(dtype)
    limits = _LIMITS.get(key)
    if limits is None:
        try:
            largest = float(xp.finfo(dtype).max)
        except Exception:  # TensorFlow's shim has no finfo; its dtypes know their range
            largest = float(getattr(dtype, "max", np.finfo(np.float32).max))
        limits = _LIMITS[key] = _KNOWN_LIMITS.get(largest, _NO_LIMITS)
    return limits


def _bound_in(xp: ModuleType, dtype: Any, bound: float | None) -> float | None:
    """A clamp's bound as ``dtype`` holds it: ``None`` (no clamp) where it rounds to ``inf``,
    the largest value where it rounds to that; the bound itself otherwise (the library rounds
    it). A bound past the dtype's range clamps nothing; given as is, it was an error in torch
    ("value cannot be converted to type float without overflow"), an overflow warning in
    NumPy, JAX and array-api-strict."""
    if bound is None:
        return None
    limits = _limits(xp, dtype)
    if bound >= limits.rounds_to_inf:
        return None
    return min(bound, limits.largest)


_COEFFICIENTS: dict[str, tuple[float, ...]] = {}


def _series_coefficients(xp: ModuleType, dtype: Any, tracing: bool) -> tuple[float, ...]:
    """``1 / (m + 2)!`` for m = 0..M, M the smallest that keeps the truncation of
    ``(exp(u) - 1 - u) / u**2`` on ``|u| < 0.5`` below an eighth of dtype's epsilon."""
    key = str(dtype)
    # not read while torch.compile traces: dynamo would guard the graph on this dict (its
    # length too), and a later eager call with a new dtype would recompile it
    coeffs = None if tracing else _COEFFICIENTS.get(key)
    if coeffs is None:
        try:
            eps = float(xp.finfo(dtype).eps)
        except Exception:  # TensorFlow's shim has no finfo
            eps = float(np.finfo(np.float64 if "64" in key else np.float32).eps)
        m = 1
        while 2 * _SERIES_RADIUS ** (m + 1) / math.factorial(m + 3) >= eps / 8:
            m += 1
        coeffs = tuple(1.0 / math.factorial(k + 2) for k in range(m + 1))
        if not tracing:
            _COEFFICIENTS[key] = coeffs
    return coeffs


# --------------------------------------------------------------------------------------
# The terms
# --------------------------------------------------------------------------------------


def log_ratio(ops: Ops, logprob: Any, ref_logprob: Any) -> Any:
    """``d = logprob - ref_logprob``, and 0 where both are the same infinity (``-inf``: a
    token neither model can produce, such as padding), where the difference is NaN.

    Both inputs are replaced by 0 there before the subtraction, which keeps that NaN out of
    the values, the gradient and the libraries' warnings. (Finite equal inputs take the
    subtraction, whose gradient k1 needs: a policy initialised from the reference has
    ``d = 0`` everywhere.)
    """
    same_infinity = (logprob == ref_logprob) & ~ops.isfinite(logprob)
    # both replaced by 0 there before the subtraction, so that no library computes inf - inf
    # (array-api-strict and Dask warned "invalid value encountered in subtract")
    return ops.where(same_infinity, 0.0, logprob) - ops.where(same_infinity, 0.0, ref_logprob)


def _clamp(ops: Ops, x: Any, bound: float) -> Any:
    # where, not clip: gradient 1 on the closed interval and 0 outside on every library
    # (JAX's clip would halve it at the bounds); NaN passes through
    return ops.where(x < -bound, -bound, ops.where(x > bound, bound, x))


def _k3_finite(ops: Ops, xp: ModuleType, x: Any) -> Any:
    """``exp(-x) + x - 1`` for finite ``x > -log_max``, to a few ulp, never negative."""
    small = (x > -_SERIES_RADIUS) & (x < _SERIES_RADIUS)
    u = ops.where(small, -x, 0.0)  # bounded, so the unused series terms cannot overflow
    coeffs = _series_coefficients(xp, x.dtype, ops.tracing)
    poly = coeffs[-1] * u + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        poly = poly * u + c
    series = (u * u) * poly  # P(u) > 0.4 on |u| < 0.5: exactly non-negative
    closed = ops.expm1(-x) + x  # >= 0.1 for |x| >= 0.5, far above its rounding error
    return ops.where(small, series, closed)


def _in_range(ops: Ops, xp: ModuleType, x: Any, estimator: str) -> Any:
    """Where the estimator at (clamped) log-ratios ``x`` is computed from its formula: ``x``
    finite and, for k3 and k2, where neither the value nor its derivative overflows."""
    ok = ops.isfinite(x)
    if estimator == "k3":
        ok = ok & (x >= -_limits(xp, x.dtype).log_max)
    elif estimator == "k2":
        top = _limits(xp, x.dtype).k2_max
        if math.isfinite(top):
            ok = ok & (x <= top) & (x >= -top)
    return ok


def _terms(ops: Ops, xp: ModuleType, x: Any, estimator: str) -> Any:
    """The estimator at (already clamped) log-ratios ``x``.

    Where ``x`` is ±inf (or NaN), or k3 would overflow (``x < -log_max``), the value is the
    limit (k1: ±inf; k2, k3: +inf; NaN stays NaN) and the gradient 0: the formula is
    evaluated at a safe 0 there and the limit is a constant, so no ``inf * 0`` reaches the
    gradient (also under a later value clamp or mask).
    """
    ok = _in_range(ops, xp, x, estimator)
    safe = ops.where(ok, x, 0.0)
    if estimator == "k1":
        value = safe
    elif estimator == "k2":
        # (d / 2) * d: one rounding, and finite up to sqrt(2 max), where d * d overflows
        # at sqrt(max) already (halving is exact unless d is subnormal; then k2 is 0 anyway)
        value = (0.5 * safe) * safe
    else:
        value = _k3_finite(ops, xp, safe)
    const = x if ops.stop_gradient is None else ops.stop_gradient(x)
    # k1: ±inf; k2, k3: +inf; NaN stays NaN
    limit = const if estimator == "k1" else ops.where(ops.isnan(const), const, math.inf)
    return ops.where(ok, value, limit)


def _straight_through(ops: Ops, value: Any, d: Any) -> Any:
    """``value``, with the derivatives of k2 (``d``, then 1) with respect to ``d``.

    ``stop(value) + (s - stop(s)) * (s / 2 + stop(s) / 2)`` with ``s = d`` where finite, else
    0: the second term is exactly 0, its derivative is ``d`` and its second derivative 1, as
    k2's, and nothing in it can overflow. (``k2 + stop(value - k2)``, verl's form, turns
    ``inf - inf`` into NaN where k2 or the value overflows.)
    """
    stop = ops.stop_gradient
    assert stop is not None
    s = ops.where(ops.isfinite(d), d, 0.0)
    held = stop(s)
    return stop(value) + (s - held) * (0.5 * s + 0.5 * held)


def finite_terms(xp: ModuleType, ops: Ops, d: Any, options: EstimatorOptions) -> Any:
    """Where the estimate at log-ratios ``d`` and its derivative are finite: ``d`` is finite
    (or clamped to a finite bound) and, for k3 and k2, inside the range of ``d``'s dtype
    (see :func:`_terms`), or, under a ``value_clamp``, wherever ``d`` is not NaN (the
    estimate is then clamped to a finite value, with derivative 0 out of range). A token of
    weight 0 keeps its log-ratio there, so that the derivative with respect to its weight is
    its estimate; elsewhere it is left out."""
    c = _bound_in(xp, d.dtype, options.log_ratio_clamp)
    x = d if c is None else _clamp(ops, d, c)
    ok = _in_range(ops, xp, x, options.estimator)
    if _bound_in(xp, d.dtype, options.value_clamp) is not None:
        ok = ok | ~ops.isnan(x)
    return ok


def estimate_terms(xp: ModuleType, ops: Ops, d: Any, options: EstimatorOptions) -> Any:
    """Per-token estimates from log-ratios ``d`` (see :func:`log_ratio`), in ``d``'s dtype."""
    estimator, c, v, gradient = options
    c, v = _bound_in(xp, d.dtype, c), _bound_in(xp, d.dtype, v)
    x = d if c is None else _clamp(ops, d, c)
    est = _terms(ops, xp, x, estimator)
    if v is not None:
        est = _clamp(ops, est, v)
    # also for estimator="k2": its own gradient is 0 where its value overflows, k2's is d
    if gradient == "k2" and ops.stop_gradient is not None:
        est = _straight_through(ops, est, d)
    return est
