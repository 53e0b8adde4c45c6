"""JAX's family fast path (``kldiv.backends.jax_family``): the closed-form ``custom_jvp``.

Every check compares the fast path with the generic kernel on the same inputs
(``kldiv.use_generic()``) and with a float64 NumPy oracle written from the definitions, and
first makes sure that the rule really ran (its ``custom_jvp_call`` is in the traced program),
so that none of them can pass on the generic kernel alone. Derivatives: ``jax.grad`` w.r.t.
each side and both, under ``jax.jit``; ``jacfwd``, ``jacrev``, ``hessian`` and a gradient of
a gradient on a tiny case; ``vmap``. Corner cases (an entry or a row of ``-inf``, NaN,
``+inf``, a probability that underflows or overflows) are compared with the generic kernel
run op by op (eagerly), NaN for NaN and infinity for infinity: ``jax.jit`` of the generic
kernel itself places its NaN differently in such rows (XLA rewrites ``0 * inf``), so the
op-by-op kernel is the definition.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import kldiv

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from kldiv import _spaces  # noqa: E402
from kldiv.backends import jax_family  # noqa: E402

INF = math.inf
FUNCS: dict[str, Callable[..., Any]] = {
    "kl": kldiv.kl_divergence,
    "reverse_kl": kldiv.reverse_kl_divergence,
    "js": kldiv.js_divergence,
}
RULE_SPACES: list[Any] = ["logits", "log_probs", ("logits", "log_probs"), ("log_probs", "logits")]


@pytest.fixture(autouse=True)
def _x64() -> None:
    jax.config.update("jax_enable_x64", True)  # as the suite's JAX fixture does


def _pair(inputs: Any) -> tuple[str, str]:
    return (inputs, inputs) if isinstance(inputs, str) else (inputs[0], inputs[1])


def _kwargs(member: str, inputs: Any, temperature: float = 1.0,
            beta: float = 0.3) -> dict[str, Any]:
    kw: dict[str, Any] = {"inputs": inputs}
    if "logits" in _pair(inputs):
        kw["temperature"] = temperature
    if member == "js":
        kw["beta"] = beta
    return kw


def _fn(member: str, **kw: Any) -> Callable[[Any, Any], Any]:
    return lambda a, b: FUNCS[member](a, b, **kw)


def _uses_rule(fn: Callable[[Any, Any], Any], a: Any, b: Any) -> bool:
    """Whether the traced call holds the rule (a new function each time: JAX caches traces
    by function, and use_generic() is read while tracing)."""
    return "name=_closed" in str(jax.make_jaxpr(lambda x, y: fn(x, y))(a, b))


# ------------------------------------------------------------------------------ the oracle
def _log64(x: np.ndarray, space: str, temperature: float) -> np.ndarray:
    """float64 log-probabilities from the definition; a row of all -inf logits stays -inf."""
    x = np.asarray(x, dtype=np.float64)
    if space == "log_probs":
        return x
    z = x / temperature
    live = z > -INF
    m = np.max(np.where(live, z, -INF), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # NaN, +inf: NaN
        lse = np.log(np.sum(np.where(live, np.exp(z - m), 0.0), axis=-1, keepdims=True))
        return np.where(live, z - m - lse, -INF)


def _xlogy_rows(a: np.ndarray, la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """sum over a > 0 of a (la - lb); +inf where lb = -inf there."""
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.where(a > 0, a * (la - lb), 0.0)
    return np.sum(terms, axis=-1)


def oracle(member: str, t: np.ndarray, p: np.ndarray, inputs: Any, temperature: float = 1.0,
           beta: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value, d value / d y_true, d value / d y_pred) in float64 from the definitions (the
    derivatives of finite rows; JSD in linear space)."""
    s_true, s_pred = _pair(inputs)
    lp, lq = np.broadcast_arrays(_log64(t, s_true, temperature), _log64(p, s_pred, temperature))
    P, Q = np.exp(lp), np.exp(lq)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if member in ("kl", "reverse_kl"):
            # KL(A || B) with A = P (forward) or Q (reverse)
            la, lb, A = (lp, lq, P) if member == "kl" else (lq, lp, Q)
            value = _xlogy_rows(A, la, lb)
            ga = np.where(A > 0, A * (la - lb + 1.0), 0.0)
            gb = -A
            g_true, g_pred = (ga, gb) if member == "kl" else (gb, ga)
        else:
            M = beta * P + (1 - beta) * Q
            lm = np.log(M)
            value = (beta * _xlogy_rows(P, lp, lm) + (1 - beta) * _xlogy_rows(Q, lq, lm))
            g_true = np.where(P > 0, beta * P * (lp - lm), 0.0)
            g_pred = np.where(Q > 0, (1 - beta) * Q * (lq - lm), 0.0)

    def through(g: np.ndarray, l_: np.ndarray, space: str) -> np.ndarray:
        if space == "log_probs":
            return g
        with np.errstate(invalid="ignore"):  # rows of infinite divergence: not compared
            return (g - np.exp(l_) * np.sum(g, axis=-1, keepdims=True)) / temperature

    return value, through(g_true, lp, s_true), through(g_pred, lq, s_pred)


