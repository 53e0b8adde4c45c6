"""Deeper hostile probes of ``kldiv.fused_linear_divergence`` / ``FusedLinearDivergence``.

Each test here failed on the code before its fix. The oracles are written from the
definition (docs/large-vocabulary.md): per token, the teacher's ``P`` and the student's ``Q``
are the softmax of the logits divided by the temperature; ``0 log 0 = 0``; a probability
against a 0 on the other side makes the KL divergences ``+inf``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend

F = kldiv.fused_linear_divergence
INF = math.inf
BETA = 0.3
DIVS = ["kl", "reverse_kl", "js"]


def _divergence64(lp: np.ndarray, lq: np.ndarray, div: str, beta: float = BETA) -> float:
    """One token's divergence from float64 log-probabilities (``-inf``: probability 0)."""
    if div == "reverse_kl":
        lp, lq, div = lq, lp, "kl"
    terms = []
    for a, c in zip(lp.tolist(), lq.tolist(), strict=True):
        p, q = math.exp(a), math.exp(c)
        if div == "kl":
            if a > -INF:
                terms.append(INF if c == -INF else p * (a - c))
        else:
            m = beta * p + (1 - beta) * q
            if p > 0:
                terms.append(beta * p * math.log(p / m))
            if q > 0:
                terms.append((1 - beta) * q * math.log(q / m))
    return INF if INF in terms else math.fsum(terms)


# ------------------------------------------------- the T -> inf limit (a huge temperature)
def _uniform_log_probs(x: np.ndarray) -> np.ndarray:
    """``lim_{T -> inf} log_softmax(x / T)``: uniform over the entries that are not -inf."""
    live = x > -INF
    return np.where(live, -math.log(max(int(live.sum()), 1)), -INF)


def _huge_temperature_case() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(31)
    h = rng.standard_normal((4, 6))
    w = rng.standard_normal((7, 6))
    b = np.zeros(7)
    b[3] = -INF  # the student never predicts entry 3
    tl = 3 * rng.standard_normal((4, 7))
    tl[0, [1, 3]] = -INF  # P's support inside Q's: finite KL, infinite reverse KL
    tl[1, [3, 5]] = -INF
    tl[2, 1] = -INF  # P has mass where Q has none: infinite KL
    return h, w, b, tl


