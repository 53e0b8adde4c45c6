"""The divergence family's CuPy kernels (:mod:`kldiv.backends.cupy_family`) on a CUDA GPU.

Every member (``kl``, ``reverse_kl``, ``js`` with several ``beta``), every input space and
mixed pairs, temperatures, float32/float64 (and float16 through the public functions, which
compute it in float32), shapes 1-d to 4-d and a row of 50257 classes, masked vocabularies
(``-inf`` in one side, both, whole rows), NaN and ``+inf`` inputs and probabilities with
zeros: the fast path, called directly and through ``kldiv.kl_divergence`` /
``reverse_kl_divergence`` / ``js_divergence``, against the generic kernel
(``kldiv.use_generic()``) and a float64 NumPy oracle written from the definitions. NaN and
infinite positions must match exactly, finite values to rounding; a spy on the kernel launch
checks that the fast path really ran. The whole module is skipped (with the reason) where
CuPy or a CUDA device is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import kldiv
from kldiv import _switch, backends

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="CuPy is not installed: the CuPy kernels need it")
try:
    _N_DEVICES = cp.cuda.runtime.getDeviceCount()
except Exception as exc:  # installed, but no driver / GPU
    pytest.skip(f"CuPy has no CUDA device here ({type(exc).__name__})", allow_module_level=True)
if _N_DEVICES < 1:
    pytest.skip("CuPy has no CUDA device here", allow_module_level=True)

from kldiv.backends import cupy_family  # noqa: E402 (after the skip: it imports cupy)

MODULE = "kldiv.backends.cupy_family"
INF = math.inf
BETAS = (0.1, 0.5, 0.9)
SPACES = [("logits", "logits"), ("log_probs", "log_probs"), ("probs", "probs"),
          ("probs", "logits"), ("logits", "log_probs"), ("log_probs", "probs")]
TEMPERATURES = (1.0, 0.5, 3.0)
# (member, beta): the ops and their parameters
MEMBERS = [("kl", None), ("reverse_kl", None), *(("js", b) for b in BETAS)]
PUBLIC: dict[str, Callable[..., Any]] = {
    "kl": kldiv.kl_divergence, "reverse_kl": kldiv.reverse_kl_divergence,
    "js": kldiv.js_divergence,
}
# shapes 1-d .. 4-d; class axes of 1 (one thread warp, a single class), 37, 70 and 200 (2, 3
# and 7 warps: block sizes that are not powers of two) and 300 (more classes than threads)
SHAPES = [(37,), (12, 300), (2, 6, 70), (2, 1, 6, 200), (6, 1), (3, 2, 6, 33)]
TOL = {np.float64: 1e-10, np.float32: 5e-5, np.float16: 4e-3}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The dispatch finds this module for CuPy: through the libraries table once the lead's
    registration is in, else registered for the test (and forgotten after it)."""
    if MODULE not in _switch.fast_path_modules("cupy"):
        monkeypatch.setitem(_switch._REGISTERED, "cupy", MODULE)
    _forget_cupy_ops()
    yield
    monkeypatch.undo()
    _forget_cupy_ops()


def _forget_cupy_ops() -> None:
    for key in [k for k in _switch._LOADED if k[0] == "cupy"]:
        del _switch._LOADED[key]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch, registered: None) -> list[tuple[str, Any]]:
    """Records each kernel launch as ``(kernel name, dtype)``."""
    calls: list[tuple[str, Any]] = []
    real = cupy_family._launch

    def spy(kernel: Any, a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((kernel.name, a.dtype))
        return real(kernel, a, b, *args, **kwargs)

    monkeypatch.setattr(cupy_family, "_launch", spy)
    return calls


# ------------------------------------------------------------------------------ the oracle
def _log_softmax64(x: np.ndarray, t: float) -> np.ndarray:
    """``log_softmax(x / t)`` by the definition, in float64: a row of all ``-inf`` is the zero
    measure (all ``-inf``); a NaN or ``+inf`` logit leaves the row undefined (all NaN)."""
    z = x / t
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(z, axis=-1, keepdims=True)  # NaN propagates
        zero = m == -INF
        m = np.where(zero, 0.0, m)
        out = z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))
        undefined = np.isnan(m) | (m == INF)
    out = np.where(zero, -INF, out)
    return np.where(undefined, np.nan, out)


