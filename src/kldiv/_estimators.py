"""Sampled-token KL estimators (Schulman's k1, k2, k3) for reinforcement-learning fine-tuning.

RL trainers penalise ``KL(policy || reference)`` from the log-probabilities of the tokens the
policy sampled, one number per token. With ``d = logprob - ref_logprob``:

- ``k1 = d``: unbiased, high variance, negative for some tokens;
- ``k2 = d**2 / 2``: biased, low variance, never negative; its gradient is the unbiased
  estimate of the gradient of the KL;
- ``k3 = exp(-d) + d - 1``: unbiased, low variance, never negative.

The arithmetic is written once, for every array library, in :mod:`kldiv._estimator_math`
(option validation, the per-token terms). This module holds the functional face
:func:`kl_estimate` and the pieces the loss class (``_estimator_loss``) and the metric
(``_estimator_metric``) share with it: input preparation and the weighted per-token
estimates.
The docs page ``docs/estimators.md`` says which estimator to choose and how verl, TRL and
OpenRLHF name them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from ._convert import _python_values, as_pred_array, check_dense, to_namespace
from ._estimator_math import (
    ESTIMATORS,
    GRADIENTS,
    EstimatorOptions,
    estimate_terms,
    estimator_options,
    finite_terms,
    log_ratio,
    ops_for,
)
from ._keras.detect import graph_safe
from ._libraries import library
from ._namespace import (
    dtype_kind,
    get_device,
    is_array,
    is_low_precision,
    numpy_result,
    torch_compiling,
)
from ._reduction import apply_sample_weight
from ._spaces import broadcast_shapes, pred_namespace

__all__ = ["ESTIMATORS", "GRADIENTS", "EstimatorOptions", "compute_estimate",
           "estimator_options", "kl_estimate", "prepare_estimate"]


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
    tracing: bool = False  # torch_compiling()'s answer, asked once by prepare_estimate


def _python_to_numpy(x: Any, what: str, *, floatx: bool) -> np.ndarray:
    """``x`` (not an array of a supported library) as a NumPy array.

    With ``floatx``, Python floats (numbers, lists, tuples) become float32, Keras' floatx, as
    ``y_pred`` does in :func:`kldiv.kl_divergence`; anything that carries a dtype of its own
    (NumPy scalars, ``np.matrix``, ``memoryview``, ``array.array``, pandas...) keeps it.
    Without (``ref_logprob``), the values are kept exact until the cast to ``logprob``'s
    dtype: a float64 ``logprob`` against ``[0.1]`` sees 0.1, not float32's 0.10000000149.
    """
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise TypeError(f"{what} could not be converted to an array: {exc}") from None
    if floatx and arr.dtype == np.float64 and _python_values(x):
        arr = arr.astype(np.float32)
    return arr


def prepare_estimate(logprob: Any, ref_logprob: Any, *, tracing: bool | None = None) -> Inputs:
    """Validate both inputs and bring ``ref_logprob`` to ``logprob``'s library, device, dtype.

    Follows :func:`kldiv.kl_divergence`'s rules, with ``logprob`` in ``y_pred``'s place:
    integer and bool ``logprob`` give float32, half precision is computed in float32, a Dask
    ``ref_logprob`` against a NumPy ``logprob`` keeps the call lazy. Unlike the KL function,
    there is no class axis: 0-d inputs are fine and no axis is squeezed; the shapes must
    broadcast. ``tracing``: :func:`~kldiv._namespace.torch_compiling`'s answer where the
    caller has it; asked once per call (here when ``None``), handed to every conversion
    helper and kept in :attr:`Inputs.tracing` for the computation.
    """
    if tracing is None:
        tracing = torch_compiling()
    if logprob is None or ref_logprob is None:
        raise TypeError("logprob and ref_logprob must be arrays, lists or numbers, not None.")
    check_dense(logprob, "logprob")
    check_dense(ref_logprob, "ref_logprob")
    for x, what in ((logprob, "logprob"), (ref_logprob, "ref_logprob")):
        if isinstance(x, np.ma.MaskedArray):  # NumPy's where would drop the mask silently
            raise TypeError(
                f"{what} is a masked array, whose mask the estimators would drop. Pass the data "
                "(np.ma.getdata) and give the mask as the weights: "
                "KLEstimator()(..., sample_weight=~np.ma.getmaskarray(x)), or fill it (x.filled(0.0))."
            )
    if is_array(logprob):
        lp = as_pred_array(logprob)
    else:
        lp = _python_to_numpy(logprob, "logprob", floatx=True)
    if is_array(ref_logprob):
        ref = ref_logprob
    else:
        ref = _python_to_numpy(ref_logprob, "ref_logprob", floatx=False)
    lp, xp = pred_namespace(lp, ref, what="logprob", tracing=tracing)

    kind = dtype_kind(lp.dtype, tracing=tracing)
    if kind in {"int", "bool"}:
        out_dtype = xp.float32
    elif kind == "float":
        out_dtype = lp.dtype
    else:
        raise TypeError(f"logprob has dtype {lp.dtype}; log-probabilities must be real numbers.")
    ref_kind = dtype_kind(ref.dtype, tracing=tracing)
    if ref_kind not in {"float", "int", "bool"}:
        raise TypeError(
            f"ref_logprob has dtype {ref.dtype}, which cannot be cast to logprob's dtype {out_dtype}; "
            "log-probabilities must be real numbers."
        )
    compute_dtype = xp.float32 if is_low_precision(out_dtype, tracing=tracing) else out_dtype

    device = get_device(lp)
    if lp.dtype != compute_dtype:
        lp = xp.astype(lp, compute_dtype)
    ref = to_namespace(ref, xp, device, compute_dtype, what="ref_logprob", like="logprob",
                       tracing=tracing)
    broadcast_shapes(tuple(lp.shape), tuple(ref.shape), what="logprob and ref_logprob")
    return Inputs(xp, lp, ref, out_dtype, device, tracing)


def compute_estimate(inputs: Inputs, options: EstimatorOptions, sample_weight: Any = None) -> tuple[Any, Any]:
    """Per-token estimates in the compute dtype (float32 for half precision), uncast, and the
    sample weights brought to their library, dtype and (Keras 2 rules) rank; ``None`` without.

    A token whose weight is 0 is left out, not multiplied by 0, where its estimate is not
    finite: its log-ratio is replaced by 0 before anything is computed from it, so an ``inf``
    or NaN there (padding) reaches neither the estimate nor its gradient. Where its estimate
    is finite, it is kept (and multiplied by 0): the derivative with respect to its weight is
    then the estimate, as for any other weight (replacing it lost that term).
    """
    xp = inputs.xp
    ops = ops_for(xp, tracing=inputs.tracing)
    # NumPy: -inf - -inf in log_ratio's unused branch is expected, not worth a warning
    with ops.quiet():
        d = log_ratio(ops, inputs.logprob, inputs.ref_logprob)
        weights = None
        if sample_weight is not None:
            # the weights only (Keras 2's rank rules against d's shape): apply_sample_weight
            # also multiplies its first argument by them, and d * 0 at an infinite log-ratio
            # (padding) is NaN, with a warning in array-api-strict
            _, weights = apply_sample_weight(xp, xp.zeros_like(d), sample_weight)
            keep = (weights != 0) | finite_terms(xp, ops, d, options)
            d = ops.where(keep, d, 0.0)
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
        For a clamp that is not a number, inputs that are not real numbers, NumPy masked
        arrays (give the mask as a ``sample_weight`` of :class:`kldiv.KLEstimator`), or ``None``.

    Notes
    -----
    Equal inputs give 0, also where both are ``-inf``. NaN propagates. Values and gradients
    are never NaN for non-NaN inputs, and the gradients are finite: where ``d`` is infinite
    (an input was), k3 overflows (``d < -88.72`` in float32, ``-709.78`` in float64) or k2
    does (``|d| > 2.6e19`` in float32), the estimate is its limit (k1: ``±inf``, k2 and k3:
    ``+inf``) and its gradient 0 (``d`` with ``gradient="k2"``). A clamp larger than the
    compute dtype's largest value clamps nothing. A finite
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
    scope = library(xp, tracing=inputs.tracing).device_scope(inputs.device)  # device_scope
    if scope is None:
        out, _ = compute_estimate(inputs, options)
    else:
        with scope:  # TensorFlow, eagerly: on logprob's device
            out, _ = compute_estimate(inputs, options)
    if out.dtype != inputs.out_dtype:
        if isinstance(out, np.ndarray):
            with np.errstate(over="ignore"):  # a value too large for float16 is inf (documented)
                out = out.astype(inputs.out_dtype)
        else:
            out = xp.astype(out, inputs.out_dtype)
    return numpy_result(out)


# autograph calls it as it is inside a user's tf.function (graph-safe code, as kl_divergence):
# converted, it failed ("tf__is_array() missing 1 required positional argument") or printed
# "AutoGraph could not transform ... Please report this to the TensorFlow team"
graph_safe(kl_estimate)