@pytest.mark.parametrize("temperature", [1e38, 1e39, 1e300, 1e308])
@pytest.mark.parametrize("div", DIVS)
def test_huge_temperature_is_the_uniform_limit(backend: ArrayBackend, div: str,
                                               temperature: float) -> None:
    """A temperature whose reciprocal is below the compute dtype's smallest normal number
    (1e39 and beyond is infinite in float32; 1e38's reciprocal is subnormal, which XLA
    flushes to 0) is the ``T -> inf`` limit, uniform over the entries that are not -inf, as
    in the family functions; was NaN on every backend (``-inf / inf``, ``-inf * 0``)."""
    h, w, b, tl = _huge_temperature_case()
    want = np.array([_divergence64(_uniform_log_probs(t), _uniform_log_probs(b), div)
                     for t in tl])
    assert (np.isfinite(want).any() and np.isinf(want).any()) or div == "js"
    for dtype in ("float32", "float64"):
        if dtype not in backend.float_dtypes or (dtype == "float32") != (temperature < 1e300):
            continue
        x = [backend.asarray(a, dtype) for a in (h, w, tl, b)]
        got = F(x[0], x[1], x[2], student_bias=x[3], divergence=div, beta=BETA,
                temperature=temperature, reduction="none")
        got = np.asarray(backend.to_numpy(got), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_huge_temperature_has_zero_gradients() -> None:
    """The ``T -> inf`` limit is flat: zero, finite gradients (torch, JAX; the true ones are
    of order ``1 / T``, below the dtype's smallest normal number)."""
    torch = pytest.importorskip("torch")
    h, w, b, tl = _huge_temperature_case()
    th, tw, tb = (torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (h, w, b))
    out = F(th, tw, torch.tensor(tl, dtype=torch.float32), student_bias=tb, divergence="js",
            temperature=1e39)
    assert math.isfinite(float(out.detach()))
    out.backward()
    for g in (th.grad, tw.grad, tb.grad):
        assert g is not None and bool((g == 0).all())
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    val, grads = jax.value_and_grad(
        lambda a, c: F(a, c, jnp.asarray(tl, jnp.float32), divergence="js", temperature=1e38),
        argnums=(0, 1))(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
    assert math.isfinite(float(val))
    for g in grads:
        assert bool((g == 0).all())


# ------------------------------------------------------- Dask: no warnings at compute()
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 1e39])
@pytest.mark.parametrize("div", DIVS)
def test_dask_minus_inf_logits_warn_nothing_at_compute(div: str, temperature: float) -> None:
    """``-inf`` logits (documented input) on both sides: Dask computes the value without
    NumPy's "invalid value encountered" RuntimeWarnings, as NumPy's route does (its error
    state cannot reach Dask's deferred tasks: the chunk math itself must not form
    ``-inf - -inf`` or ``0 * inf``); was two warnings per call at ``compute()``."""
    da = pytest.importorskip("dask.array")
    h, w, b, tl = _huge_temperature_case()
    tl[3] = -INF  # a teacher row of no mass too (finite for KL and JS)
    b[1] = -INF  # -inf on both sides of the same entry
    if div == "reverse_kl":  # keep it finite: the teacher's -inf only where the student's is
        tl = np.where(np.isneginf(b), -INF, 3 * np.cos(h @ w.T))
    want = F(h, w, tl, student_bias=b, divergence=div, beta=BETA, temperature=temperature,
             reduction="none")
    assert np.isfinite(want).all() or div == "kl"
    x = [da.from_array(a, chunks=2) for a in (h, w, tl, b)]
    lazy = F(x[0], x[1], x[2], student_bias=x[3], divergence=div, beta=BETA,
             temperature=temperature, reduction="none", chunk_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lazy.compute()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the loss class's config
def test_loss_class_config_holds_plain_python_values() -> None:
    """``name`` (and every option) is stored as a plain Python value: a ``np.str_`` name
    showed as ``name=np.str_('x')`` in the repr and the config (the family losses were
    fixed the same way); the config round-trips through JSON."""
    json = pytest.importorskip("json")
    loss = kldiv.FusedLinearDivergence(np.str_("JS"), beta=np.float32(0.25),
                                       temperature=np.int64(2), reduction=np.str_("sum"),
                                       chunk_size=np.int32(3), name=np.str_("distill"))
    config = loss.get_config()
    assert config == {"divergence": "js", "beta": 0.25, "temperature": 2.0,
                      "reduction": "sum", "chunk_size": 3, "name": "distill"}
    assert [type(v) for v in config.values()] == [str, float, float, str, int, str]
    assert repr(loss) == ("FusedLinearDivergence(divergence='js', beta=0.25, temperature=2.0, "
                          "reduction='sum', chunk_size=3, name='distill')")
    again = kldiv.FusedLinearDivergence.from_config(json.loads(json.dumps(config)))
    assert again == loss and again.get_config() == config


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_dask_half_result_beyond_its_range_is_inf_without_warning(reduction: str) -> None:
    """float16 inputs are computed in float32 and the result rounded back: beyond float16's
    range that is ``inf`` (documented), on NumPy silently; Dask cast at ``compute()``, out
    of reach of NumPy's error state, and warned "overflow encountered in cast"."""
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(5)
    h, w = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    tl = 5 * rng.standard_normal((4, 5))
    sw = np.full(4, 1e5)
    want = F(*(a.astype(np.float16) for a in (h, w, tl)), sample_weight=sw, reduction=reduction)
    assert want.dtype == np.float16 and np.isinf(want).any()
    lazy = F(*(da.from_array(a.astype(np.float16), chunks=2) for a in (h, w, tl)),
             sample_weight=sw, reduction=reduction)
    assert lazy.dtype == np.float16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lazy.compute()
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("div", DIVS)
def test_dask_tiny_temperature_warns_nothing_at_compute(div: str) -> None:
    """A tiny (valid, normal) temperature: ``(x - max) / T`` is beyond the dtype's range for
    the entries far below the row maximum, which are ``-inf`` there (probability 0, the
    argmax limit, as on NumPy); Dask's deferred division warned "overflow encountered in
    divide" at ``compute()`` (NumPy's error state cannot reach its tasks)."""
    da = pytest.importorskip("dask.array")
    s = np.array([[0.0, -100.0, 3.0], [5.0, 5.0, -200.0], [1.0, 2.0, 3.0]], np.float32)
    tl = np.array([[1.0, -300.0, 2.0], [5.0, 4.0, -INF], [-50.0, 2.0, 3.0]], np.float32)
    eye = np.eye(3, dtype=np.float32)
    want = F(s, eye, tl, divergence=div, beta=BETA, temperature=1e-37, reduction="none")
    assert not np.isnan(want).any()
    lazy = F(*(da.from_array(a, chunks=2) for a in (s, eye, tl)), divergence=div, beta=BETA,
             temperature=1e-37, reduction="none", chunk_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lazy.compute()
    np.testing.assert_array_equal(got, want)