def _log64(x: np.ndarray, space: str, t: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if space == "probs":
        return np.log(np.clip(x, 1e-7, 1.0))
    if space == "log_probs":
        return x
    return _log_softmax64(x, t)


def _kl64(la: np.ndarray, lb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum over a > 0 of a (la - lb), sum of |terms| + a)``: ``0 log 0 = 0``, ``+inf`` where
    ``b = 0 < a``; the second is the scale of the rounding errors."""
    with np.errstate(invalid="ignore", over="ignore"):
        pa = np.exp(la)
        term = np.where(lb == -INF, INF, pa * (la - lb))
        term = np.where(np.isnan(la) | np.isnan(lb), np.nan, term)
        term = np.where(la == -INF, 0.0, term)
        scale = np.where(la == -INF, 0.0, pa * (np.abs(la) + np.abs(np.where(np.isinf(lb), 0, lb)) + 1))
    return term.sum(axis=-1), np.where(np.isfinite(scale), scale, 0.0).sum(axis=-1)


def _js64(lp: np.ndarray, lq: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        lm = np.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)  # log M, M = bP + (1-b)Q
    kl_pm, s1 = _kl64(lp, lm)
    kl_qm, s2 = _kl64(lq, lm)
    return beta * kl_pm + (1 - beta) * kl_qm, s1 + s2


def oracle(op: str, y_true: Any, y_pred: Any, spaces: tuple[str, str], t: float,
           beta: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The member's value per row and a rounding scale, float64, from the definitions."""
    # each side in log space over its own class axis, then broadcast
    lp, lq = np.broadcast_arrays(_log64(y_true, spaces[0], t), _log64(y_pred, spaces[1], t))
    if op == "kl":
        return _kl64(lp, lq)
    if op == "reverse_kl":
        return _kl64(lq, lp)
    assert beta is not None
    return _js64(lp, lq, beta)


# ------------------------------------------------------------------------------ the inputs
def _side(rng: np.random.Generator, shape: tuple[int, ...], space: str) -> np.ndarray:
    """Random float64 values of one space (probabilities are normalised)."""
    x = rng.normal(0.0, 2.0, shape)
    if space == "logits":
        return x
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.log(p) if space == "log_probs" else p


def _mask(x: np.ndarray, where: Any, space: str) -> None:
    """Entries of probability exactly 0: ``-inf`` logits or log-probabilities, probs 0."""
    x[where] = 0.0 if space == "probs" else -INF


def inputs(shape: tuple[int, ...], spaces: tuple[str, str], seed: int = 0,
           masks: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(y_true, y_pred)`` of ``shape``. With ``masks``, rows cycle through: plain; a
    masked vocabulary shared by both; P masked where Q is not; Q masked where P is not (KL
    infinite); P all masked (the zero measure); both all masked."""
    rng = np.random.default_rng(seed)
    a, b = _side(rng, shape, spaces[0]), _side(rng, shape, spaces[1])
    if masks and shape[-1] > 1:
        ra, rb = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
        for i in range(ra.shape[0]):
            kind = i % 6
            if kind == 1:
                _mask(ra, (i, slice(None, None, 5)), spaces[0])
                _mask(rb, (i, slice(None, None, 5)), spaces[1])
            elif kind == 2:
                _mask(ra, (i, slice(1, None, 6)), spaces[0])
            elif kind == 3:
                _mask(rb, (i, slice(2, None, 7)), spaces[1])
            elif kind == 4:
                _mask(ra, (i, slice(None)), spaces[0])
            elif kind == 5:
                _mask(ra, (i, slice(None)), spaces[0])
                _mask(rb, (i, slice(None)), spaces[1])
    return a, b


# ------------------------------------------------------------------------------ comparisons
def _host(x: Any) -> np.ndarray:
    return np.asarray(cp.asnumpy(x) if isinstance(x, cp.ndarray) else x, dtype=np.float64)


def assert_same(got: Any, ref: Any, scale: np.ndarray, tol: float, what: str) -> None:
    """NaN, ``+inf`` and ``-inf`` at exactly the same positions; finite values within ``tol``
    of ``|ref|`` plus the rows' rounding scale."""
    g, r = _host(got), _host(ref)
    assert g.shape == r.shape, f"{what}: shape {g.shape} != {r.shape}"
    for test in (np.isnan, np.isposinf, np.isneginf):
        bad = test(g) != test(r)
        assert not bad.any(), f"{what}: {test.__name__} differs at {np.argwhere(bad)[:5].tolist()}: {g[bad][:5]} vs {r[bad][:5]}"
    fin = np.isfinite(r)
    err = np.abs(g[fin] - r[fin])
    bound = tol * (np.abs(r[fin]) + np.broadcast_to(scale, r.shape)[fin] + 1e-30)
    assert (err <= bound).all(), f"{what}: max error {err.max()} (bound {bound[err > bound][:3]})"


def _call(op: str, beta: float | None) -> tuple[Callable[..., Any], Callable[..., Any], dict[str, Any]]:
    """(the fast path, the public function, the member's parameters)."""
    params = {} if beta is None else {"beta": beta}
    return getattr(cupy_family, op), PUBLIC[op], params


def _public(fn: Callable[..., Any], yt: Any, yp: Any, spaces: tuple[str, str], t: float,
            params: dict[str, Any]) -> Any:
    return fn(yt, yp, inputs=spaces, temperature=t, **params)


def _keras(op: str, spaces: tuple[str, str]) -> bool:
    """The public call is the Keras KL's (forward or reverse KL on probabilities), which
    never reaches this module."""
    return op != "js" and spaces == ("probs", "probs")


def _temperatures(spaces: tuple[str, str]) -> tuple[float, ...]:
    return TEMPERATURES if "logits" in spaces else (1.0,)


CASES = [pytest.param(op, beta, spaces, t, id=f"{op}{'' if beta is None else beta}-{'+'.join(spaces)}-T{t}")
         for op, beta in MEMBERS for spaces in SPACES for t in _temperatures(spaces)]


# ------------------------------------------------------------------------------ the tests
def test_registered_in_the_libraries_table() -> None:
    """The dispatch looks up ``kl``/``reverse_kl``/``js`` in this module for CuPy (the table's
    ``fast_paths``), while the Keras KL keeps ``cupy_``'s kernel."""
    from kldiv import _libraries

    assert MODULE in _libraries.library("cupy").fast_paths
    _forget_cupy_ops()
    for op in ("kl", "reverse_kl", "js"):
        assert _switch.library_op("cupy", op) is getattr(cupy_family, op)
    assert backends.fast_path("cupy").__module__ == "kldiv.backends.cupy_"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("op", "beta", "spaces", "t"), CASES)
def test_matches_generic_and_oracle(op: str, beta: float | None, spaces: tuple[str, str], t: float,
                                    dtype: Any, launches: list[tuple[str, Any]]) -> None:
    """Direct call == public call (same kernel); both == generic and == oracle, every shape."""
    fast, public, params = _call(op, beta)
    keras = _keras(op, spaces)
    for i, shape in enumerate(SHAPES):
        what = f"{op} {spaces} T={t} {np.dtype(dtype).name} {shape}"
        a64, b64 = inputs(shape, spaces, seed=i)
        yt, yp = cp.asarray(a64, dtype=dtype), cp.asarray(b64, dtype=dtype)
        del launches[:]
        direct = fast(yt, yp, spaces=spaces, temperature=t, **params)
        assert direct is not NotImplemented, what
        assert isinstance(direct, cp.ndarray) and direct.dtype == dtype, what
        assert direct.shape == shape[:-1], what
        assert len(launches) == 1 and launches[0][1] == dtype, what
        ref, scale = oracle(op, _host(yt), _host(yp), spaces, t, beta)
        assert_same(direct, ref, scale, TOL[dtype], what + " direct vs oracle")
        with kldiv.use_generic():
            gen = _public(public, yt, yp, spaces, t, params)
        if not keras:
            assert_same(direct, gen, scale, TOL[dtype], what + " direct vs generic")
            del launches[:]
            out = _public(public, yt, yp, spaces, t, params)
            assert len(launches) == 1, what + ": the public function did not take the fast path"
            np.testing.assert_array_equal(_host(out), _host(direct), err_msg=what)
            assert out.dtype == dtype


@pytest.mark.parametrize(("op", "beta", "spaces", "t"), CASES)
def test_float16_through_the_public_functions(op: str, beta: float | None, spaces: tuple[str, str],
                                              t: float, launches: list[tuple[str, Any]]) -> None:
    """float16 arrives at the kernel as float32 and comes back as float16; the kernel itself
    declines float16."""
    fast, public, params = _call(op, beta)
    a64, b64 = inputs((2, 6, 70), spaces, seed=3)
    yt, yp = cp.asarray(a64, dtype=cp.float16), cp.asarray(b64, dtype=cp.float16)
    assert fast(yt, yp, spaces=spaces, temperature=t, **params) is NotImplemented
    if _keras(op, spaces):
        return
    del launches[:]
    out = _public(public, yt, yp, spaces, t, params)
    assert [d for _, d in launches] == [np.float32]
    assert out.dtype == cp.float16
    ref, scale = oracle(op, _host(yt), _host(yp), spaces, t, beta)
    assert_same(out, ref, scale, TOL[np.float16], f"{op} {spaces} float16 vs oracle")
    with kldiv.use_generic():
        gen = _public(public, yt, yp, spaces, t, params)
    assert_same(out, gen, scale, TOL[np.float16], f"{op} {spaces} float16 vs generic")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("op", "beta"), MEMBERS)
