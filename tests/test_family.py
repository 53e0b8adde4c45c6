"""The divergence family: forward KL from any input space, reverse KL, generalized JSD.

References: a float64 oracle written from the definitions (row by row, in Python floats,
JSD in linear space: independent of the kernels' log-space formulas), ``kl_divergence``
itself for ``"probs"`` (bit for bit), and independent implementations: ``F.kl_div`` (both
``log_target``), optax, torchmetrics, TRL's ``generalized_jsd_loss`` (its formula, rewritten
here from its source) and Liger-Kernel's chunked JSD loss (pure torch, runs on CPU). Every
fast path is checked against the generic kernel on the same inputs, and each check asserts
that the fast path really ran.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend
from kldiv import _dispatch, _family, _switch

F_KL = kldiv.kl_divergence  # the public names (kldiv._family defines them)
F_RKL = kldiv.reverse_kl_divergence
F_JS = kldiv.js_divergence
MEMBERS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "kl": (F_KL, {}),
    "reverse_kl": (F_RKL, {}),
    "js": (F_JS, {"beta": 0.3}),
}
SPACES: list[Any] = ["probs", "log_probs", "logits", ("probs", "logits"),
                     ("log_probs", "logits"), ("logits", "log_probs")]
SHAPES = [(7,), (3, 9), (2, 3, 8), (2, 2, 3, 5)]
INF = math.inf


# ------------------------------------------------------------------------------------ oracle
def _spaces(inputs: Any) -> tuple[str, str]:
    return (inputs, inputs) if isinstance(inputs, str) else (inputs[0], inputs[1])


def _log64(x: Any, space: str, temperature: float) -> np.ndarray:
    """One input in log space, float64, from the definitions (row by row for logits)."""
    x = np.array(x, dtype=np.float64)
    if space == "probs":
        return np.log(np.clip(x, 1e-7, 1.0))
    if space == "log_probs":
        return x
    z = x / temperature
    out = np.full(z.shape, -INF)
    for idx in np.ndindex(z.shape[:-1]):
        row = z[idx]
        live = row > -INF
        if live.any():
            m = float(row[live].max())
            lse = m + math.log(math.fsum(math.exp(v - m) for v in row[live]))
            out[idx][live] = row[live] - lse
    return out


def _kl_rows(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    out = np.zeros(la.shape[:-1])
    for idx in np.ndindex(la.shape[:-1]):
        terms = []
        for a, b in zip(la[idx].tolist(), lb[idx].tolist(), strict=True):
            if a == -INF:
                continue  # 0 log 0 = 0
            terms.append(INF if b == -INF else math.exp(a) * (a - b))
        out[idx] = math.fsum(terms) if INF not in terms else INF
    return out


def _js_rows(lp: np.ndarray, lq: np.ndarray, beta: float) -> np.ndarray:
    """Linear space: ``beta sum p log(p/m) + (1-beta) sum q log(q/m)``, m = beta p + (1-beta) q."""
    out = np.zeros(lp.shape[:-1])
    for idx in np.ndindex(lp.shape[:-1]):
        terms = []
        for a, b in zip(lp[idx].tolist(), lq[idx].tolist(), strict=True):
            p, q = math.exp(a), math.exp(b)
            m = beta * p + (1 - beta) * q
            if p > 0:
                terms.append(beta * p * math.log(p / m))
            if q > 0:
                terms.append((1 - beta) * q * math.log(q / m))
        out[idx] = math.fsum(terms)
    return out


def oracle(member: str, y_true: Any, y_pred: Any, inputs: Any = "probs",
           temperature: float = 1.0, beta: float = 0.5) -> np.ndarray:
    s_true, s_pred = _spaces(inputs)
    lp = _log64(y_true, s_true, temperature)
    lq = _log64(y_pred, s_pred, temperature)
    lp, lq = np.broadcast_arrays(lp, lq)
    if member == "kl":
        return _kl_rows(lp, lq)
    if member == "reverse_kl":
        return _kl_rows(lq, lp)
    return _js_rows(lp, lq, beta)


# ------------------------------------------------------------------------------------ inputs
def _log_softmax64(x: np.ndarray) -> np.ndarray:
    return _log64(x, "logits", 1.0)


def _inputs(rng: np.random.Generator, shape: tuple[int, ...], inputs: Any, *,
            masked: bool = True, one_sided: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random y_true, y_pred in their spaces (float64). ``masked``: a shared masked vocabulary
    (-inf logits, -inf log-probs, zero probs) and, in larger inputs, a row masked entirely on
    both sides; ``one_sided``: also entries where only y_true is 0 and rows empty on one side
    only (where a KL is +inf)."""
    t = rng.normal(0.0, 2.5, shape)
    p = rng.normal(0.0, 2.5, shape)
    if masked and shape[-1] > 3:
        cols = rng.choice(shape[-1], size=2, replace=False)
        t[..., cols] = -INF
        p[..., cols] = -INF
        rows = len(shape) > 1 and t.size > 30
        if one_sided:
            t.reshape(-1)[::5] = -INF
            if rows:
                t.reshape(-1, shape[-1])[1] = -INF  # an empty teacher row
                p.reshape(-1, shape[-1])[-1] = -INF  # an empty student row
        if rows:
            t.reshape(-1, shape[-1])[0] = p.reshape(-1, shape[-1])[0] = -INF  # both empty
    out = []
    for x, space in zip((t, p), _spaces(inputs), strict=True):
        if space == "logits":
            out.append(x)
        elif space == "log_probs":
            out.append(_log_softmax64(x))
        else:
            probs = np.exp(_log_softmax64(x))
            probs.reshape(-1)[::7] *= 1.3  # some values above 1 (clipped)
            out.append(probs)
    return out[0], out[1]


def _maskable(inputs: Any) -> bool:
    """Shared masks give finite divergences unless clipped probabilities (>= 1e-7) meet a
    probability of exactly 0 on the other side (see test_clipped_probs_against_masked_logits)."""
    spaces = _spaces(inputs)
    return "probs" not in spaces or spaces == ("probs", "probs")


def _call(member: str, y_true: Any, y_pred: Any, **kw: Any) -> Any:
    fn, params = MEMBERS[member]
    return fn(y_true, y_pred, **{**params, **kw})


