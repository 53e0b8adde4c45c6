"""Property-based tests (hypothesis) of the function and the loss class on every CPU backend.

Each property compares kldiv with a float64 oracle written from the definition (SPEC §1 and
§3) on the values the backend actually holds (float16 inputs are compared on their float16
values). Shapes are 1-d to 4-d, with size-0 axes; values include 0, 1, tiny numbers, values
above 1, negatives and infinities (all clipped to ``[1e-7, 1]``). The examples are
derandomized, so a run is reproducible in CI.

Tolerances are error bounds, not loose constants: a float32 row sum of terms ``t*log(t/p)`` is
off by at most a few ulps of the sum of the terms' magnitudes (plus ``t`` times the ulp of
the logarithm), so the bound scales with ``sum(|term| + t)`` and the row length.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import kldiv  # noqa: E402
from conftest import ArrayBackend, Backend  # noqa: E402

EPS = 1e-7
PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)

SPECIAL = [0.0, 1.0, 1e-7, 1e-8, 1e-30, 5e-8, 0.5, 1.0 - 1e-7, 2.0, 1e3, -0.3, -1.0,
           float("inf"), float("-inf")]
REDUCTIONS = ["auto", "sum_over_batch_size", "mean", "sum", "none", "mean_with_sample_weight"]
WEIGHT_FORMS = ["none", "scalar", "full", "rank+1", "rank-1", "broadcast"]


@pytest.fixture(params=[b.pytest_param() for b in Backend if not b.gpu])
def cpu_backend(request: pytest.FixtureRequest) -> ArrayBackend:
    """Every CPU backend of the test suite, and TensorFlow where it is installed."""
    member: Backend = request.param
    return member.handle()


# ---- strategies -----------------------------------------------------------------------------

def _values(dtype: str) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(SPECIAL), st.floats(-0.5, 1.5, width=32))


@st.composite
def _pair(draw: st.DrawFn, dtypes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, str]:
    """(y_true, y_pred, dtype): y_pred of 1-4 axes (size 0 allowed), y_true of the same shape
    or one that broadcasts to it (axes of 1, fewer leading axes)."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    t_shape = list(shape)
    for i in range(len(t_shape)):
        if draw(st.integers(0, 4)) == 0:
            t_shape[i] = 1
    t_shape = t_shape[draw(st.integers(0, max(0, len(t_shape) - 1))) if draw(st.booleans()) else 0:]
    p = draw(hnp.arrays(np.float64, shape, elements=_values(dtype)))
    t = draw(hnp.arrays(np.float64, tuple(t_shape), elements=_values(dtype)))
    return t.astype(dtype), p.astype(dtype), dtype


def _weight(draw: st.DrawFn, loss_shape: tuple[int, ...], dtype: str) -> tuple[str, Any]:
    r = len(loss_shape)
    forms = ["none", "scalar", "full", "rank+1"] + (["rank-1", "broadcast"] if r >= 1 else [])
    form = draw(st.sampled_from(forms))
    elements = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 2.0]), st.floats(0, 3, width=16))
    if form == "none":
        return form, None
    if form == "scalar":
        return form, draw(elements)
    shape = {"full": loss_shape, "rank+1": (*loss_shape, 1), "rank-1": loss_shape[:-1],
             "broadcast": (1,) * (r - 1) + loss_shape[-1:]}[form]
    return form, draw(hnp.arrays(np.float64, shape, elements=elements)).astype(dtype)


# ---- the oracle ------------------------------------------------------------------------------