def test_large_row(op: str, beta: float | None, dtype: Any, launches: list[tuple[str, Any]]) -> None:
    """Rows of a GPT-2 vocabulary (50257 classes: not a multiple of the block), logits at
    T=2 with masked entries, and soft labels against logits."""
    fast, public, params = _call(op, beta)
    for spaces in (("logits", "logits"), ("probs", "logits")):
        a64, b64 = inputs((7, 50257), spaces, seed=11)
        yt, yp = cp.asarray(a64, dtype=dtype), cp.asarray(b64, dtype=dtype)
        what = f"{op} {spaces} V=50257 {np.dtype(dtype).name}"
        direct = fast(yt, yp, spaces=spaces, temperature=2.0, **params)
        ref, scale = oracle(op, _host(yt), _host(yp), spaces, 2.0, beta)
        assert_same(direct, ref, scale, TOL[dtype], what + " vs oracle")
        with kldiv.use_generic():
            gen = _public(public, yt, yp, spaces, 2.0, params)
        assert_same(direct, gen, scale, TOL[dtype], what + " vs generic")
        np.testing.assert_array_equal(_host(_public(public, yt, yp, spaces, 2.0, params)),
                                      _host(direct))
    assert len(launches) == 4


def _special_rows(space: str, v: int) -> np.ndarray:
    """Rows with NaN and infinities, by row: 0 a NaN entry; 1 +inf; 2 -inf; 3 all -inf; 4 a
    NaN entry and the rest -inf; 5 plain."""
    rng = np.random.default_rng(5)
    x = _side(rng, (6, v), space)
    x[0, 3] = np.nan
    x[1, 4] = INF
    x[2, 5] = -INF
    x[3] = -INF
    x[4] = -INF
    x[4, 1] = np.nan
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("op", "beta"), MEMBERS)
@pytest.mark.parametrize("spaces", SPACES, ids="+".join)
def test_nan_and_inf_inputs(op: str, beta: float | None, spaces: tuple[str, str], dtype: Any,
                            launches: list[tuple[str, Any]]) -> None:
    """NaN and +-inf on either side, every pairing of the special rows (36 rows): the same
    NaN/inf positions and values as the generic kernel, the oracle's where it defines them."""
    fast, public, params = _call(op, beta)
    v = 41
    sa, sb = _special_rows(spaces[0], v), _special_rows(spaces[1], v)
    a64 = np.repeat(sa, 6, axis=0)  # every row of a against every row of b
    b64 = np.tile(sb, (6, 1))
    yt, yp = cp.asarray(a64, dtype=dtype), cp.asarray(b64, dtype=dtype)
    t = 0.5 if "logits" in spaces else 1.0
    direct = fast(yt, yp, spaces=spaces, temperature=t, **params)
    assert launches, "the fast path did not run"
    ref, scale = oracle(op, _host(yt), _host(yp), spaces, t, beta)
    what = f"{op} {spaces} {np.dtype(dtype).name} special rows"
    if not _keras(op, spaces):
        with kldiv.use_generic():
            gen = _public(public, yt, yp, spaces, t, params)
        assert_same(direct, gen, scale, TOL[dtype], what + " vs generic")
        del launches[:]
        out = _public(public, yt, yp, spaces, t, params)
        assert launches, "the public function did not take the fast path"
        assert_same(out, direct, scale, 0.0, what + " public vs direct")
    # the oracle differs from the generic kernel only where an entry's probability
    # underflows against a NaN (0 there, NaN in the oracle): none in these rows
    assert_same(direct, ref, scale, TOL[dtype], what + " vs oracle")


