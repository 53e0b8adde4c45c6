"""Hostile inputs for the sampled-token KL estimators (``kl_estimate``, the ``KLEstimator``
loss and metric): the edges of each dtype's range, clamps outside it, bad options.

Oracles: the estimators from their definitions in 60-digit decimals (rounded to float64,
then to the dtype under test where they fit), and the analytic derivatives.
"""

from __future__ import annotations

import decimal
import math
import warnings
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, run_tensorflow_script
from kldiv.metrics import KLEstimator as MetricKLEstimator


def _exact(d: float, estimator: str) -> float:
    """The estimator at finite ``d``, from its definition in 60-digit decimals, as a float64
    (``inf`` where it exceeds float64's range)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        x = decimal.Decimal(d)
        if estimator == "k1":
            value = x
        elif estimator == "k2":
            value = x * x / 2
        else:
            value = (-x).exp() + x - 1
        return float(value) if value < decimal.Decimal("1.7976931348623157e308") else math.inf


def _in_dtype(values: list[float], dtype: str) -> np.ndarray:
    """Exact float64 values rounded to ``dtype`` (``inf`` where they do not fit)."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float64).astype(dtype)


def _grad_of(b: ArrayBackend, lp: np.ndarray, dtype: str, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(values, d(sum of values)/d logprob)`` at ``logprob = lp``, ``ref_logprob = 0``."""
    if b.name.startswith("torch"):
        torch = b.module
        a = torch.tensor(lp, device=b.device, dtype=b.dtype(dtype), requires_grad=True)
        out = kldiv.kl_estimate(a, torch.zeros_like(a), **kw)
        out.sum().backward()
        return out.detach().cpu().double().numpy(), a.grad.cpu().double().numpy()
    import jax

    jnp = b.module
    a = b.asarray(lp, dtype=dtype)

    def total(x: Any) -> Any:
        return kldiv.kl_estimate(x, jnp.zeros_like(x), **kw).sum()

    out = kldiv.kl_estimate(a, jnp.zeros_like(a), **kw)
    return np.asarray(out, dtype=np.float64), np.asarray(jax.grad(total)(a), dtype=np.float64)


# ---- the edges of the dtype's range --------------------------------------------------------

# log-ratios next to where k2 = d**2 / 2 and k3 = exp(-d) + d - 1 leave each dtype's range
# (float32: sqrt(2 * max) = 2.6087e19 and -log(max) = -88.72284; float64: 1.8961e154 and
# -709.78271): the exact value fits on the first rows, not on the last one
EDGES = {
    ("k2", "float32"): ([2.0e19, -2.5e19, 2.6e19, 2.6087e19], [2.6089e19, -3e19]),
    ("k2", "float64"): ([1.4e154, -1.8e154, 1.896e154], [1.8962e154, -2e154]),
    ("k3", "float32"): ([-88.7220, -88.7225, -88.72279], [-88.7229, -89.0]),
    ("k3", "float64"): ([-709.782, -709.7827], [-709.7828, -710.0]),
}


@pytest.mark.parametrize(("estimator", "dtype"), sorted(EDGES))
def test_values_are_finite_wherever_the_exact_value_fits(backend: ArrayBackend, estimator: str, dtype: str) -> None:
    # k2 was computed as 0.5 * (d * d): d * d overflows at sqrt(max) (1.84e19 in float32),
    # a factor sqrt(2) before the value does; k3 gave inf for d in (-log(max), -log(max) +
    # 1e-3), where exp(-d) still fits: finite, representable answers returned as inf
    if dtype not in backend.float_dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    fits, beyond = EDGES[estimator, dtype]
    lp = np.array(fits + beyond, dtype=np.float64).astype(dtype)
    want = _in_dtype([_exact(float(x), estimator) for x in lp], dtype)
    assert np.isfinite(want[: len(fits)]).all() and np.isinf(want[len(fits):]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an expected overflow is no warning
        out = kldiv.kl_estimate(backend.asarray(lp), backend.asarray(np.zeros_like(lp)), estimator=estimator)
    got = backend.to_numpy(out)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
@pytest.mark.parametrize("gradient", ["same", "k2"])
def test_gradients_at_the_edges_of_the_range(diff_backend: ArrayBackend, estimator: str, gradient: str) -> None:
    # where the value fits, its gradient is the analytic one; where it is +inf the gradient is
    # 0 with gradient="same" (docs: "the gradient is 0") and d itself with gradient="k2"
    # (k2's gradient whatever the estimator, also for estimator="k2")
    fits, beyond = EDGES[estimator, "float32"]
    lp = np.array(fits + beyond, dtype=np.float32)
    out, grad = _grad_of(diff_backend, lp, "float32", estimator=estimator, gradient=gradient)
    d = lp.astype(np.float64)
    n = len(fits)
    assert np.isfinite(out[:n]).all() and (out[n:] == np.inf).all()
    if gradient == "k2":
        np.testing.assert_allclose(grad, d, rtol=1e-6)
        return
    with np.errstate(over="ignore"):
        want = d if estimator == "k2" else -np.expm1(-d)
    np.testing.assert_allclose(grad[:n], want[:n], rtol=1e-4)
    np.testing.assert_array_equal(grad[n:], 0.0)


# ---- clamps ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_clamps_larger_than_the_dtype_range_change_nothing(backend: ArrayBackend, dtype: str) -> None:
    # a clamp of 1e300 on float32 inputs: torch raised "value cannot be converted to type
    # float without overflow", NumPy, JAX and array-api-strict warned about an overflow. The
    # bound rounds to inf in the compute dtype: nothing is clamped
    if dtype not in backend.float_dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    lp = np.array([-1.0, 5.0, -30.0, -1e4, np.inf, -np.inf], dtype=dtype)
    ref = np.zeros_like(lp)
    for estimator in ("k1", "k2", "k3"):
        plain = backend.to_numpy(kldiv.kl_estimate(backend.asarray(lp), backend.asarray(ref), estimator=estimator))
        with warnings.catch_warnings():
            if dtype == "float32":  # float16: rounding back an overflowed value may warn
                warnings.simplefilter("error", RuntimeWarning)
            big = 10**300  # a Python int, as the other bound is a float
            clamped = kldiv.kl_estimate(backend.asarray(lp), backend.asarray(ref), estimator=estimator,
                                        log_ratio_clamp=big, value_clamp=1e300)
            loss = kldiv.KLEstimator(estimator, log_ratio_clamp=1e300, value_clamp=big, reduction="none")
            metric = MetricKLEstimator(estimator, log_ratio_clamp=1e300, value_clamp=1e300)
            per_token = loss(backend.asarray(lp[:3]), backend.asarray(ref[:3]))
            metric.update_state(backend.asarray(lp[:3]), backend.asarray(ref[:3]))
        np.testing.assert_array_equal(backend.to_numpy(clamped), plain)
        np.testing.assert_array_equal(backend.to_numpy(per_token), plain[:3])
        # the metric averages the float32 estimates (float16 ones would overflow)
        mean = np.mean(kldiv.kl_estimate(lp[:3].astype(np.float32), ref[:3].astype(np.float32),
                                         estimator=estimator).astype(np.float64))
        assert float(np.asarray(backend.to_numpy(metric.result()))) == pytest.approx(mean, rel=1e-3)


def test_clamps_larger_than_the_dtype_range_keep_gradients(diff_backend: ArrayBackend) -> None:
    lp = np.array([-1.0, 5.0, -30.0], dtype=np.float32)
    plain, g_plain = _grad_of(diff_backend, lp, "float32", estimator="k3")
    out, grad = _grad_of(diff_backend, lp, "float32", estimator="k3", log_ratio_clamp=1e300, value_clamp=1e300)
    np.testing.assert_array_equal(out, plain)
    np.testing.assert_array_equal(grad, g_plain)


def test_clamps_too_large_for_a_float_are_a_value_error() -> None:
    # 10**400 is a Python int no float holds: float() raised OverflowError
    lp, ref = np.array([-1.0], np.float32), np.array([0.0], np.float32)
    for name in ("log_ratio_clamp", "value_clamp"):
        with pytest.raises(ValueError, match=name):
            kldiv.kl_estimate(lp, ref, **{name: 10**400})
        with pytest.raises(ValueError, match=name):
            kldiv.KLEstimator(**{name: 10**400})
        with pytest.raises(ValueError, match=name):
            MetricKLEstimator(**{name: 10**400})


def test_clamp_bounds_round_to_the_dtype_as_an_array_would(backend: ArrayBackend) -> None:
    # 3.40282350e38 is above float32's largest value but rounds to it; 3.5e38 rounds to inf
    lp = np.array([np.inf, -np.inf, 1.0], dtype=np.float32)
    ref = np.zeros_like(lp)
    top = float(np.finfo(np.float32).max)
    out = kldiv.kl_estimate(backend.asarray(lp), backend.asarray(ref), estimator="k1", value_clamp=3.4028235e38)
    np.testing.assert_array_equal(backend.to_numpy(out), np.array([top, -top, 1.0], dtype=np.float32))
    out = kldiv.kl_estimate(backend.asarray(lp), backend.asarray(ref), estimator="k1", value_clamp=3.5e38)
    np.testing.assert_array_equal(backend.to_numpy(out), lp)


_COMPILED_FIRST = """
import numpy as np, torch, kldiv
lp = torch.tensor([-0.3, -1.2, -2.0, -0.7], dtype=torch.float64)
ref = torch.tensor([-0.5, -1.0, -2.5, -0.7], dtype=torch.float64)
mask = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
loss = kldiv.KLEstimator("k3", gradient="k2", log_ratio_clamp=20.0, value_clamp=10.0)
a = lp.clone().requires_grad_(True)
out = torch.compile(lambda x, r, w: loss(x, r, sample_weight=w), backend="aot_eager", fullgraph=True)(a, ref, mask)
out.backward()
per_token = torch.compile(lambda x, r: kldiv.kl_estimate(x, r, estimator="k2"), backend="aot_eager",
                          fullgraph=True)(lp, ref)
d = (lp - ref).numpy()
k3 = np.exp(-d) + d - 1
assert abs(float(out) - (k3 * mask.numpy()).sum() / 3) < 1e-14, float(out)
np.testing.assert_allclose(a.grad.numpy(), d * mask.numpy() / 3, rtol=1e-14)
np.testing.assert_allclose(per_token.numpy(), d * d / 2, rtol=1e-14)
print("ok")
"""


def test_torch_compile_fullgraph_as_the_first_call() -> None:
    # the first call of the process compiled (fullgraph): the library table imported torch's
    # adapter with importlib, which dynamo cannot trace (passed only after an eager call)
    pytest.importorskip("torch")
    import os
    import subprocess
    import sys

    env = {**os.environ, "KLDIV_NO_COMPILE": "1"}
    proc = subprocess.run([sys.executable, "-c", _COMPILED_FIRST], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_half_precision_overflow_is_inf_without_a_warning() -> None:
    # documented: a value too large for float16 is inf after the rounding back; NumPy's cast
    # warned "overflow encountered in cast" (an error under -W error)
    lp = np.array([-30.0, -1.0], dtype=np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = kldiv.kl_estimate(lp, np.zeros_like(lp))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, np.array([np.inf, math.e - 2], dtype=np.float16))


def test_straight_through_keeps_k2s_second_derivative(diff_backend: ArrayBackend) -> None:
    # gradient="k2" is k2's gradient d, whose derivative is 1: estimator="k2" had it (a
    # shortcut skipped the straight-through), k1 and k3 had 0 (the straight-through's
    # (s - stop(s)) * stop(s) is linear in s); now every estimator has k2's 1
    lp = np.array([-0.3, 2.0, -5.0])
    for estimator in ("k1", "k2", "k3"):
        kw = dict(estimator=estimator, gradient="k2")
        if diff_backend.name.startswith("torch"):
            torch = diff_backend.module
            a = torch.tensor(lp, device=diff_backend.device, requires_grad=True)
            (g,) = torch.autograd.grad(kldiv.kl_estimate(a, torch.zeros_like(a), **kw).sum(), a, create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), a)
            grad, second = g.detach().cpu().numpy(), h.cpu().numpy()
        else:
            import jax

            jnp = diff_backend.module

            def total(x: Any, kw: dict[str, str] = kw, jnp: Any = jnp) -> Any:
                return kldiv.kl_estimate(x, jnp.zeros_like(x), **kw).sum()

            a = diff_backend.asarray(lp)
            grad, second = np.asarray(jax.grad(total)(a)), np.diag(np.asarray(jax.hessian(total)(a)))
        np.testing.assert_allclose(grad, lp, rtol=1e-15)
        np.testing.assert_array_equal(second, 1.0)


# ---- inputs that are not arrays ---------------------------------------------------------------

def _k1_exact(lp: float, ref: float) -> float:
    return float(decimal.Decimal(lp) - decimal.Decimal(ref))


def test_python_reference_values_are_not_rounded_to_float32_first(backend: ArrayBackend) -> None:
    # a Python float/list ref_logprob against a float64 logprob was rounded to float32 before
    # the cast to float64: k1 off by 1.5e-9 (kld casts a list y_true to y_pred's dtype)
    if "float64" not in backend.float_dtypes:
        pytest.skip(f"{backend.name} has no float64")
    lp = backend.asarray(np.array([-0.3, -2.7]), dtype="float64")
    want = np.array([_k1_exact(-0.3, 0.1), _k1_exact(-2.7, -1.3)])
    for ref in ([0.1, -1.3], (0.1, -1.3), [[0.1, -1.3]]):
        out = backend.to_numpy(kldiv.kl_estimate(lp, ref, estimator="k1"))
        assert out.dtype == np.float64
        np.testing.assert_array_equal(out.reshape(-1), want)
    out = backend.to_numpy(kldiv.kl_estimate(lp, 0.1, estimator="k1"))
    np.testing.assert_array_equal(out, [_k1_exact(-0.3, 0.1), _k1_exact(-2.7, 0.1)])
    loss = kldiv.KLEstimator("k1", reduction="sum")
    assert float(backend.to_numpy(loss(lp, [0.1, -1.3]))) == pytest.approx(want.sum(), rel=1e-15)
    metric = MetricKLEstimator("k1", dtype="float64")
    metric.update_state(lp, [0.1, -1.3])
    assert float(backend.to_numpy(metric.result())) == pytest.approx(want.mean(), rel=1e-15)


def test_objects_with_a_dtype_of_their_own_keep_it() -> None:
    # np.matrix, memoryview, array.array (and pandas, xarray...) carry float64: kl_estimate
    # turned them into float32 (only Python floats are Keras' floatx, as kld does)
    import array

    values = np.array([-0.3, -2.7])
    want = np.expm1(0.3) - 0.3, np.expm1(2.7) - 2.7
    for obj in (np.matrix(values), memoryview(values), array.array("d", values)):
        out = kldiv.kl_estimate(obj, 0.0)
        assert out.dtype == np.float64, type(obj)
        np.testing.assert_allclose(np.asarray(out).reshape(-1), want, rtol=1e-15)
        assert kldiv.KLEstimator()(obj, 0.0).dtype == np.float64
    # Python values stay float32, on either side
    assert kldiv.kl_estimate([-0.3, -2.7], [0.0, 0.0]).dtype == np.float32
    assert kldiv.kl_estimate(-0.3, 0.0).dtype == np.float32


def test_sparse_inputs_name_the_argument() -> None:
    torch = pytest.importorskip("torch")
    sparse = torch.tensor([-1.0, 0.0]).to_sparse()
    with pytest.raises(TypeError, match=r"^logprob is a sparse torch tensor"):
        kldiv.kl_estimate(sparse, torch.zeros(2))
    with pytest.raises(TypeError, match=r"^ref_logprob is a sparse torch tensor"):
        kldiv.kl_estimate(torch.zeros(2), sparse)
    with pytest.raises(TypeError, match=r"^logprob is a sparse"):
        kldiv.KLEstimator()(sparse, torch.zeros(2))
    with pytest.raises(TypeError, match=r"^logprob is a sparse"):
        MetricKLEstimator().update_state(sparse, torch.zeros(2))


def test_loss_float16_result_overflow_is_inf_without_a_warning() -> None:
    """The loss classes' cast back to a float16 result: a value beyond its range is inf, as
    documented, without NumPy's "overflow encountered in cast" warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = kldiv.KLEstimator(reduction="none")(np.array([-30.0], np.float16),
                                                  np.array([0.0], np.float16))
        kl = kldiv.KLDivergence(reduction="sum")(np.full((3, 4), 0.25, np.float16),
                                                 np.full((3, 4), 1e-7, np.float16))
    assert est.dtype == np.float16 and np.isinf(est).all()
    assert kl.dtype == np.float16 and float(kl) > 0


