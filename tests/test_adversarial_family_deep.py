"""Deeper hostile inputs for the divergence family: ``kl_divergence`` beyond probabilities,
``reverse_kl_divergence``, ``js_divergence``, their loss classes and metrics, on every backend.

Each test here failed on the code before its fix. The oracle is written from the definitions
(SPEC and docs/distillation.md) in float64, entry by entry with ``math``: logits shifted by
their row maximum *before* the division by the temperature, ``0 * log 0 = 0``, ``+inf`` where
Q is 0 and P is not, NaN wherever a NaN meets a probability that is not 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend

INF = math.inf
FUNCTIONS: dict[str, tuple[Any, dict[str, Any]]] = {
    "kl": (kldiv.kl_divergence, {}),
    "reverse_kl": (kldiv.reverse_kl_divergence, {}),
    "js": (kldiv.js_divergence, {"beta": 0.3}),
}


def _call(member: str, y_true: Any, y_pred: Any, **kw: Any) -> Any:
    fn, params = FUNCTIONS[member]
    return fn(y_true, y_pred, **{**params, **kw})


# ------------------------------------------------------------------------------------ oracle
def _log_row(row: list[float], space: str, temperature: float) -> list[float]:
    if space == "probs":
        return [math.log(min(max(v, 1e-7), 1.0)) if v == v else math.nan for v in row]
    if space == "log_probs":
        return list(row)
    if any(v != v for v in row):
        return [math.nan] * len(row)
    live = [v for v in row if v > -INF]
    if not live:
        return [-INF] * len(row)  # the zero measure
    m = max(live)
    z = [(v - m) / temperature if v > -INF else -INF for v in row]
    lse = math.log(math.fsum(math.exp(v) for v in z))
    return [v - lse for v in z]


def _kl_row(la: list[float], lb: list[float]) -> float:
    terms = []
    for a, b in zip(la, lb, strict=True):
        if a == -INF:
            continue  # 0 * log 0 = 0, whatever the other side holds (docs/distillation.md)
        if a != a or b != b:
            return math.nan
        terms.append(INF if b == -INF else math.exp(a) * (a - b))
    return INF if INF in terms else math.fsum(terms)


def _js_row(lp: list[float], lq: list[float], beta: float) -> float:
    terms = []
    for a, b in zip(lp, lq, strict=True):
        if a != a or b != b:
            return math.nan
        # log M = log(beta p + (1 - beta) q), in log space (beta p may underflow)
        sides = [v for v in (math.log(beta) + a, math.log1p(-beta) + b) if v > -INF]
        if not sides:
            continue
        top = max(sides)
        lm = top + math.log(math.fsum(math.exp(v - top) for v in sides))
        if a > -INF:
            terms.append(beta * math.exp(a) * (a - lm))
        if b > -INF:
            terms.append((1 - beta) * math.exp(b) * (b - lm))
    return math.fsum(terms)


def oracle(member: str, y_true: Any, y_pred: Any, inputs: Any = "probs",
           temperature: float = 1.0, beta: float = 0.3) -> np.ndarray:
    """The per-row divergence in float64, from the definitions."""
    spaces = (inputs, inputs) if isinstance(inputs, str) else tuple(inputs)
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    t, p = np.broadcast_arrays(t, p)
    out = np.zeros(t.shape[:-1])
    for idx in np.ndindex(out.shape):
        lp = _log_row(t[idx].tolist(), spaces[0], temperature)
        lq = _log_row(p[idx].tolist(), spaces[1], temperature)
        if member == "kl":
            out[idx] = _kl_row(lp, lq)
        elif member == "reverse_kl":
            out[idx] = _kl_row(lq, lp)
        else:
            out[idx] = _js_row(lp, lq, beta)
    return out


def _close(got: Any, want: np.ndarray, *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# ------------------------------------------------------------------- huge temperatures
# Logits with a masked (-inf) entry on each side. A temperature whose reciprocal is not a
# normal number of the compute dtype (above 2**126 in float32, 2**1022 in float64) used to
# give NaN: XLA divides by multiplying with the reciprocal, flushed to 0 (-inf * 0), and
# beyond float32's range T itself is inf there (-inf / inf). The divergence of
# log_softmax(x / T) is defined for every finite T > 0: it tends to that of the uniform
# distributions over the entries that are not -inf.
HUGE_T = [("float32", 1e38), ("float32", 1e39), ("float32", 1e300), ("float64", 1.7e308)]
_T_LOGITS = np.array([[1.0, 2.0, -INF, 0.5], [3.0, -INF, -INF, -INF], [0.0, 0.0, 1.0, 2.0]])
_P_LOGITS = np.array([[0.0, -INF, 3.0, 1.0], [3.0, 1.0, -INF, 2.0], [5.0, -3.0, 1.0, 2.0]])


@pytest.mark.parametrize(("dtype", "temperature"), HUGE_T)
@pytest.mark.parametrize("member", list(FUNCTIONS))
def test_huge_temperature_is_the_uniform_limit(backend: ArrayBackend, member: str, dtype: str,
                                               temperature: float) -> None:
    if dtype not in backend.float_dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    got = _call(member, backend.asarray(_T_LOGITS, dtype), backend.asarray(_P_LOGITS, dtype),
                inputs="logits", temperature=temperature)
    _close(backend.to_numpy(got), oracle(member, _T_LOGITS, _P_LOGITS, "logits", temperature))


@pytest.mark.parametrize(("dtype", "temperature"), HUGE_T)
def test_huge_temperature_mixed_spaces(backend: ArrayBackend, dtype: str,
                                       temperature: float) -> None:
    if dtype not in backend.float_dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    probs = np.array([[0.2, 0.3, 0.0, 0.5], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    for member in FUNCTIONS:
        got = _call(member, backend.asarray(probs, dtype), backend.asarray(_P_LOGITS, dtype),
                    inputs=("probs", "logits"), temperature=temperature)
        _close(backend.to_numpy(got),
               oracle(member, probs, _P_LOGITS, ("probs", "logits"), temperature))


@pytest.mark.parametrize("jit", [False, True])
def test_huge_temperature_tensorflow(jit: bool) -> None:
    tf = pytest.importorskip("tensorflow")
    for dtype, temperature in HUGE_T:
        t, p = tf.constant(_T_LOGITS, dtype=dtype), tf.constant(_P_LOGITS, dtype=dtype)
        for member in FUNCTIONS:
            fn = tf.function(lambda a, b, m=member, tt=temperature: _call(
                m, a, b, inputs="logits", temperature=tt), jit_compile=True) if jit else (
                lambda a, b, m=member, tt=temperature: _call(m, a, b, inputs="logits",
                                                             temperature=tt))
            _close(fn(t, p).numpy(), oracle(member, _T_LOGITS, _P_LOGITS, "logits", temperature))


@pytest.mark.parametrize("member", list(FUNCTIONS))
def test_huge_temperature_gradients_are_finite(diff_backend: ArrayBackend, member: str) -> None:
    """The limit is flat: gradients 0 (the true ones are of order 1 / T), never NaN, also at the
    masked entries."""
    for dtype, temperature in HUGE_T:
        if dtype not in diff_backend.float_dtypes:
            continue
        t = diff_backend.asarray(_T_LOGITS, dtype)
        p = diff_backend.asarray(_P_LOGITS[:, ::-1].copy(), dtype)  # finite everywhere: KL finite
        keep = np.isfinite(oracle(member, _T_LOGITS, _P_LOGITS[:, ::-1], "logits", temperature))
        w = diff_backend.asarray(keep.astype(dtype), dtype)
        if diff_backend.module.__name__ == "torch":
            torch = diff_backend.module
            s = p.clone().requires_grad_(True)
            out = _call(member, t, s, inputs="logits", temperature=temperature)
            (torch.where(w > 0, out, 0.0)).sum().backward()
            grad = diff_backend.to_numpy(s.grad)
        else:
            import jax
            import jax.numpy as jnp

            def loss(s: Any, t: Any = t, w: Any = w, temperature: float = temperature) -> Any:
                out = _call(member, t, s, inputs="logits", temperature=temperature)
                return jnp.sum(jnp.where(w > 0, out, 0.0))

            grad = np.asarray(jax.grad(loss)(p))
        assert np.isfinite(grad).all(), (dtype, temperature, grad)
        np.testing.assert_allclose(grad, 0.0, atol=1e-30)


# ------------------------------------------------- NaN against an underflowing probability
# P's log-probability is finite but exp() of it underflows to 0 (a logit gap beyond ~104 in
# float32, ~745 in float64): P is not 0 there, so a NaN in Q at that entry makes the term
# NaN. It used to be dropped (the kernels' "p == 0 by underflow: the term is 0" branch
# counted it as 0): a finite divergence out of a NaN input. A -inf log-probability (a
# probability of exactly 0) still contributes 0 whatever the other side holds.
def _underflow_rows(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    deep = -200.0 if dtype == "float32" else -1000.0  # exp() underflows to 0
    lp = np.array([[0.0, deep, -INF], [0.0, deep, -INF], [0.0, deep, -INF]])
    lq = np.array([[-0.5, np.nan, -1.0], [-0.5, -1.0, np.nan], [-0.5, -1.0, -INF]])
    return lp, lq


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("member", ["kl", "reverse_kl"])
def test_nan_against_an_underflowing_probability_propagates(backend: ArrayBackend, member: str,
                                                            dtype: str) -> None:
    if dtype not in backend.float_dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    lp, lq = _underflow_rows(dtype)
    if member == "reverse_kl":  # KL(Q || P): the underflowing side is y_pred
        lp, lq = lq, lp
    got = backend.to_numpy(_call(member, backend.asarray(lp, dtype), backend.asarray(lq, dtype),
                                 inputs="log_probs"))
    want = np.array([np.nan, 0.0, 0.0])
    want[1:] = oracle(member, lp[1:], lq[1:], "log_probs")
    _close(got, want)


@pytest.mark.parametrize("member", ["kl", "reverse_kl"])
def test_nan_against_an_underflowing_probability_with_gradients(diff_backend: ArrayBackend,
                                                                member: str) -> None:
    """The differentiable fast paths (torch's autograd.Function, JAX's custom_jvp) too."""
    lp, lq = _underflow_rows("float32")
    if member == "reverse_kl":
        lp, lq = lq, lp
    t, p = diff_backend.asarray(lp, "float32"), diff_backend.asarray(lq, "float32")
    if diff_backend.module.__name__ == "torch":
        p = p.clone().requires_grad_(True)
        got = diff_backend.to_numpy(_call(member, t, p, inputs="log_probs"))
    else:
        import jax

        got = np.asarray(jax.jvp(lambda s: _call(member, t, s, inputs="log_probs"), (p,),
                                 (p * 0 + 1,))[0])
    assert np.isnan(got[0]) and np.isfinite(got[1:]).all(), got


def test_nan_against_an_underflowing_probability_tensorflow() -> None:
    tf = pytest.importorskip("tensorflow")
    lp, lq = _underflow_rows("float32")
    got = kldiv.kl_divergence(tf.constant(lp, tf.float32), tf.constant(lq, tf.float32),
                              inputs="log_probs").numpy()
    assert np.isnan(got[0]) and np.isfinite(got[1:]).all(), got