@pytest.mark.parametrize(("op", "beta"), MEMBERS)
def test_probs_with_zeros_and_out_of_range(op: str, beta: float | None,
                                           launches: list[tuple[str, Any]]) -> None:
    """Probabilities of exactly 0 and 1, below 1e-7, above 1 and negative: clipped to
    ``[1e-7, 1]`` as the Keras KL does (on both sides of a mixed pair too)."""
    fast, public, params = _call(op, beta)
    rng = np.random.default_rng(9)
    p = rng.uniform(-0.2, 1.2, (16, 50))
    p[:, ::7] = 0.0
    p[:, 3::13] = 1.0
    p[:, 5::17] = 1e-9
    logits = rng.normal(0, 2, (16, 50))
    for spaces, a64, b64 in ((("probs", "probs"), p, p[::-1].copy()),
                             (("probs", "logits"), p, logits),
                             (("logits", "probs"), logits, p)):
        for dtype in (np.float32, np.float64):
            yt, yp = cp.asarray(a64, dtype=dtype), cp.asarray(b64, dtype=dtype)
            direct = fast(yt, yp, spaces=spaces, temperature=1.0, **params)
            ref, scale = oracle(op, _host(yt), _host(yp), spaces, 1.0, beta)
            what = f"{op} {spaces} {np.dtype(dtype).name}"
            assert_same(direct, ref, scale, TOL[dtype], what + " vs oracle")
            with kldiv.use_generic():
                gen = _public(public, yt, yp, spaces, 1.0, params)
            if not _keras(op, spaces):
                assert_same(direct, gen, scale, TOL[dtype], what + " vs generic")
    assert launches