def _temperature(inputs: Any) -> float:
    return 1.7 if "logits" in _spaces(inputs) else 1.0


def _close(got: Any, want: np.ndarray, dtype: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    np.testing.assert_array_equal(got[~finite], want[~finite])  # +inf where it must be
    if dtype == "float64":
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-9, atol=1e-12)
    else:
        np.testing.assert_allclose(got[finite], want[finite], rtol=2e-5, atol=5e-6)


# ------------------------------------------------------------------------ values vs. oracle
@pytest.mark.parametrize("inputs", SPACES, ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_matches_float64_oracle(backend: ArrayBackend, member: str, inputs: Any) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{member}{inputs}".encode()))  # stable per case
    for shape in SHAPES:
        for dtype in ("float32", "float64"):
            if dtype not in backend.float_dtypes:
                continue
            t, p = _inputs(rng, shape, inputs)
            t, p = t.astype(dtype), p.astype(dtype)  # the oracle sees the rounded inputs
            T = _temperature(inputs)
            got = _call(member, backend.asarray(t, dtype), backend.asarray(p, dtype),
                        inputs=inputs, temperature=T)
            assert backend.is_native(got)
            assert str(got.dtype).endswith(dtype)
            _close(backend.to_numpy(got), oracle(member, t, p, inputs, T, 0.3), dtype)


@pytest.mark.parametrize("beta", [1e-6, 0.1, 0.5, 0.9, 1 - 1e-6])
def test_js_beta_range_and_bound(beta: float) -> None:
    rng = np.random.default_rng(3)
    t, p = _inputs(rng, (4, 11), "logits", one_sided=True)
    got = F_JS(t, p, inputs="logits", beta=beta)
    _close(got, oracle("js", t, p, "logits", beta=beta), "float64")
    bound = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
    assert np.all(got >= -1e-12) and np.all(got <= bound + 1e-12)


def test_js_alias_and_symmetry() -> None:
    assert kldiv.jensen_shannon_divergence is F_JS is _family.js_divergence
    assert F_KL is _family.kl_divergence is _family.kl_divergence_family
    rng = np.random.default_rng(4)
    t, p = _inputs(rng, (5, 6), "log_probs")
    np.testing.assert_allclose(F_JS(t, p, inputs="log_probs"), F_JS(p, t, inputs="log_probs"),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(F_JS(t, p, inputs="log_probs", beta=0.2),
                               F_JS(p, t, inputs="log_probs", beta=0.8), rtol=1e-12, atol=1e-15)


def test_zero_measure_rows() -> None:
    """A row of all -inf logits is the zero measure: never NaN."""
    empty = np.full((1, 4), -INF)
    dist = np.array([[0.5, -1.0, 2.0, -INF]])
    assert F_KL(empty, empty, inputs="logits")[0] == 0.0
    assert F_KL(empty, dist, inputs="logits")[0] == 0.0  # P holds nothing
    assert F_KL(dist, empty, inputs="logits")[0] == INF  # Q is 0 where P is not
    assert F_RKL(empty, dist, inputs="logits")[0] == INF
    assert F_JS(empty, empty, inputs="logits")[0] == 0.0
    # only Q's term remains: (1 - beta) * sum q log(q / ((1 - beta) q))
    np.testing.assert_allclose(F_JS(empty, dist, inputs="logits", beta=0.3)[0],
                               -0.7 * math.log(0.7), rtol=1e-12)


def test_no_classes_gives_zeros() -> None:
    for member in MEMBERS:
        for inputs in ("logits", "log_probs"):
            out = _call(member, np.zeros((3, 0)), np.zeros((3, 0)), inputs=inputs)
            np.testing.assert_array_equal(out, np.zeros(3))


@pytest.mark.parametrize("inputs", ["probs", "log_probs", "logits", ("probs", "logits")], ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_numpy_return_types_are_kl_divergence_s(member: str, inputs: Any) -> None:
    """One rule on NumPy, as for ``kl_divergence``: a 0-d result (1-d inputs) is a NumPy scalar
    of the result dtype, on the fast path and the generic one; a larger one an ndarray."""
    for dtype in (np.float32, np.float64):
        t = np.log(np.array([0.4, 0.6], dtype)) if inputs != "probs" else np.array([0.4, 0.6], dtype)
        p = np.array([0.5, 0.5], dtype)
        for generic in (False, True):
            with kldiv.use_generic(generic):
                one = _call(member, t, p, inputs=inputs)
                rows = _call(member, np.stack([t, t]), np.stack([p, p]), inputs=inputs)
            assert type(one) is np.dtype(dtype).type, (type(one), generic)
            assert type(rows) is np.ndarray and rows.dtype == dtype


def test_inf_against_underflowed_mass() -> None:
    """P > 0 (but exp underflows) where Q = 0: +inf, not 0 * inf = NaN."""
    lp = np.array([0.0, -2000.0, -INF])
    lq = np.array([0.0, -INF, -INF])
    assert F_KL(lp, lq, inputs="log_probs") == INF
    with kldiv.use_generic():
        assert F_KL(lp, lq, inputs="log_probs") == INF


# ------------------------------------------------------------------------ probs: Keras' KL
def test_probs_forward_kl_is_kl_divergence_bit_for_bit(backend: ArrayBackend) -> None:
    rng = np.random.default_rng(5)
    t = rng.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    p = rng.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    t[0, 0] = p[1, 1] = 0.0
    a, b = backend.asarray(t), backend.asarray(p)
    np.testing.assert_array_equal(backend.to_numpy(F_KL(a, b)),
                                  backend.to_numpy(kldiv.kl_divergence(a, b)))


def test_probs_reverse_kl_is_swapped_kl_divergence(backend: ArrayBackend) -> None:
    rng = np.random.default_rng(6)
    t = rng.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    p = rng.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    a, b = backend.asarray(t), backend.asarray(p)
    got = F_RKL(a, b)
    assert backend.is_native(got)
    np.testing.assert_array_equal(backend.to_numpy(got), backend.to_numpy(kldiv.kl_divergence(b, a)))
    _close(backend.to_numpy(got), oracle("reverse_kl", t, p), "float32")


def test_clipped_probs_against_masked_logits() -> None:
    """``"probs"`` are Keras' clipped probabilities (>= 1e-7): a 0 there is 1e-7, so against a
    masked (-inf) student logit the forward KL is +inf. Given as log-probabilities the 0 is
    exactly 0 (``log 0 = -inf``) and contributes nothing."""
    probs = np.array([0.6, 0.4, 0.0])
    logits = np.array([1.0, 0.0, -INF])
    assert F_KL(probs, logits, inputs=("probs", "logits")) == INF
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs)
    got = F_KL(log_probs, logits, inputs=("log_probs", "logits"))
    _close(got, oracle("kl", log_probs, logits, ("log_probs", "logits")), "float64")
    assert np.isfinite(F_JS(probs, logits, inputs=("probs", "logits")))  # M > 0 wherever P is


# ------------------------------------------------------------------ half precision, mixing
@pytest.mark.parametrize("member", list(MEMBERS))
def test_half_precision_computed_in_float32(backend: ArrayBackend, member: str) -> None:
    halves = [d for d in ("float16", "bfloat16") if d in backend.float_dtypes]
    if not halves:
        pytest.skip(f"{backend.name} has no float16/bfloat16 here")
    rng = np.random.default_rng(7)
    t, p = _inputs(rng, (4, 12), "logits", one_sided=False)
    t, p = t * 0.2, p * 0.2
    for half in halves:
        a, b = backend.asarray(t, "float32"), backend.asarray(p, "float32")
        a_h, b_h = (backend.module.astype(x, backend.dtype(half)) if hasattr(backend.module, "astype")
                    else x.to(backend.dtype(half)) for x in (a, b))
        got = _call(member, a_h, b_h, inputs="logits", temperature=2.0)
        assert got.dtype == backend.dtype(half)
        # the reference: the same half-precision values, computed in float32, rounded once
        a32, b32 = (backend.asarray(backend.to_numpy(x).astype(np.float32), "float32") for x in (a_h, b_h))
        ref = _call(member, a32, b32, inputs="logits", temperature=2.0)
        ref_h = backend.to_numpy(ref.to(backend.dtype(half)) if hasattr(ref, "to")
                                 else backend.module.astype(ref, backend.dtype(half)))
        np.testing.assert_array_equal(backend.to_numpy(got), ref_h)


def test_y_true_from_another_library() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    t, p = _inputs(rng, (3, 6), "logits")
    got = F_JS(t, torch.tensor(p), inputs="logits")
    assert isinstance(got, torch.Tensor)
    _close(got.numpy(), oracle("js", t, p, "logits", beta=0.5), "float64")


def test_broadcast_rows_and_logits_class_axis() -> None:
    rng = np.random.default_rng(9)
    t, p = _inputs(rng, (4, 6), "logits", masked=False)
    got = F_KL(t[0], p, inputs="logits")  # one teacher row against four student rows
    _close(got, oracle("kl", np.broadcast_to(t[0], p.shape), p, "logits"), "float64")
    with pytest.raises(ValueError, match="class"):
        F_KL(t[:, :1], p, inputs="logits")
    with pytest.raises(ValueError, match="class"):
        F_JS(t, p[:, :1], inputs=("log_probs", "logits"))


def test_dask_stays_lazy() -> None:
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(10)
    t, p = _inputs(rng, (6, 8), "logits")
    out = F_JS(da.from_array(t, chunks=(3, 8)), da.from_array(p, chunks=(3, 8)), inputs="logits")
    assert isinstance(out, da.Array)
    _close(out.compute(), oracle("js", t, p, "logits"), "float64")


# ------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("beta", [0, 0.0, 1, 1.0])
def test_beta_endpoints_point_to_the_kl_functions(beta: float) -> None:
    target = "kl_divergence" if beta == 0 else "reverse_kl_divergence"
    with pytest.raises(ValueError, match=target):
        F_JS([0.5, 0.5], [0.3, 0.7], beta=beta)


@pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan, math.inf])
def test_beta_outside_open_interval(beta: float) -> None:
    with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
        F_JS([0.5, 0.5], [0.3, 0.7], beta=beta)