def _terms(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    tc = np.clip(np.asarray(t, np.float64), EPS, 1.0)
    pc = np.clip(np.asarray(p, np.float64), EPS, 1.0)
    return tc * np.log(tc / pc)


def _ulp(dtype: str) -> float:
    # float16 is computed in float32 (SPEC §2), then rounded once at the end
    return float(np.finfo(np.float32 if dtype == "float16" else dtype).eps)


def _row_bound(t: np.ndarray, p: np.ndarray, dtype: str) -> np.ndarray:
    """Bound on the error of each per-sample loss computed in ``dtype`` (before the rounding
    of a float16 result)."""
    terms = _terms(t, p)
    tc = np.broadcast_to(np.clip(np.asarray(t, np.float64), EPS, 1.0), terms.shape)
    n = max(terms.shape[-1], 1)
    return 4 * _ulp(dtype) * (2 + math.log2(n)) * (np.abs(terms) + tc).sum(axis=-1)


def _half_rounding(x: np.ndarray, dtype: str) -> np.ndarray:
    """The final rounding of a float16 result: half an ulp, at least half the smallest
    subnormal (2**-25: a loss of 2e-8 rounds to 0)."""
    if dtype != "float16":
        return np.zeros_like(x)
    return np.abs(x) * (2.0 ** -11) + 2.0 ** -25


def _squeeze(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keras 2's squeeze_or_expand_dimensions (the loss class only)."""
    if t.ndim == p.ndim + 1 and t.shape[-1] == 1:
        return t[..., 0], p
    if p.ndim == t.ndim + 1 and p.shape[-1] == 1:
        return t, p[..., 0]
    return t, p


def _weight_to_loss(w: Any, loss_shape: tuple[int, ...]) -> np.ndarray:
    w = np.asarray(w, np.float64)
    r = len(loss_shape)
    if w.ndim == r + 1 and w.shape[-1] == 1:
        w = w[..., 0]
    elif r >= 1 and w.ndim == r - 1:
        w = w[..., None]
    return np.broadcast_to(w, loss_shape)


def _to_numpy(backend: ArrayBackend, x: Any) -> np.ndarray:
    out = backend.to_numpy(x)
    return np.asarray(out, np.float64)


# ---- properties -------------------------------------------------------------------------------

def _dtypes(backend: ArrayBackend) -> tuple[str, ...]:
    return tuple(d for d in ("float32", "float64", "float16") if d in backend.float_dtypes)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_function_matches_the_definition(cpu_backend: ArrayBackend, data: st.DataObject) -> None:
    t, p, dtype = data.draw(_pair(_dtypes(cpu_backend)))
    out = kldiv.kld(cpu_backend.asarray(t, dtype=dtype), cpu_backend.asarray(p, dtype=dtype))
    assert cpu_backend.is_native(out) or cpu_backend.name == "tensorflow"
    assert out.dtype == cpu_backend.dtype(dtype)
    want = _terms(t, p).sum(axis=-1)
    assert tuple(out.shape) == want.shape == np.broadcast_shapes(t.shape, p.shape)[:-1]
    got = _to_numpy(cpu_backend, out)
    bound = _row_bound(t, p, dtype) + _half_rounding(want, dtype) + 1e-30
    assert np.all(np.abs(got - want) <= bound), (got, want, bound)


@PROPERTY_SETTINGS
@given(data=st.data(), reduction=st.sampled_from(REDUCTIONS))
def test_loss_class_matches_the_definition(cpu_backend: ArrayBackend, data: st.DataObject, reduction: str) -> None:
    t, p, dtype = data.draw(_pair(_dtypes(cpu_backend)))
    ts, ps = _squeeze(t, p)
    per = _terms(ts, ps).sum(axis=-1)
    per_bound = _row_bound(ts, ps, dtype)
    form, w = _weight(data.draw, per.shape, dtype)
    wb = None if w is None else (w if form == "scalar" else cpu_backend.asarray(w, dtype=dtype))
    out = kldiv.KLDivergence(reduction=reduction)(
        cpu_backend.asarray(t, dtype=dtype), cpu_backend.asarray(p, dtype=dtype), sample_weight=wb)
    assert out.dtype == cpu_backend.dtype(dtype)
    got = _to_numpy(cpu_backend, out)

    w_full = np.ones(per.shape) if w is None else _weight_to_loss(w, per.shape)
    weighted = per * w_full
    acc = _ulp(dtype) * (2 + math.log2(max(per.size, 1))) * 4
    if reduction == "none":
        assert got.shape == per.shape
        want, bound = weighted, per_bound * w_full + acc * np.abs(weighted)
    else:
        assert got.shape == ()
        total = weighted.sum()
        total_bound = float((per_bound * w_full).sum() + acc * np.abs(weighted).sum())
        if reduction == "sum":
            want, bound = total, total_bound
        elif reduction == "mean_with_sample_weight" and w is not None:
            denom = w_full.sum()
            want = 0.0 if denom == 0 else total / denom
            bound = 0.0 if denom == 0 else total_bound / denom + acc * abs(want) * 2
        else:
            want = 0.0 if per.size == 0 else total / per.size
            bound = 0.0 if per.size == 0 else total_bound / per.size
    bound = np.asarray(bound) + _half_rounding(np.asarray(want), dtype) + 1e-30
    assert np.all(np.abs(got - want) <= bound), (form, got, want, bound)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_fast_path_and_generic_kernel_agree(cpu_backend: ArrayBackend, data: st.DataObject) -> None:
    """Both routes obey the same bound; where kldiv promises bitwise equality (NumPy, JAX) it
    holds."""
    t, p, dtype = data.draw(_pair(_dtypes(cpu_backend)))
    yt, yp = cpu_backend.asarray(t, dtype=dtype), cpu_backend.asarray(p, dtype=dtype)
    fast = _to_numpy(cpu_backend, kldiv.kld(yt, yp))
    with kldiv.use_generic():
        generic = _to_numpy(cpu_backend, kldiv.kld(yt, yp))
    if cpu_backend.name in {"numpy", "jax"}:
        np.testing.assert_array_equal(fast, generic)
    want = _terms(t, p).sum(axis=-1)
    bound = _row_bound(t, p, dtype) + _half_rounding(want, dtype) + 1e-30
    assert np.all(np.abs(generic - want) <= bound)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_inputs_are_not_modified_and_numpy_results_follow_the_type_rule(data: st.DataObject) -> None:
    t, p, dtype = data.draw(_pair(("float32", "float64", "float16")))
    t0, p0 = t.copy(), p.copy()
    out = kldiv.kld(t, p)
    reduced = kldiv.KLDivergence()(t, p)
    np.testing.assert_array_equal(t, t0)
    np.testing.assert_array_equal(p, p0)
    assert type(reduced) is np.dtype(dtype).type
    if out.ndim == 0:
        assert type(out) is np.dtype(dtype).type
    else:
        assert type(out) is np.ndarray and out.dtype == np.dtype(dtype)