# ------------------------------------------------------------------------------ layouts
def _layouts(a: np.ndarray, b: np.ndarray) -> Iterator[tuple[str, Any, Any]]:
    """Non-contiguous (rows, classes) CuPy views of ``a`` and ``b``."""
    yield "fortran", cp.asfortranarray(cp.asarray(a)), cp.asarray(b)
    wide = cp.zeros((a.shape[0], 2 * a.shape[1]))
    wide[:, ::2] = cp.asarray(a)
    yield "every other column", wide[:, ::2], cp.asarray(b)
    yield "reversed columns", cp.asarray(a[:, ::-1].copy())[:, ::-1], cp.asarray(b)[::-1][::-1]
    yield "every other row", cp.asarray(np.repeat(a, 2, axis=0))[::2], cp.asarray(b)
    off = cp.zeros(a.size + 1)
    off[1:] = cp.asarray(a).ravel()
    yield "offset view", off[1:].reshape(a.shape), cp.asarray(b)


@pytest.mark.parametrize(("op", "beta"), MEMBERS)
@pytest.mark.parametrize("spaces", [("logits", "logits"), ("probs", "logits"),
                                    ("log_probs", "log_probs")], ids="+".join)
def test_non_contiguous_inputs(op: str, beta: float | None, spaces: tuple[str, str],
                               launches: list[tuple[str, Any]]) -> None:
    fast, public, params = _call(op, beta)
    a64, b64 = inputs((12, 45), spaces, seed=4)
    for layout, yt, yp in _layouts(a64, b64):
        t = 1.5 if "logits" in spaces else 1.0
        direct = fast(yt, yp, spaces=spaces, temperature=t, **params)
        ref, scale = oracle(op, a64, b64, spaces, t, beta)
        assert_same(direct, ref, scale, TOL[np.float64], f"{op} {spaces} {layout} vs oracle")
        with kldiv.use_generic():
            gen = _public(public, yt, yp, spaces, t, params)
        assert_same(direct, gen, scale, TOL[np.float64], f"{op} {spaces} {layout} vs generic")
    assert len(launches) == 5