# ---- second pass ------------------------------------------------------------------------------

_AUTOGRAPH = """
import sys
import triton  # noqa: F401  (before TensorFlow: see the README)
import numpy as np
import tensorflow as tf
import kldiv
from kldiv.metrics import KLEstimator

lp = tf.constant(np.array([[-0.5, -1.0, -2.0], [-0.1, -3.0, -9.0]]))
ref = tf.constant(np.array([[-0.7, -0.9, -2.0], [-0.2, -2.5, 0.0]]))
mask = tf.constant(np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
metric = KLEstimator("k1", dtype="float64")

def fn(x, y, w):
    return tf.reduce_sum(kldiv.kl_estimate(x, y, estimator="k2", gradient="k2", value_clamp=3.0))

def loss(x, y, w):
    return kldiv.KLEstimator(log_ratio_clamp=20.0)(x, y, sample_weight=w)

def call(x, y, w):
    return tf.reduce_sum(kldiv.KLEstimator("k1").call(x, y))

def update(x, y, w):
    metric.update_state(x, y, sample_weight=w)
    return metric.result()

spec = [tf.TensorSpec([None, None], tf.float64)] * 3
for f in (fn, loss, call, update):
    print(f.__name__, float(tf.function(f, input_signature=spec)(lp, ref, mask)))
"""