# ------------------------------------------------------------------------------ inputs
MASKS = ["none", "true", "pred", "same", "both"]


def _case(rng: np.random.Generator, shape: tuple[int, ...], inputs: Any,
          mask: str) -> tuple[np.ndarray, np.ndarray]:
    """Random float64 inputs in their spaces; ``mask``: -inf entries in y_true only, y_pred
    only, the same positions on both sides, or different positions on both; the masked
    cases also have an all -inf row on one side and a row masked on both."""
    t = rng.normal(0.0, 2.0, shape)
    p = rng.normal(0.0, 2.0, shape)
    rows_t, rows_p = t.reshape(-1, shape[-1]), p.reshape(-1, shape[-1])
    if mask != "none":
        cols = rng.choice(shape[-1], size=2, replace=False)
        if mask in ("true", "same", "both"):
            rows_t[:, cols[0]] = -INF
        if mask in ("pred", "same"):
            rows_p[:, cols[0]] = -INF
        if mask == "both":
            rows_p[:, cols[1]] = -INF
        if rows_t.shape[0] >= 3:
            if mask in ("true", "same", "both"):
                rows_t[1] = -INF
            if mask in ("pred", "same", "both"):
                rows_p[2] = -INF
            rows_t[0] = rows_p[0] = -INF
    out = []
    for x, space in zip((t, p), _pair(inputs), strict=True):
        out.append(x if space == "logits" else _log64(x, "logits", 1.0))
    return out[0], out[1]


def _compare(got: Any, want: Any, *, rtol: float, atol: Any, what: str) -> None:
    """NaN where NaN, the same infinities, finite values within ``atol + rtol * |want|``
    (``atol`` may be an array, per entry)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN")
    inf = np.isinf(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"{what}: inf")
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), fin, err_msg=f"{what}: finite")
    err = np.abs(np.where(fin, got, 0.0) - np.where(fin, want, 0.0))
    bound = np.broadcast_to(atol, want.shape) + rtol * np.abs(np.where(fin, want, 0.0))
    worst = np.unravel_index(np.argmax(err - bound), want.shape) if want.size else ()
    assert np.all(err <= bound), (f"{what}: |got - want| = {err[worst]:.3g} > {bound[worst]:.3g} "
                                  f"at {worst} (got {got[worst]!r}, want {want[worst]!r})")


def _value_and_grads(fn: Callable[[Any, Any], Any], t: Any, p: Any, *,
                     jit: bool = True) -> list[np.ndarray]:
    """The value and ``jax.grad`` of a weighted sum of rows (row i weighs i + 1) w.r.t. both
    inputs, and the weights."""
    shape = np.broadcast_shapes(np.shape(t), np.shape(p))[:-1]
    w = jnp.reshape(jnp.arange(1.0, math.prod(shape) + 1.0), shape)

    def both(a: Any, b: Any) -> Any:
        return fn(a, b), jax.grad(lambda a, b: jnp.sum(fn(a, b) * w), argnums=(0, 1))(a, b)

    value, (ga, gb) = (jax.jit(both) if jit else both)(jnp.asarray(t), jnp.asarray(p))
    return [np.asarray(value), np.asarray(ga), np.asarray(gb), np.asarray(w)]


# ------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("inputs", [*RULE_SPACES, "probs", ("probs", "logits")], ids=str)
def test_rule_runs_for_logits_and_log_probs_only(inputs: Any) -> None:
    """The closed-form rule covers "logits" and "log_probs" on each side; "probs" keeps the
    generic kernel's derivatives; use_generic() switches the fast path off."""
    t, p = _case(np.random.default_rng(0), (3, 5), "logits", "none")
    t, p = ((np.exp(x) / np.exp(x).sum(-1, keepdims=True) if space == "probs" else x)
            for x, space in zip((t, p), _pair(inputs), strict=True))
    for member in FUNCS:
        fn = _fn(member, **_kwargs(member, inputs))
        assert _uses_rule(fn, t, p) == ("probs" not in _pair(inputs)), (member, inputs)
        with kldiv.use_generic():
            assert not _uses_rule(fn, t, p)