BROADCASTS = [
    ("a row against rows", (1, 45), (12, 45), ("logits", "logits")),
    ("1-d against 3-d", (45,), (3, 4, 45), ("logits", "logits")),
    ("(B, 1, V) against (B, S, V) (copied)", (3, 1, 45), (3, 4, 45), ("logits", "log_probs")),
    ("(1, S, V) against (B, S, V)", (1, 4, 45), (3, 4, 45), ("log_probs", "logits")),
    ("probs with a class axis of 1", (12, 1), (12, 45), ("probs", "logits")),
    ("log-probs with a class axis of 1", (3, 4, 1), (3, 4, 45), ("log_probs", "log_probs")),
    ("both of one class", (12, 1), (12, 1), ("logits", "logits")),
]


@pytest.mark.parametrize(("op", "beta"), MEMBERS)
@pytest.mark.parametrize(("name", "shape_t", "shape_p", "spaces"), BROADCASTS,
                         ids=[b[0] for b in BROADCASTS])
def test_broadcast_inputs(op: str, beta: float | None, name: str, shape_t: tuple[int, ...],
                          shape_p: tuple[int, ...], spaces: tuple[str, str],
                          launches: list[tuple[str, Any]]) -> None:
    fast, public, params = _call(op, beta)
    rng = np.random.default_rng(6)
    a64 = _side(rng, shape_t, spaces[0])
    b64 = _side(rng, shape_p, spaces[1])
    if shape_t[-1] == 1 and spaces[0] == "probs":
        a64 = rng.uniform(0, 1, shape_t)  # one probability broadcast over the classes
    if shape_t[-1] == 1 and spaces[0] == "log_probs":
        a64 = np.log(rng.uniform(0, 1, shape_t))
    yt, yp = cp.asarray(a64), cp.asarray(b64)
    t = 2.0 if "logits" in spaces else 1.0
    direct = fast(yt, yp, spaces=spaces, temperature=t, **params)
    assert direct is not NotImplemented, name
    assert direct.shape == np.broadcast_shapes(shape_t, shape_p)[:-1]
    ref, scale = oracle(op, a64, b64, spaces, t, beta)
    assert_same(direct, ref, scale, TOL[np.float64], f"{op} {name} vs oracle")
    with kldiv.use_generic():
        gen = _public(public, yt, yp, spaces, t, params)
    assert_same(direct, gen, scale, TOL[np.float64], f"{op} {name} vs generic")
    del launches[:]
    assert_same(_public(public, yt, yp, spaces, t, params), direct, scale, 0.0, name)
    assert len(launches) == 1


def test_more_rows_than_blocks(monkeypatch: pytest.MonkeyPatch,
                               launches: list[tuple[str, Any]]) -> None:
    """A launch of fewer blocks than rows: each block takes every MAX_BLOCKS-th row."""
    monkeypatch.setattr(cupy_family, "MAX_BLOCKS", 3)
    for op, beta in MEMBERS:
        fast, _, params = _call(op, beta)
        a64, b64 = inputs((20, 70), ("logits", "logits"), seed=8)
        direct = fast(cp.asarray(a64), cp.asarray(b64), spaces=("logits", "logits"),
                      temperature=1.0, **params)
        ref, scale = oracle(op, a64, b64, ("logits", "logits"), 1.0, beta)
        assert_same(direct, ref, scale, TOL[np.float64], f"{op} 3 blocks, 20 rows")
    assert len(launches) == len(MEMBERS)