def test_tf_function_does_not_convert_the_estimators(tmp_path: Any) -> None:
    # kl_estimate was not marked graph-safe as kl_divergence is: autograph rewrote it and what
    # it calls inside a user's tf.function, and printed "AutoGraph could not transform
    # <function ops_for> ... Please report this to the TensorFlow team" (an annotated name in
    # a branch) and the same for importlib's _gcd_import
    pytest.importorskip("triton")
    proc = run_tensorflow_script(tmp_path, "autograph_probe.py", _AUTOGRAPH, AUTOGRAPH_VERBOSITY="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not transform" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    d = np.array([[0.2, -0.1, 0.0], [0.1, -0.5, -9.0]])
    values = dict(line.split() for line in proc.stdout.splitlines())
    assert float(values["fn"]) == pytest.approx(np.minimum(d * d / 2, 3.0).sum(), rel=1e-14)
    k3 = np.expm1(-d) + d
    m = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert float(values["loss"]) == pytest.approx((k3 * m).sum() / m.sum(), rel=1e-13)
    assert float(values["call"]) == pytest.approx(d.sum(), rel=1e-14)
    assert float(values["update"]) == pytest.approx((d * m).sum() / m.sum(), rel=1e-14)


def test_metric_keeps_no_graph_from_weights_that_require_grad() -> None:
    # documented: "It keeps no gradient". The inputs were detached but not the sample weights:
    # weights that require grad (a learned token weighting) made the state a torch graph that
    # grew with every update_state (result().requires_grad was True)
    torch = pytest.importorskip("torch")
    lp = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -3.0, -9.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    metric = MetricKLEstimator("k1", dtype="float64")
    for w in (torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True),
              torch.tensor([2.0, 0.5], dtype=torch.float64, requires_grad=True),
              torch.tensor(3.0, dtype=torch.float64, requires_grad=True)):
        metric.update_state(lp, ref, sample_weight=w)
        assert not metric.result().requires_grad
    d = lp.detach().numpy()
    m1 = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    m2 = np.array([[2.0], [0.5]]) * np.ones((2, 3))
    want = ((d * m1).sum() + (d * m2).sum() + 3 * d.sum()) / (m1.sum() + m2.sum() + 18)
    assert float(metric.result()) == pytest.approx(want, rel=1e-14)