@pytest.mark.parametrize("beta", [True, "0.5", None, [0.5]])
def test_beta_type(beta: Any) -> None:
    with pytest.raises(TypeError, match="beta"):
        F_JS([0.5, 0.5], [0.3, 0.7], beta=beta)


@pytest.mark.parametrize("member", list(MEMBERS))
@pytest.mark.parametrize("temperature", [0, -1.0, math.nan, math.inf])
def test_temperature_must_be_positive(member: str, temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        _call(member, [1.0, 2.0], [0.0, 1.0], inputs="logits", temperature=temperature)


@pytest.mark.parametrize("member", list(MEMBERS))
@pytest.mark.parametrize("inputs", ["probs", "log_probs", ("probs", "log_probs")], ids=str)
def test_temperature_only_with_logits(member: str, inputs: Any) -> None:
    with pytest.raises(ValueError, match="only applies to logits"):
        _call(member, [0.5, 0.5], [0.3, 0.7], inputs=inputs, temperature=2.0)
    _call(member, [0.5, 0.5], [0.3, 0.7], inputs=inputs, temperature=1.0)  # the default: fine


def test_remembered_options_are_still_validated() -> None:
    """``resolve`` remembers valid options by value and type: ``True`` after ``1`` (equal,
    same hash) is still a ``TypeError``; an invalid combination is never remembered."""
    t, p = [1.0, 2.0], [0.0, 1.0]
    for _ in range(2):
        F_KL(t, p, inputs="logits", temperature=1)
        with pytest.raises(TypeError, match="temperature"):
            F_KL(t, p, inputs="logits", temperature=True)
        F_JS(t, p, inputs="logits", beta=0.5)
        with pytest.raises(TypeError, match="beta"):
            F_JS(t, p, inputs="logits", beta=np.array(0.5))
        with pytest.raises(ValueError, match="only applies to logits"):
            F_RKL([0.5, 0.5], [0.3, 0.7], temperature=2.0)
    loss = kldiv.JensenShannonDivergence(inputs="logits")
    loss.beta = 1.0  # an attribute set after construction is checked at the call
    with pytest.raises(ValueError, match="reverse_kl_divergence"):
        loss(np.array([t]), np.array([p]))


@pytest.mark.parametrize("temperature", [True, "2", None])
def test_temperature_type(temperature: Any) -> None:
    with pytest.raises(TypeError, match="temperature"):
        F_KL([1.0, 2.0], [0.0, 1.0], inputs="logits", temperature=temperature)


@pytest.mark.parametrize("inputs", ["prob", "LOGITS", ("probs", "logit"), ("probs", 3)], ids=str)
def test_unknown_input_space(inputs: Any) -> None:
    with pytest.raises(ValueError, match="input space"):
        F_RKL([0.5, 0.5], [0.3, 0.7], inputs=inputs)


@pytest.mark.parametrize("inputs", [None, 3, ("probs",), ("probs", "logits", "logits")], ids=str)
def test_inputs_type(inputs: Any) -> None:
    with pytest.raises(TypeError, match="inputs must be"):
        F_KL([0.5, 0.5], [0.3, 0.7], inputs=inputs)


def test_input_errors_are_kl_divergence_s() -> None:
    with pytest.raises(ValueError, match="broadcast"):
        F_JS(np.ones((2, 3)), np.ones((4, 3)), inputs="logits")
    with pytest.raises(ValueError, match="class axis"):
        F_RKL(0.5, 0.3, inputs="log_probs")
    with pytest.raises(TypeError):
        F_JS(np.array(["a", "b"]), np.ones(2), inputs="logits")
    with pytest.raises(TypeError):
        F_KL(None, np.ones(2), inputs="logits")


# ------------------------------------------------------------------ fast paths vs. generic
def _spy(monkeypatch: pytest.MonkeyPatch, library: str, op: str) -> list[int]:
    """Record the fast path's calls (and make sure there is one)."""
    real = _dispatch.fast_path(library, op)
    assert real is not None, f"no fast path registered for ({library}, {op})"
    calls: list[int] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        calls.append(out is not NotImplemented)
        return out

    monkeypatch.setitem(_switch._LOADED, (library, op), spy)
    return calls


def test_use_generic_and_env_switch_fast_paths_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _dispatch.fast_path("numpy", "js") is not None
    with kldiv.use_generic():
        assert _dispatch.fast_path("numpy", "js") is None
    monkeypatch.setenv("KLDIV_GENERIC", "1")
    assert _dispatch.fast_path("numpy", "kl") is None


@pytest.mark.parametrize("inputs", SPACES, ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_numpy_fast_path_matches_generic(monkeypatch: pytest.MonkeyPatch, member: str,
                                         inputs: Any) -> None:
    rng = np.random.default_rng(11)
    T = _temperature(inputs)
    monkeypatch.setattr("kldiv.backends.numpy_family.BLOCK_ELEMENTS", 64)  # several blocks
    for shape, dtype in (((37, 9), np.float64), ((5, 4, 9), np.float32), ((9,), np.float64)):
        t, p = (x.astype(dtype) for x in _inputs(rng, shape, inputs))
        with kldiv.use_generic():
            want = _call(member, t, p, inputs=inputs, temperature=T)
        calls = _spy(monkeypatch, "numpy", member)
        got = _call(member, t, p, inputs=inputs, temperature=T)
        if _spaces(inputs) != ("probs", "probs") or member == "js":
            assert calls == [True]
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-12,
                                   atol=1e-7 if dtype == np.float32 else 1e-14)
        monkeypatch.undo()
        monkeypatch.setattr("kldiv.backends.numpy_family.BLOCK_ELEMENTS", 64)


@pytest.mark.parametrize("member", list(MEMBERS))
def test_numpy_fast_path_memory_is_bounded(member: str) -> None:
    """A few blocks of scratch, whatever the input size; the generic kernel's full-size
    temporaries (about nine inputs' worth) show that the measurement would see them."""
    import tracemalloc

    rng = np.random.default_rng(24)
    t, p = rng.normal(size=(2000, 1000)), rng.normal(size=(2000, 1000))  # 15 MiB each
    _call(member, t[:2], p[:2], inputs="logits", temperature=2.0)  # imports, caches
    peaks = []
    for generic in (False, True):
        tracemalloc.start()
        try:
            with kldiv.use_generic(generic):
                _call(member, t, p, inputs="logits", temperature=2.0)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[0] < 0.25 * t.nbytes, peaks
    assert peaks[1] > 2 * t.nbytes, peaks


def test_torch_fused_saves_only_the_inputs() -> None:
    """Autograd keeps the two inputs (no copy) and per-row values: no full-size residuals."""
    torch = pytest.importorskip("torch")
    a = torch.randn(300, 500, requires_grad=True)
    b = torch.randn(300, 500)
    inputs = {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
    for member in MEMBERS:
        for generic in (False, True):
            saved: list[Any] = []
            hooks = torch.autograd.graph.saved_tensors_hooks(
                lambda x, saved=saved: saved.append(x) or x, lambda x: x)
            with hooks, kldiv.use_generic(generic):
                _call(member, b, a, inputs="logits", temperature=2.0)
            big = [x for x in saved if x.numel() >= a.numel()
                   and x.untyped_storage().data_ptr() not in inputs]
            if generic:
                assert len(big) >= 3  # the eager formula keeps its temporaries
            else:
                assert big == []
                assert len(saved) == 2


def _torch_run(torch: Any, member: str, t: np.ndarray, p: np.ndarray, inputs: Any,
               generic: bool, weights: np.ndarray) -> tuple[Any, ...]:
    a = torch.tensor(t, requires_grad=True)
    b = torch.tensor(p, requires_grad=True)
    with kldiv.use_generic(generic):
        out = _call(member, a, b, inputs=inputs, temperature=_temperature(inputs))
    w = torch.tensor(weights, dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach().numpy(), a.grad.numpy(), b.grad.numpy(), out


@pytest.mark.parametrize("inputs", SPACES, ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_torch_fast_path_matches_generic(monkeypatch: pytest.MonkeyPatch, member: str,
                                         inputs: Any) -> None:
    torch = pytest.importorskip("torch")
    from kldiv.backends import torch_family

    monkeypatch.setitem(torch_family.BLOCK_ELEMENTS, "cpu", 40)  # several blocks of rows
    rng = np.random.default_rng(12)
    for shape, dtype in (((13, 9), np.float64), ((2, 5, 9), np.float32)):
        t, p = (x.astype(dtype) for x in _inputs(rng, shape, inputs, one_sided=False,
                                                 masked=_maskable(inputs)))
        weights = rng.uniform(0.5, 2.0, shape[:-1]).astype(dtype)
        want = _torch_run(torch, member, t, p, inputs, True, weights)
        calls = _spy(monkeypatch, "torch", member)
        got = _torch_run(torch, member, t, p, inputs, False, weights)
        keras = _spaces(inputs) == ("probs", "probs") and member != "js"
        if not keras:
            assert calls == [True]
            assert "_Fused" in str(got[3].grad_fn.next_functions)
        tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == np.float64 else {"rtol": 2e-5, "atol": 2e-6}
        for g, w in zip(got[:3], want[:3], strict=True):
            assert np.isfinite(g).all()
            np.testing.assert_allclose(g, w, **tol)
        monkeypatch.undo()
        monkeypatch.setitem(torch_family.BLOCK_ELEMENTS, "cpu", 40)


@pytest.mark.parametrize("inputs", ["logits", "log_probs", ("log_probs", "logits")], ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_torch_fused_gradcheck(member: str, inputs: Any) -> None:
    """Finite differences (float64) check the closed-form backward, and the double backward."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    t, p = _inputs(rng, (4, 6), inputs, one_sided=False)
    a = torch.tensor(t, requires_grad=True)
    b = torch.tensor(p, requires_grad=True)
    T = _temperature(inputs)

    def fn(x: Any, y: Any) -> Any:
        return _call(member, x, y, inputs=inputs, temperature=T)

    assert "_Fused" in str(fn(a, b).grad_fn.next_functions)
    assert torch.autograd.gradcheck(fn, (a, b))
    assert torch.autograd.gradgradcheck(fn, (a, b))


def test_torch_fast_path_teacher_detached_and_broadcast() -> None:
    """Only the student needs a gradient; a (C,) teacher row broadcasts to all rows."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    t, p = _inputs(rng, (6, 10), "logits", one_sided=False)
    p = p[1:]  # row 0 is empty on both sides: not against another teacher row
    for member in MEMBERS:
        s = torch.tensor(p, requires_grad=True)
        teacher = torch.tensor(t[2])
        _call(member, teacher, s, inputs="logits", temperature=3.0).sum().backward()
        s2 = torch.tensor(p, requires_grad=True)
        with kldiv.use_generic():
            _call(member, teacher, s2, inputs="logits", temperature=3.0).sum().backward()
        torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)
        # and a teacher that needs a gradient through the broadcast: summed back to (C,)
        tt = torch.tensor(t[2], requires_grad=True)
        _call(member, tt, torch.tensor(p), inputs="logits").sum().backward()
        tt2 = torch.tensor(t[2], requires_grad=True)
        with kldiv.use_generic():
            _call(member, tt2, torch.tensor(p), inputs="logits").sum().backward()
        assert tt.grad.shape == (10,)
        torch.testing.assert_close(tt.grad, tt2.grad, rtol=1e-10, atol=1e-12)


TORCH_AUTOGRAD_SPACES: list[Any] = ["logits", "log_probs", ("probs", "logits")]


@pytest.mark.parametrize("inputs", TORCH_AUTOGRAD_SPACES, ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_torch_fused_gradient_uses_call_time_values_of_foreign_memory(member: str,
                                                                      inputs: Any) -> None:
    """A NumPy teacher (converted without a copy) and ``torch.from_numpy`` leaves, refilled
    before ``backward()`` (a reused loader buffer): the gradient is that of the values at
    call time, as for the Keras KL's fast path (issue 9)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(26)
    t, p = _inputs(rng, (6, 9), inputs, one_sided=False, masked=_maskable(inputs))
    t2, p2 = _inputs(rng, (6, 9), inputs, one_sided=False, masked=_maskable(inputs))
    T = _temperature(inputs)
    # the reference: private copies, never touched
    a_ref = torch.tensor(t, requires_grad=True)
    b_ref = torch.tensor(p, requires_grad=True)
    with kldiv.use_generic():
        _call(member, a_ref, b_ref, inputs=inputs, temperature=T).sum().backward()
        want_b_only = torch.autograd.grad(
            _call(member, torch.tensor(t), b_ref, inputs=inputs, temperature=T).sum(), b_ref)[0]
    # a NumPy teacher against a torch student
    buf, s = t.copy(), torch.tensor(p, requires_grad=True)
    out = _call(member, buf, s, inputs=inputs, temperature=T)
    assert "_Fused" in str(out.grad_fn.next_functions)
    buf[:] = t2                                       # the loader refills its buffer
    out.sum().backward()
    torch.testing.assert_close(s.grad, want_b_only, rtol=1e-10, atol=1e-12)
    # torch.from_numpy leaves on both sides
    tb, pb = t.copy(), p.copy()
    a, b = torch.from_numpy(tb).requires_grad_(), torch.from_numpy(pb).requires_grad_()
    out = _call(member, a, b, inputs=inputs, temperature=T)
    assert "_Fused" in str(out.grad_fn.next_functions)
    tb[:], pb[:] = t2, p2
    out.sum().backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inputs", TORCH_AUTOGRAD_SPACES, ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_torch_forward_mode_ad(member: str, inputs: Any) -> None:
    """``torch.autograd.forward_ad``: the tangent of each row is the directional derivative
    (reverse mode, rows are independent), finite at masked (-inf) entries."""
    torch = pytest.importorskip("torch")
    fwad = torch.autograd.forward_ad
    rng = np.random.default_rng(27)
    t, p = _inputs(rng, (5, 8), inputs, one_sided=False, masked=_maskable(inputs))
    va, vb = rng.normal(size=t.shape), rng.normal(size=p.shape)
    T = _temperature(inputs)
    a = torch.tensor(t, requires_grad=True)
    b = torch.tensor(p, requires_grad=True)
    _call(member, a, b, inputs=inputs, temperature=T).sum().backward()
    want = (a.grad * torch.tensor(va)).sum(-1) + (b.grad * torch.tensor(vb)).sum(-1)
    for student_only in (True, False):
        with fwad.dual_level():
            x = torch.tensor(t) if student_only else fwad.make_dual(torch.tensor(t), torch.tensor(va))
            y = fwad.make_dual(torch.tensor(p), torch.tensor(vb))
            out = _call(member, x, y, inputs=inputs, temperature=T)
            primal, tangent = fwad.unpack_dual(out)
        torch.testing.assert_close(primal, _call(member, torch.tensor(t), torch.tensor(p),
                                                 inputs=inputs, temperature=T))
        expect = (b.grad * torch.tensor(vb)).sum(-1) if student_only else want
        assert torch.isfinite(tangent).all()
        torch.testing.assert_close(tangent, expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("inputs", TORCH_AUTOGRAD_SPACES, ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_torch_batched_backward(member: str, inputs: Any) -> None:
    """``autograd.grad(..., is_grads_batched=True)`` and ``jacobian(vectorize=True)`` through
    the fused Function: each row's gradient, as one-hot backward passes give it."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(28)
    t, p = _inputs(rng, (4, 7), inputs, one_sided=False, masked=_maskable(inputs))
    T = _temperature(inputs)
    a = torch.tensor(t, requires_grad=True)
    b = torch.tensor(p, requires_grad=True)
    out = _call(member, a, b, inputs=inputs, temperature=T)
    assert "_Fused" in str(out.grad_fn.next_functions)
    eye = torch.eye(4, dtype=out.dtype)
    rows = [torch.autograd.grad(out, (a, b), e, retain_graph=True) for e in eye]
    ga, gb = torch.autograd.grad(out, (a, b), eye, retain_graph=True, is_grads_batched=True)
    torch.testing.assert_close(ga, torch.stack([r[0] for r in rows]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, torch.stack([r[1] for r in rows]), rtol=1e-10, atol=1e-12)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    jac = torch.autograd.functional.jacobian(
        lambda y: _call(member, torch.tensor(t), y, inputs=inputs, temperature=T),
        torch.tensor(p), vectorize=True)
    torch.testing.assert_close(jac, torch.stack([r[1] for r in rows]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inputs", SPACES, ids=str)
@pytest.mark.parametrize("member", list(MEMBERS))
def test_jax_fast_path_matches_generic(monkeypatch: pytest.MonkeyPatch, member: str,
                                       inputs: Any) -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    rng = np.random.default_rng(15)
    t, p = _inputs(rng, (5, 9), inputs, one_sided=False, masked=_maskable(inputs))
    T = _temperature(inputs)

    def loss(x: Any, y: Any) -> Any:
        return jnp.sum(_call(member, x, y, inputs=inputs, temperature=T) * jnp.arange(1.0, 6.0))

    with kldiv.use_generic():
        want = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(t), jnp.asarray(p))
    calls = _spy(monkeypatch, "jax", member)
    got = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(t), jnp.asarray(p))
    if _spaces(inputs) != ("probs", "probs") or member == "js":
        assert calls == [True]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for g, w in zip(got[1], want[1], strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------- gradients
def _closed_forms(member: str, t: np.ndarray, p: np.ndarray, T: float,
                  beta: float) -> tuple[np.ndarray, np.ndarray]:
    """d(sum of rows)/d(teacher logits), d/d(student logits): the closed forms, in float64."""
    lp, lq = _log64(t, "logits", T), _log64(p, "logits", T)
    P, Q = np.exp(lp), np.exp(lq)
    with np.errstate(invalid="ignore", divide="ignore"):
        if member == "kl":
            k = oracle("kl", t, p, "logits", T)[..., None]
            return np.where(P > 0, P * ((lp - lq) - k), 0.0) / T, (Q - P) / T
        if member == "reverse_kl":
            r = oracle("reverse_kl", t, p, "logits", T)[..., None]
            return (P - Q) / T, np.where(Q > 0, Q * ((lq - lp) - r), 0.0) / T
        m = beta * P + (1 - beta) * Q
        lm = np.log(m)
        kpm = np.sum(np.where(P > 0, P * (lp - lm), 0.0), -1, keepdims=True)
        kqm = np.sum(np.where(Q > 0, Q * (lq - lm), 0.0), -1, keepdims=True)
        return (beta * np.where(P > 0, P * ((lp - lm) - kpm), 0.0) / T,
                (1 - beta) * np.where(Q > 0, Q * ((lq - lm) - kqm), 0.0) / T)


@pytest.mark.parametrize("generic", [False, True], ids=["fast", "generic"])
@pytest.mark.parametrize("member", list(MEMBERS))
def test_gradients_are_the_closed_forms(diff_backend: ArrayBackend, member: str, generic: bool) -> None:
    """Masked vocabularies (shared -inf) and empty rows: finite gradients, 0 at -inf logits."""
    rng = np.random.default_rng(16)
    t, p = _inputs(rng, (6, 9), "logits", one_sided=False)
    T = 2.5
    want_t, want_s = _closed_forms(member, t, p, T, 0.3)
    name = diff_backend.name.split("-")[0]
    with kldiv.use_generic(generic):
        if name == "torch":
            torch = diff_backend.module
            a = torch.tensor(t, device=diff_backend.device, requires_grad=True)
            b = torch.tensor(p, device=diff_backend.device, requires_grad=True)
            _call(member, a, b, inputs="logits", temperature=T).sum().backward()
            got_t, got_s = a.grad.cpu().numpy(), b.grad.cpu().numpy()
        else:
            import jax

            fn = jax.jit(jax.grad(lambda a, b: _call(member, a, b, inputs="logits",
                                                     temperature=T).sum(), argnums=(0, 1)))
            got_t, got_s = (np.asarray(g) for g in fn(diff_backend.asarray(t), diff_backend.asarray(p)))
    for got, want in ((got_t, want_t), (got_s, want_s)):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        assert np.all(got[np.isneginf(t) & np.isneginf(p)] == 0.0)


@pytest.mark.parametrize("member", list(MEMBERS))
def test_gradients_finite_at_zero_probabilities(diff_backend: ArrayBackend, member: str) -> None:
    """pytorch#89558: zeros in probability inputs give finite gradients (Keras' clip)."""
    t = np.array([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]])
    p = np.array([[0.2, 0.0, 0.8], [0.0, 0.5, 0.5]])
    name = diff_backend.name.split("-")[0]
    for inputs in ("probs", ("probs", "log_probs")):
        pp = p if inputs == "probs" else np.log(np.where(p > 0, p, 1.0))
        if name == "torch":
            torch = diff_backend.module
            a = torch.tensor(t, device=diff_backend.device, requires_grad=True)
            b = torch.tensor(pp, device=diff_backend.device, requires_grad=True)
            _call(member, a, b, inputs=inputs).sum().backward()
            grads = [a.grad.cpu().numpy(), b.grad.cpu().numpy()]
        else:
            import jax

            grads = jax.grad(lambda a, b, i=inputs: _call(member, a, b, inputs=i).sum(),
                             argnums=(0, 1))(diff_backend.asarray(t), diff_backend.asarray(pp))
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_jax_transforms() -> None:
    """optax#1786: -inf logits under jit, grad and vmap; no NaN."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    rng = np.random.default_rng(17)
    t, p = _inputs(rng, (4, 3, 8), "logits", one_sided=False)
    for member in MEMBERS:
        eager = _call(member, t, p, inputs="logits", temperature=2.0)
        jitted = jax.jit(lambda a, b, m=member: _call(m, a, b, inputs="logits", temperature=2.0))
        vmapped = jax.vmap(lambda a, b, m=member: _call(m, a, b, inputs="logits", temperature=2.0))
        np.testing.assert_allclose(jitted(jnp.asarray(t), jnp.asarray(p)), eager, rtol=1e-12)
        np.testing.assert_allclose(vmapped(jnp.asarray(t), jnp.asarray(p)), eager, rtol=1e-12)
        g = jax.grad(lambda b, v=vmapped: jnp.sum(v(jnp.asarray(t), b)))(jnp.asarray(p))
        assert np.isfinite(np.asarray(g)).all()


def test_torch_compile_fullgraph() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(18)
    t, p = _inputs(rng, (5, 8), "logits", one_sided=False)

    def step(a: Any, b: Any) -> Any:
        return (F_JS(a, b, inputs="logits", temperature=2.0, beta=0.4).sum()
                + F_KL(a, b, inputs=("logits", "log_probs")).sum()
                + F_RKL(a, b, inputs="logits").sum())

    b_np = _log_softmax64(p)
    b1 = torch.tensor(b_np, requires_grad=True)
    b2 = torch.tensor(b_np, requires_grad=True)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    got = compiled(torch.tensor(t), b1)
    want = step(torch.tensor(t), b2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.backward()
    want.backward()
    assert torch.isfinite(b1.grad).all()
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-12)


def test_torch_func_transforms() -> None:
    """torch.func.grad / vmap trace the generic formula (the fast path declines under them)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(25)
    t, p = (torch.tensor(x) for x in _inputs(rng, (4, 8), "logits", one_sided=False))
    for member in MEMBERS:
        g = torch.func.grad(lambda y, m=member: _call(m, t, y, inputs="logits",
                                                      temperature=2.0).sum())(p)
        y = p.clone().requires_grad_()
        _call(member, t, y, inputs="logits", temperature=2.0).sum().backward()
        torch.testing.assert_close(g, y.grad, rtol=1e-10, atol=1e-12)
        v = torch.func.vmap(lambda a, b, m=member: _call(m, a, b, inputs="logits"))(t, p)
        torch.testing.assert_close(v, _call(member, t, p, inputs="logits"), rtol=1e-12, atol=1e-12)


def test_tensorflow_values_and_gradient_tape() -> None:
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(19)
    t, p = _inputs(rng, (4, 7), "logits", one_sided=False)
    for member in MEMBERS:
        a, b = tf.Variable(t), tf.Variable(p)
        with tf.GradientTape() as tape:
            out = _call(member, a, b, inputs="logits", temperature=1.5)
            total = tf.reduce_sum(out)
        assert isinstance(out, tf.Tensor)
        _close(out.numpy(), oracle(member, t, p, "logits", 1.5, 0.3), "float64")
        want_t, want_s = _closed_forms(member, t, p, 1.5, 0.3)
        got_t, got_s = tape.gradient(total, [a, b])
        np.testing.assert_allclose(got_t.numpy(), want_t, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got_s.numpy(), want_s, rtol=1e-9, atol=1e-12)
        graph = tf.function(lambda x, y, m=member: _call(m, x, y, inputs="logits", temperature=1.5))
        np.testing.assert_allclose(graph(tf.constant(t), tf.constant(p)).numpy(), out.numpy(), rtol=1e-12)


# ----------------------------------------------------------------- independent libraries
PARITY_SHAPES = [(9,), (4, 11), (2, 3, 10), (2, 2, 2, 7)]


def _parity_cases(spaces: Any, *, masked: bool) -> list[tuple[np.ndarray, np.ndarray, float]]:
    rng = np.random.default_rng(20)
    out = []
    for shape in PARITY_SHAPES:
        for T in (1.0, 0.5, 4.0):
            t, p = _inputs(rng, shape, "logits", masked=masked, one_sided=False)
            out.append((t, p, T))
    return out


@pytest.mark.parametrize("masked", [False, True])
def test_parity_torch_kl_div(masked: bool) -> None:
    """``F.kl_div(input=log q, target)`` is ``KL(target || q)``: both ``log_target`` values."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for t, p, T in _parity_cases("logits", masked=masked):
        lp = F.log_softmax(torch.tensor(t) / T, dim=-1)
        lq = F.log_softmax(torch.tensor(p) / T, dim=-1)
        ours = F_KL(torch.tensor(t), torch.tensor(p), inputs="logits", temperature=T)
        theirs_log = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
        theirs = F.kl_div(lq, lp.exp(), reduction="none", log_target=False).sum(-1)
        # and the reverse: KL(q || p) is F.kl_div(log p, q)
        theirs_rev = F.kl_div(lp, lq.exp(), reduction="none").sum(-1)
        ours_rev = F_RKL(torch.tensor(t), torch.tensor(p), inputs="logits", temperature=T)
        for mine, their in ((ours, theirs_log), (ours, theirs), (ours_rev, theirs_rev)):
            # torch gives NaN for a masked entry (input -inf against target 0: 0 * -inf)
            live = torch.isfinite(their)
            assert masked or bool(live.all())
            assert torch.isfinite(mine).all()
            torch.testing.assert_close(mine[live], their[live], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked", [False, True])
def test_parity_optax(masked: bool) -> None:
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    for t, p, T in _parity_cases("logits", masked=masked):
        lp = jax.nn.log_softmax(jnp.asarray(t) / T, axis=-1)
        lq = jax.nn.log_softmax(jnp.asarray(p) / T, axis=-1)
        ours = F_KL(jnp.asarray(t), jnp.asarray(p), inputs="logits", temperature=T)
        # kl_divergence(log_predictions, targets): targets * (where(t == 0, 0, log t) - log_pred)
        theirs = optax.losses.kl_divergence(lq, jnp.exp(lp))
        live = np.isfinite(np.asarray(theirs))
        np.testing.assert_allclose(np.asarray(ours)[live], np.asarray(theirs)[live], rtol=1e-10, atol=1e-12)
        assert masked or live.all()
        # kl_divergence_with_log_targets: exp(log_t) * (log_t - log_pred); NaN at -inf targets
        theirs_log = np.asarray(optax.losses.kl_divergence_with_log_targets(lq, lp))
        live = np.isfinite(theirs_log)
        assert masked or live.all()
        ours_log = F_KL(lp, lq, inputs="log_probs")
        np.testing.assert_allclose(np.asarray(ours_log)[live], theirs_log[live], rtol=1e-10, atol=1e-12)


def test_parity_torchmetrics() -> None:
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.functional")
    rng = np.random.default_rng(21)
    for n, c in ((3, 5), (8, 17), (1, 2)):
        t, p = _inputs(rng, (n, c), "log_probs", masked=False)
        theirs = tm.kl_divergence(torch.tensor(t), torch.tensor(p), log_prob=True, reduction="none")
        ours = F_KL(torch.tensor(t), torch.tensor(p), inputs="log_probs")
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        metric = pytest.importorskip("torchmetrics").KLDivergence(log_prob=True)
        metric.update(torch.tensor(t), torch.tensor(p))
        torch.testing.assert_close(ours.mean(), metric.compute().to(ours.dtype), rtol=1e-6, atol=1e-7)


def _trl_generalized_jsd(torch: Any, student_logits: Any, teacher_logits: Any, labels: Any = None,
                         beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean") -> Any:
    """TRL's ``GKDTrainer.generalized_jsd_loss``, rewritten from its source (same formula:
    ``M = beta * teacher + (1 - beta) * student``, ``beta * KL(T||M) + (1 - beta) * KL(S||M)``,
    ``beta == 0``: ``KL(T||S)``, ``beta == 1``: ``KL(S||T)``; masked by ``labels != -100``)."""
    F = torch.nn.functional
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        jsd = (beta * F.kl_div(mix, t, reduction="none", log_target=True)
               + (1 - beta) * F.kl_div(mix, s, reduction="none", log_target=True))
    if labels is not None:
        jsd = jsd[labels != -100]
    if reduction == "batchmean":
        return jsd.sum() / ((labels != -100).sum() if labels is not None else jsd.size(0))
    return jsd.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_parity_trl_generalized_jsd(beta: float) -> None:
    """TRL's beta is ours for 0 < beta < 1; its 0 and 1 are kl_divergence / reverse_kl."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(22)
    for shape, T in (((2, 5, 13), 1.0), ((3, 4, 9), 2.0), ((1, 7, 6), 0.7)):
        t, p = _inputs(rng, shape, "logits", masked=False)
        labels = torch.tensor(rng.integers(0, 3, shape[:-1]) - 1)
        labels[labels < 1] = -100
        labels[0, 0] = 5  # at least one token counts
        teacher, student = torch.tensor(t), torch.tensor(p, requires_grad=True)
        theirs_rows = _trl_generalized_jsd(torch, student, teacher, beta=beta, temperature=T,
                                           reduction="none")
        if beta == 0.0:
            ours = F_KL(teacher, student, inputs="logits", temperature=T)
        elif beta == 1.0:
            ours = F_RKL(teacher, student, inputs="logits", temperature=T)
        else:
            ours = F_JS(teacher, student, inputs="logits", temperature=T, beta=beta)
        torch.testing.assert_close(ours, theirs_rows, rtol=1e-10, atol=1e-12)
        # batchmean over unmasked tokens = mean_with_sample_weight with the mask as weight
        mask = (labels != -100).to(ours.dtype)
        theirs = _trl_generalized_jsd(torch, student, teacher, labels, beta=beta, temperature=T)
        mine = (ours * mask).sum() / mask.sum()
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
        (g_theirs,) = torch.autograd.grad(theirs, student)
        (g_ours,) = torch.autograd.grad(mine, student)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_parity_liger_chunked_jsd(beta: float) -> None:
    """Liger-Kernel's chunked (fused linear) JSD loss, on CPU: ``weight_soft_loss=1``, no hard
    loss; it averages the per-token JSD over tokens whose label is not -100."""
    torch = pytest.importorskip("torch")
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    gen = torch.Generator().manual_seed(23)
    n, h, v, T = 10, 6, 17, 2.0
    s_in = torch.randn(n, h, generator=gen)
    s_w = torch.randn(v, h, generator=gen)
    t_in = torch.randn(n, h, generator=gen)
    t_w = torch.randn(v, h, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::3] = -100
    loss = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                           temperature=T, compiled=False)
    theirs = loss(s_in, s_w, t_in, t_w, labels)
    student, teacher = s_in @ s_w.T, t_in @ t_w.T
    if beta == 0.0:
        rows = F_KL(teacher, student, inputs="logits", temperature=T)
    elif beta == 1.0:
        rows = F_RKL(teacher, student, inputs="logits", temperature=T)
    else:
        rows = F_JS(teacher, student, inputs="logits", temperature=T, beta=beta)
    mask = (labels != -100).to(rows.dtype)
    torch.testing.assert_close((rows * mask).sum() / mask.sum(), theirs, rtol=2e-5, atol=1e-6)