# ------------------------------------------------------------------------------ declines
def test_declines_what_it_does_not_take(launches: list[tuple[str, Any]]) -> None:
    """Other dtypes, mixed dtypes, non-CuPy arrays, empty results and a logits side with a
    broadcast class axis return NotImplemented (the generic kernel then runs)."""
    x = cp.asarray(np.random.default_rng(0).normal(size=(4, 10)))
    kw: dict[str, Any] = {"spaces": ("logits", "logits"), "temperature": 1.0}
    for fn, extra in ((cupy_family.kl, {}), (cupy_family.reverse_kl, {}),
                      (cupy_family.js, {"beta": 0.5})):
        assert fn(x.astype(cp.float16), x.astype(cp.float16), **kw, **extra) is NotImplemented
        assert fn(x.astype(cp.int32), x.astype(cp.int32), **kw, **extra) is NotImplemented
        assert fn(x.astype(cp.float32), x, **kw, **extra) is NotImplemented
        assert fn(cp.asnumpy(x), x, **kw, **extra) is NotImplemented
        assert fn(x[:0], x[:0], **kw, **extra) is NotImplemented  # no rows
        assert fn(x[:, :0], x[:, :0], **kw, **extra) is NotImplemented  # no classes
        assert fn(x[:, :1], x, **kw, **extra) is NotImplemented  # softmax over a broadcast axis
        assert fn(x[0, 0], x[0, 0], **kw, **extra) is NotImplemented  # 0-d
    assert cupy_family.js(x, x, beta=0.0, **kw) is NotImplemented
    assert launches == []


@pytest.mark.parametrize(("op", "beta"), MEMBERS)
def test_empty_inputs_take_the_generic_kernel(op: str, beta: float | None,
                                              launches: list[tuple[str, Any]]) -> None:
    _, public, params = _call(op, beta)
    for shape in ((0, 5), (3, 0), (2, 0, 4)):
        x = cp.zeros(shape)
        out = _public(public, x, x, ("logits", "logits"), 1.0, params)
        with kldiv.use_generic():
            gen = _public(public, x, x, ("logits", "logits"), 1.0, params)
        assert out.shape == gen.shape == shape[:-1]
        np.testing.assert_array_equal(_host(out), _host(gen))
    assert launches == []


def test_kernels_are_compiled_once() -> None:
    x = cp.asarray(np.random.default_rng(1).normal(size=(3, 20)))
    cupy_family.kl(x, x, spaces=("logits", "log_probs"), temperature=1.0)
    n = len(cupy_family._KERNELS)
    kernel = cupy_family._KERNELS[("double", 2, 1, 0)]
    cupy_family.kl(x, x, spaces=("logits", "log_probs"), temperature=2.0)
    cupy_family.reverse_kl(x, x, spaces=("log_probs", "logits"), temperature=1.0)  # same kernel
    assert len(cupy_family._KERNELS) == n
    assert cupy_family._KERNELS[("double", 2, 1, 0)] is kernel


@pytest.mark.skipif(_N_DEVICES < 2, reason="needs a second CUDA device")
def test_second_device(launches: list[tuple[str, Any]]) -> None:
    """Arrays on device 1 are computed there (the current device is 0)."""
    a64, b64 = inputs((6, 70), ("logits", "logits"))
    with cp.cuda.Device(1):
        yt, yp = cp.asarray(a64), cp.asarray(b64)
    out = cupy_family.js(yt, yp, spaces=("logits", "logits"), temperature=1.0, beta=0.3)
    assert out.device.id == 1
    ref, scale = oracle("js", a64, b64, ("logits", "logits"), 1.0, 0.3)
    assert_same(out, ref, scale, TOL[np.float64], "device 1")