def test_log_softmax_is_the_generic_one_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    for dtype in ("float32", "float64"):
        x = rng.normal(0.0, 3.0, (6, 37)).astype(dtype)
        x[1, 3] = x[2] = -INF
        x[3, 5], x[4, 0] = np.nan, INF
        for temperature in (1.0, 0.5, 3.0):
            ours, s = jax.jit(jax_family._log_softmax, static_argnums=1)(jnp.asarray(x),
                                                                        temperature)
            ref = jax.jit(lambda a, t=temperature: _spaces.log_softmax(jnp, a, t))(jnp.asarray(x))
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
            assert np.asarray(s)[2, 0] == 0.0 and np.isnan(np.asarray(s)[3:5]).all()


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("inputs", RULE_SPACES, ids=str)
@pytest.mark.parametrize("member", list(FUNCS))
def test_values_and_gradients_match_generic_and_oracle(member: str, inputs: Any,
                                                       mask: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{member}{inputs}{mask}".encode()))
    t, p = _case(rng, (6, 11), inputs, mask)
    betas = (0.1, 0.5, 0.9) if member == "js" else (0.3,)
    temps = (1.0, 0.5, 3.0) if "logits" in _pair(inputs) else (1.0,)
    for temperature in temps:
        for beta in betas:
            fn = _fn(member, **_kwargs(member, inputs, temperature, beta))
            assert _uses_rule(fn, t, p)
            value, g_t, g_p, w = _value_and_grads(fn, t, p)
            with kldiv.use_generic():  # op by op: see the module docstring
                want = _value_and_grads(fn, t, p, jit=False)
            what = f"{member} {inputs} {mask} T={temperature} beta={beta}"
            for got, ref, name in zip((value, g_t, g_p), want, ("value", "d/dy_true", "d/dy_pred"),
                                      strict=False):
                _compare(got, ref, rtol=1e-9, atol=1e-12, what=f"{what}: {name} vs generic")
            o_value, o_t, o_p = oracle(member, t, p, inputs, temperature, beta)
            _compare(value, o_value, rtol=1e-9, atol=1e-12, what=f"{what}: value vs oracle")
            finite = np.isfinite(o_value)
            for got, ref, name in ((g_t, o_t, "d/dy_true"), (g_p, o_p, "d/dy_pred")):
                ref = ref * w[..., None]
                _compare(got[finite], ref[finite], rtol=1e-9, atol=1e-12,
                         what=f"{what}: {name} vs oracle")
                # masked entries: exactly 0, no NaN
                assert np.all(got[finite][np.isneginf(np.broadcast_to(
                    t if name == "d/dy_true" else p, got.shape)[finite])] == 0.0), what


@pytest.mark.parametrize("inputs", RULE_SPACES, ids=str)
@pytest.mark.parametrize("member", list(FUNCS))
def test_gradient_of_one_side(member: str, inputs: Any) -> None:
    """The teacher a constant (the rule skips its derivative: a symbolic zero), or the student:
    each is the matching part of the gradient w.r.t. both."""
    rng = np.random.default_rng(3)
    t, p = _case(rng, (5, 9), inputs, "same")
    fn = _fn(member, **_kwargs(member, inputs, 2.0))
    _, g_t, g_p, _ = _value_and_grads(fn, t, p)
    w = jnp.arange(1.0, 6.0)
    only_p = jax.jit(jax.grad(lambda b: jnp.sum(fn(jnp.asarray(t), b) * w)))(jnp.asarray(p))
    only_t = jax.jit(jax.grad(lambda a: jnp.sum(fn(a, jnp.asarray(p)) * w)))(jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(only_p), g_p, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(only_t), g_t, rtol=1e-12, atol=1e-14)


# The corner cases, entry by entry: NaN, +-inf, probabilities that underflow (-200, -800) or
# overflow (800) as log-probabilities
_SPECIAL = [np.nan, INF, -INF, -200.0, -800.0, 800.0]


def _zoo(rng: np.random.Generator, rows: int, cols: int,
         dtype: str) -> tuple[np.ndarray, np.ndarray]:
    t = rng.normal(0.0, 2.5, (rows, cols))
    p = rng.normal(0.0, 2.5, (rows, cols))
    for r in range(rows):
        for x in (t, p):
            for _ in range(rng.integers(0, 3)):
                x[r, rng.integers(cols)] = _SPECIAL[rng.integers(len(_SPECIAL))]
    t[0] = -INF
    p[1] = -INF
    t[2] = p[2] = -INF
    t[3, :] = np.nan
    return t.astype(dtype), p.astype(dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("inputs", RULE_SPACES, ids=str)
@pytest.mark.parametrize("member", list(FUNCS))
def test_corner_cases_match_the_generic_kernel(member: str, inputs: Any, dtype: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{member}{inputs}{dtype}zoo".encode()))
    temps = (1.0, 0.5, 3.0) if "logits" in _pair(inputs) else (1.0,)
    for temperature in temps:
        t, p = _zoo(rng, 40, 6, dtype)
        fn = _fn(member, **_kwargs(member, inputs, temperature, 0.3))
        got = _value_and_grads(fn, t, p)
        with kldiv.use_generic():
            want = _value_and_grads(fn, t, p, jit=False)
        # float32: the terms cancel against the row's divergence; their size bounds the error
        lp = _log64(t, _pair(inputs)[0], temperature)
        lq = _log64(p, _pair(inputs)[1], temperature)
        with np.errstate(invalid="ignore"):
            size = np.nanmax(np.where(np.isfinite(lp + lq), np.abs(lp) + np.abs(lq), 0.0),
                             axis=-1, keepdims=True)
        for i, name in enumerate(("value", "d/dy_true", "d/dy_pred")):
            atol: Any = 1e-12
            if dtype == "float32":
                w_ = np.where(np.isfinite(want[i]), np.abs(want[i]), 0.0)
                atol = 5e-6 * (1.0 + (size if i else size[:, 0])) * (1.0 + w_)
            _compare(got[i], want[i], rtol=1e-9, atol=atol,
                     what=f"{member} {inputs} {dtype} T={temperature}: {name}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("inputs", RULE_SPACES, ids=str)
@pytest.mark.parametrize("member", list(FUNCS))
def test_underflow_against_a_masked_entry(member: str, inputs: Any, dtype: str) -> None:
    """A probability that underflows to 0 (a finite log-probability) against -inf on the other
    side: the value is +inf, and the generic kernel's derivative there is -1 w.r.t. the -inf
    side (its ``where(d == inf, d, 0)``) and NaN w.r.t. its own; the rule's too."""
    low = -1000.0 if dtype == "float64" else -300.0
    t = np.array([[0.0, low, 1.0, 2.0, -1.0], [0.5, 0.0, -INF, 1.0, 0.0],
                  [1.0, low, 0.0, -INF, 2.0]], dtype=dtype)
    p = np.array([[0.5, -INF, 1.0, 0.0, -1.0], [1.0, 0.0, -INF, 0.5, 0.0],
                  [0.0, -INF, 2.0, -INF, 1.0]], dtype=dtype)
    if member == "reverse_kl":
        t, p = p, t  # the underflow on the side whose probabilities weigh the terms
    for temperature in ((1.0, 2.0) if "logits" in _pair(inputs) else (1.0,)):
        fn = _fn(member, **_kwargs(member, inputs, temperature, 0.3))
        assert _uses_rule(fn, t, p)
        got = _value_and_grads(fn, t, p)
        with kldiv.use_generic():
            want = _value_and_grads(fn, t, p, jit=False)
        for i, name in enumerate(("value", "d/dy_true", "d/dy_pred")):
            _compare(got[i], want[i], rtol=1e-6 if dtype == "float32" else 1e-12, atol=1e-6,
                     what=f"{member} {inputs} {dtype} T={temperature}: {name}")
        if member != "js":
            assert np.isinf(got[0][[0, 2]]).all()


@pytest.mark.parametrize("inputs", ["logits", "log_probs"])
@pytest.mark.parametrize("member", list(FUNCS))
def test_forward_mode_and_second_order(member: str, inputs: Any) -> None:
    """jacfwd, jacrev, hessian, a gradient of a gradient: the generic kernel's, finite at
    masked entries (the rows here have finite divergences)."""
    rng = np.random.default_rng(4)
    t, p = rng.normal(0.0, 1.5, (2, 5)), rng.normal(0.0, 1.5, (2, 5))
    t[:, 1] = p[:, 1] = -INF  # the same positions
    if member == "reverse_kl":
        p[1, 3] = -INF  # the other side masked alone: still finite
    else:
        t[1, 3] = -INF
    if inputs == "log_probs":
        t, p = _log64(t, "logits", 1.0), _log64(p, "logits", 1.0)
    fn = _fn(member, **_kwargs(member, inputs, 2.0, 0.3))
    a, b = jnp.asarray(t), jnp.asarray(p)
    assert _uses_rule(fn, a, b)

    def weighted(x: Any, y: Any) -> Any:
        return jnp.sum(fn(x, y) * jnp.array([1.0, 2.0]))

    def derivatives() -> list[Any]:
        h = jax.hessian(weighted, argnums=(0, 1))(a, b)
        jf = jax.jacfwd(fn, argnums=(0, 1))(a, b)
        jr = jax.jacrev(fn, argnums=(0, 1))(a, b)
        gg = jax.grad(lambda x: jnp.sum(jax.grad(weighted, argnums=1)(x, b) ** 2))(a)
        tangent = jax.jvp(fn, (a, b), (jnp.ones_like(a), jnp.full_like(b, 0.5)))[1]
        return [h[0][0], h[0][1], h[1][0], h[1][1], *jf, *jr, gg, tangent]

    got = derivatives()
    with kldiv.use_generic():
        want = derivatives()
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        assert np.isfinite(np.asarray(x)).all(), (member, inputs, i)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-8, atol=1e-11,
                                   err_msg=f"{member} {inputs} #{i}")
    # the forward-mode Jacobian against the oracle's gradient (row i depends on row i only)
    _, o_t, o_p = oracle(member, t, p, inputs, 2.0, 0.3)
    np.testing.assert_allclose(np.einsum("iij->ij", np.asarray(got[4])), o_t, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(np.einsum("iij->ij", np.asarray(got[5])), o_p, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("member", list(FUNCS))
def test_vmap_and_jit(member: str) -> None:
    rng = np.random.default_rng(5)
    t, p = _case(rng, (4, 3, 8), "logits", "same")
    kw = _kwargs(member, "logits", 0.5)
    fn = _fn(member, **kw)
    a, b = jnp.asarray(t), jnp.asarray(p)
    want = oracle(member, t, p, "logits", 0.5)[0]
    vm = jax.jit(jax.vmap(fn))(a, b)
    _compare(vm, want, rtol=1e-9, atol=1e-12, what="vmap")
    vm_inner = jax.vmap(jax.vmap(fn, in_axes=(None, 0)), in_axes=(0, None))(a[:, 0], b[0])
    _compare(vm_inner, oracle(member, t[:, None, 0], p[None, 0], "logits", 0.5)[0],
             rtol=1e-9, atol=1e-12, what="vmap of vmap")
    grad = jax.jit(jax.grad(lambda x, y: jnp.sum(jax.vmap(fn)(x, y)), argnums=(0, 1)))(a, b)
    with kldiv.use_generic():  # op by op
        ref = jax.grad(lambda x, y: jnp.sum(jax.vmap(fn)(x, y)), argnums=(0, 1))(a, b)
    for g, r in zip(grad, ref, strict=True):
        _compare(g, r, rtol=1e-9, atol=1e-12, what="grad of vmap")
    per_example = jax.vmap(jax.grad(lambda x, y: fn(x, y).sum(), argnums=1))(a, b)
    _compare(per_example, grad[1], rtol=1e-12, atol=1e-14, what="vmap of grad")


@pytest.mark.parametrize("shapes", [((1, 7), (4, 7)), ((7,), (3, 2, 7)), ((4, 1), (4, 7)),
                                    ((2, 1, 7), (3, 1))], ids=str)
@pytest.mark.parametrize("member", list(FUNCS))
def test_broadcast_inputs(member: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    """y_true broadcast against y_pred (a class axis of 1 only for log-probabilities): values
    and gradients, the gradient summed over the broadcast axes."""
    rng = np.random.default_rng(6)
    inputs: Any = "logits" if shapes[0][-1] == shapes[1][-1] else "log_probs"
    if shapes[1][-1] == 1:
        inputs = ("logits", "log_probs")
    t, p = rng.normal(0.0, 1.0, shapes[0]) - 2.0, rng.normal(0.0, 1.0, shapes[1]) - 2.0
    fn = _fn(member, **_kwargs(member, inputs, 1.5))
    assert _uses_rule(fn, t, p)
    got = _value_and_grads(fn, t, p)
    with kldiv.use_generic():
        want = _value_and_grads(fn, t, p, jit=False)
    for g, w_ in zip(got, want, strict=True):
        _compare(g, w_, rtol=1e-10, atol=1e-12, what=f"{member} {shapes}")
    _compare(got[0], oracle(member, t, p, inputs, 1.5)[0], rtol=1e-10, atol=1e-12,
             what="oracle")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("member", list(FUNCS))
def test_dtypes(member: str, dtype: str) -> None:
    """float32/float64 kept; bfloat16/float16 computed in float32 and returned (the value and
    the gradient) in the input dtype."""
    rng = np.random.default_rng(7)
    t, p = _case(rng, (6, 16), "logits", "same")
    jdt = jnp.dtype(dtype)
    a, b = jnp.asarray(t).astype(jdt), jnp.asarray(p).astype(jdt)
    fn = _fn(member, **_kwargs(member, "logits", 2.0))
    assert _uses_rule(fn, a, b)
    value = jax.jit(fn)(a, b)
    g_t, g_p = jax.jit(jax.grad(lambda x, y: fn(x, y).sum(), argnums=(0, 1)))(a, b)
    assert value.dtype == g_t.dtype == g_p.dtype == jdt
    # the reference: the inputs as rounded to the dtype, computed in float32 or wider
    wide = "float64" if dtype == "float64" else "float32"
    ta, pa = np.asarray(a.astype(wide)), np.asarray(b.astype(wide))
    want_v, want_t, want_p = oracle(member, ta, pa, "logits", 2.0)
    eps = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 8e-3, "float16": 1e-3}[dtype]
    _compare(np.asarray(value.astype(wide)), want_v, rtol=eps, atol=eps, what="value")
    _compare(np.asarray(g_t.astype(wide)), want_t, rtol=eps, atol=eps, what="d/dy_true")
    _compare(np.asarray(g_p.astype(wide)), want_p, rtol=eps, atol=eps, what="d/dy_pred")
    with kldiv.use_generic():
        ref = jax.grad(lambda x, y: fn(x, y).sum(), argnums=1)(a, b)
    assert ref.dtype == jdt
    np.testing.assert_allclose(np.asarray(g_p.astype(wide)), np.asarray(ref.astype(wide)),
                               rtol=eps, atol=eps)


@pytest.mark.parametrize("member", list(FUNCS))
def test_value_is_the_generic_kernels_bit_for_bit(member: str) -> None:
    """Without differentiation the rule computes the generic kernel's own operations."""
    rng = np.random.default_rng(8)
    for inputs in RULE_SPACES:
        for dtype in ("float32", "float64"):
            t, p = (x.astype(dtype) for x in _case(rng, (5, 33), inputs, "both"))
            kw = _kwargs(member, inputs, 0.7)
            fast = np.asarray(FUNCS[member](jnp.asarray(t), jnp.asarray(p), **kw))
            with kldiv.use_generic():
                generic = np.asarray(jax.jit(_fn(member, **kw))(jnp.asarray(t), jnp.asarray(p)))
            np.testing.assert_array_equal(fast, generic, err_msg=f"{inputs} {dtype}")