def _weight_grad(b: ArrayBackend, lp: np.ndarray, w: np.ndarray, loss: Any) -> tuple[float, np.ndarray]:
    """``(loss(lp, 0, sample_weight=w), d loss / d w)`` on a differentiable backend, float64."""
    if b.name.startswith("torch"):
        torch = b.module
        a = torch.tensor(lp, device=b.device, dtype=torch.float64)
        wt = torch.tensor(w, device=b.device, dtype=torch.float64, requires_grad=True)
        out = loss(a, torch.zeros_like(a), sample_weight=wt)
        out.backward()
        return float(out), wt.grad.cpu().numpy()
    import jax

    jnp = b.module
    a = b.asarray(lp, dtype="float64")

    def f(wt: Any) -> Any:
        return loss(a, jnp.zeros_like(a), sample_weight=wt)

    wt = b.asarray(w, dtype="float64")
    return float(f(wt)), np.asarray(jax.grad(f)(wt))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("reduction", ["mean_with_sample_weight", "sum", "mean"])
def test_gradient_with_respect_to_zero_weights(diff_backend: ArrayBackend, estimator: str, reduction: str) -> None:
    # a masked token's log-ratio was replaced by 0 before anything was computed, so the
    # derivative of the loss with respect to its weight (0) lost the token's estimate: with
    # w = [1, 0, 1], d(mean_with_sample_weight)/dw_1 was -loss / sum(w) instead of
    # (k_1 - loss) / sum(w). Where a token's estimate is finite it now counts; where it is not
    # (an inf or NaN log-probability, k3 past its range) it stays left out, gradient 0
    if "float64" not in diff_backend.float_dtypes:
        pytest.skip(f"{diff_backend.name} has no float64")
    lp = np.array([[-0.5, 0.7, -2.0, 0.3], [-0.1, -3.0, -np.inf, np.nan]])
    w = np.array([[1.0, 0.0, 2.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    k = np.array([[_exact(x, estimator) if np.isfinite(x) else 0.0 for x in row] for row in lp])
    loss = kldiv.KLEstimator(estimator, reduction=reduction)
    value, grad = _weight_grad(diff_backend, lp, w, loss)
    total = (w * k).sum()
    if reduction == "mean_with_sample_weight":
        want_value, want_grad = total / w.sum(), (k - total / w.sum()) / w.sum()
    elif reduction == "sum":
        want_value, want_grad = total, k
    else:
        want_value, want_grad = total / k.size, k / k.size
    assert value == pytest.approx(want_value, rel=1e-14)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-13, atol=1e-16)
    # where the estimate does not fit the dtype (k3 at d = -1000), the masked token stays out
    lp2 = np.array([[-0.5, -1000.0]])
    value, grad = _weight_grad(diff_backend, lp2, np.array([[1.0, 0.0]]), kldiv.KLEstimator(estimator, reduction="sum"))
    k0 = _exact(-0.5, estimator)
    assert value == pytest.approx(k0, rel=1e-14)
    want1 = 0.0 if estimator == "k3" else _exact(-1000.0, estimator)
    np.testing.assert_allclose(grad, [[k0, want1]], rtol=1e-14)
    # under a value clamp every estimate but NaN's is finite: the masked tokens count at
    # their clamped value (k3 at d = -1000 and every member at d = -inf), NaN stays out
    lp3 = np.array([[-0.5, -1000.0, -np.inf, np.nan]])
    clamped = kldiv.KLEstimator(estimator, reduction="sum", value_clamp=10.0)
    value, grad = _weight_grad(diff_backend, lp3, np.array([[1.0, 0.0, 0.0, 0.0]]), clamped)
    assert value == pytest.approx(k0, rel=1e-14)
    lim = -10.0 if estimator == "k1" else 10.0
    want = [k0, min(_exact(-1000.0, estimator), 10.0) if estimator != "k1" else -10.0, lim, 0.0]
    np.testing.assert_allclose(grad, [want], rtol=1e-14)


def test_equal_infinite_inputs_give_zero_without_a_warning(backend: ArrayBackend) -> None:
    # documented: "Equal inputs give 0, also where both are -inf". NumPy's -inf - -inf was
    # computed under errstate; array-api-strict warned "invalid value encountered in
    # subtract" at the call and Dask at compute(): the difference is no longer taken there
    lp = np.array([[-np.inf, -2.0, np.inf, -np.inf], [-1.0, -np.inf, 0.5, -3.0]], dtype=np.float32)
    ref = np.array([[-np.inf, -2.5, np.inf, 0.0], [-1.0, -np.inf, 0.0, -3.0]], dtype=np.float32)
    mask = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=np.float32)
    d = np.array([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0]])
    metric = MetricKLEstimator("k3", dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_token = backend.to_numpy(kldiv.kl_estimate(backend.asarray(lp), backend.asarray(ref), estimator="k1"))
        mean = backend.to_numpy(kldiv.KLEstimator()(backend.asarray(lp), backend.asarray(ref),
                                                    sample_weight=backend.asarray(mask)))
        metric.update_state(backend.asarray(lp), backend.asarray(ref), sample_weight=backend.asarray(mask))
        result = backend.to_numpy(metric.result())
    np.testing.assert_array_equal(per_token, np.where(np.isinf(lp) & (lp != ref), -np.inf, d).astype(np.float32))
    k3 = np.expm1(-d) + d
    assert float(mean) == pytest.approx((k3 * mask).sum() / mask.sum(), rel=1e-6)
    assert float(result) == pytest.approx((k3 * mask).sum() / mask.sum(), rel=1e-6)


def test_masked_arrays_are_a_type_error_naming_the_input() -> None:
    # np.ma arrays lost their mask silently (NumPy's where drops it): kl_estimate returned a
    # plain array whose masked tokens held estimates of the masked data, and the loss and the
    # metric averaged them in. A mask is given as sample_weight (docs); fused_linear_divergence
    # and evaluate_files refuse masked arrays the same way
    lp = np.ma.array([-0.5, -40.0], mask=[False, True])
    ref = np.ma.array([0.0, 0.0], mask=[False, True])
    plain = np.array([-0.5, -40.0])
    for args, name in (((lp, 0.0), "logprob"), ((plain, ref), "ref_logprob"), ((lp, ref), "logprob")):
        with pytest.raises(TypeError, match=rf"^{name} is a masked array.*sample_weight"):
            kldiv.kl_estimate(*args)
        with pytest.raises(TypeError, match=rf"^{name} is a masked array"):
            kldiv.KLEstimator()(*args)
        with pytest.raises(TypeError, match=rf"^{name} is a masked array"):
            MetricKLEstimator().update_state(*args)
    # what the message advises: the data, and the mask as the weights
    w = ~np.ma.getmaskarray(lp)
    got = kldiv.KLEstimator()(np.ma.getdata(lp), 0.0, sample_weight=w)
    assert float(got) == pytest.approx(math.exp(0.5) - 1.5, rel=1e-15)


def test_option_names_are_stored_as_plain_strings() -> None:
    # a str subclass (np.str_, from an array of names or a config file read with NumPy) was
    # stored as given: get_config() and repr held np.str_('k1'), and a pickle needed NumPy
    import json
    import pickle

    name = np.array(["k1"])[0]
    loss = kldiv.KLEstimator(name, gradient=np.str_("k2"))
    metric = MetricKLEstimator(name)
    for cfg in (loss.get_config(), metric.get_config()):
        assert type(cfg["estimator"]) is str
        assert json.loads(json.dumps(cfg)) == cfg
    assert type(loss.get_config()["gradient"]) is str
    assert "np.str_" not in repr(loss) + repr(metric)
    assert pickle.loads(pickle.dumps(loss)) == loss


def test_ref_logprob_conversion_failure_names_logprob() -> None:
    """A ``ref_logprob`` that cannot reach ``logprob``'s library: the message names
    ``logprob`` (the argument whose library the call runs in), not ``y_pred``."""
    torch = pytest.importorskip("torch")
    ref = torch.empty(3, device="meta")  # no data: it cannot become a NumPy array
    with pytest.raises(TypeError, match="ref_logprob") as info:
        kldiv.kl_estimate(np.zeros(3, np.float32), ref)
    assert "logprob's library" in str(info.value) and "y_pred" not in str(info.value)


@pytest.mark.parametrize("name", ["log_ratio_clamp", "value_clamp"])
@pytest.mark.parametrize("value", [10**400, -(10**300)], ids=["1e400", "-1e300"])
def test_huge_clamp_is_shortened_in_the_message(name: str, value: int) -> None:
    """An integer of hundreds of digits is echoed shortened, as temperature and beta are."""
    lp, ref = np.array([-1.0], np.float32), np.array([0.0], np.float32)
    digits = len(repr(value))
    for make in (lambda: kldiv.kl_estimate(lp, ref, **{name: value}),
                 lambda: kldiv.KLEstimator(**{name: value}),
                 lambda: MetricKLEstimator(**{name: value})):
        with pytest.raises(ValueError, match=name) as info:
            make()
        assert f"({digits} characters)" in str(info.value) and len(str(info.value)) < 200


def test_long_estimator_name_is_shortened_in_the_message() -> None:
    with pytest.raises(ValueError, match="estimator") as info:
        kldiv.kl_estimate([0.0], [0.0], estimator="k" * 5000)
    assert "(5002 characters)" in str(info.value) and len(str(info.value)) < 300


def test_tracing_is_asked_once_per_estimate(monkeypatch: pytest.MonkeyPatch) -> None:
    """prepare_estimate asks "is dynamo tracing?" once and hands the answer down (the
    conversion helpers, the libraries table, the series' coefficients)."""
    torch = pytest.importorskip("torch")
    original, calls = torch.compiler.is_compiling, []

    def counting() -> bool:
        calls.append(1)
        return bool(original())

    lp = np.random.default_rng(0).standard_normal(5).astype(np.float32)
    for estimator in ("k1", "k2", "k3"):
        kldiv.kl_estimate(lp, lp[::-1].copy(), estimator=estimator)
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", counting)
            calls.clear()
            kldiv.kl_estimate(lp, lp[::-1].copy(), estimator=estimator)
        assert len(calls) == 1, estimator


def test_metric_name_set_after_construction_is_a_plain_string_in_its_config() -> None:
    metric = MetricKLEstimator()
    metric.name = np.str_("kl_probe")
    name = metric.get_config()["name"]
    assert type(name) is str and name == "kl_probe"