def _log_softmax64_shifted(x: np.ndarray, t: float) -> np.ndarray:
    """``log_softmax(x / t)`` shifted by the row maximum before the division (no overflow of
    ``x / t`` at a tiny ``t``); a row of all ``-inf`` is the zero measure."""
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(m == -INF, 0.0, m)
    with np.errstate(invalid="ignore"):
        z = (x - m) / t
    s = np.sum(np.exp(z), axis=-1, keepdims=True)
    return z - np.log(np.where(s == 0.0, 1.0, s))


@pytest.mark.parametrize(("dtype", "t"), [(np.float32, 1.2e-38), (np.float32, 1e30),
                                          (np.float64, 1e-307), (np.float64, 1e300)],
                         ids=["float32-T1.2e-38", "float32-T1e30", "float64-T1e-307",
                              "float64-T1e300"])
@pytest.mark.parametrize(("op", "beta"), MEMBERS)
def test_extreme_temperatures(op: str, beta: float | None, dtype: Any, t: float,
                              launches: list[tuple[str, Any]]) -> None:
    """Logits around 10 at a tiny temperature: the kernel shifts each row by its maximum
    before dividing by ``T`` (``x / T`` overflowed to ``inf``: ``inf - inf``, a NaN row where
    the one-hot limit is finite), as the generic kernel does; -inf entries and rows kept."""
    fast, public, params = _call(op, beta)
    rng = np.random.default_rng(5)
    a = 10.0 - rng.uniform(0.0, 1.5, (5, 40))
    b = 10.0 - rng.uniform(0.0, 1.5, (5, 40))
    a[:, 4] = b[:, 4] = 10.0
    b[3, 4], b[3, 7] = 9.0, 10.0  # other argmaxes: KL huge in the limit
    a[1, ::3] = b[1, ::3] = -INF
    a[2] = -INF
    a[4] = b[4] = -INF
    yt, yp = cp.asarray(a, dtype=dtype), cp.asarray(b, dtype=dtype)
    del launches[:]
    direct = fast(yt, yp, spaces=("logits", "logits"), temperature=t, **params)
    assert len(launches) == 1
    lp = _log_softmax64_shifted(_host(yt), t)
    lq = _log_softmax64_shifted(_host(yp), t)
    if op == "js":
        assert beta is not None
        ref, scale = _js64(lp, lq, beta)
    else:
        ref, scale = _kl64(lp, lq) if op == "kl" else _kl64(lq, lp)
    ref = ref.astype(dtype).astype(np.float64)  # inf beyond the dtype's range
    what = f"{op} T={t} {np.dtype(dtype).name}"
    assert not np.isnan(_host(direct)).any(), what
    assert_same(direct, ref, scale, TOL[dtype], what + " vs oracle")
    with kldiv.use_generic():
        gen = _public(public, yt, yp, ("logits", "logits"), t, params)
    assert_same(direct, gen, scale, TOL[dtype], what + " vs generic")


@pytest.mark.parametrize(("dtype", "t"), [(np.float32, 1e-40), (np.float64, 1e-320)])
@pytest.mark.parametrize(("op", "beta"), MEMBERS)
def test_temperature_zero_in_the_dtype_declines_to_the_limit(op: str, beta: float | None,
                                                             dtype: Any, t: float,
                                                             launches: list[tuple[str, Any]]) -> None:
    """A temperature below the dtype's smallest normal number is 0 there: the kernel (which
    divides by it) declines and the generic kernel gives the ``T -> 0`` limit, never NaN."""
    fast, public, params = _call(op, beta)
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((4, 9)), rng.standard_normal((4, 9))
    yt, yp = cp.asarray(a, dtype=dtype), cp.asarray(b, dtype=dtype)
    del launches[:]
    assert fast(yt, yp, spaces=("logits", "logits"), temperature=t, **params) is NotImplemented
    assert not launches
    got = _host(_public(public, yt, yp, ("logits", "logits"), t, params))
    with kldiv.use_generic():
        want = _public(public, a.astype(dtype), b.astype(dtype), ("logits", "logits"), t, params)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.asarray(want, np.float64), rtol=1e-6)
