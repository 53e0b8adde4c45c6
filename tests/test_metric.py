"""The stateful metric ``kldiv.metrics.KLDivergence`` (SPEC §5) on every backend."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, oracle
from kldiv import metrics
from kldiv.metrics import KLDivergence

SEED_T = [[0.0, 1.0], [0.0, 0.0]]
SEED_P = [[0.6, 0.4], [0.4, 0.6]]


def _f(backend: ArrayBackend, x: Any) -> float:
    return float(backend.to_numpy(x))


def _lib(backend: ArrayBackend) -> str:
    return backend.name.split("-")[0]


# -- SPEC §5 reference values ------------------------------------------------------------------


def test_reference_values(backend: ArrayBackend) -> None:
    m = KLDivergence()
    t, p = backend.asarray(SEED_T), backend.asarray(SEED_P)
    m.update_state(t, p, sample_weight=backend.asarray([1.0, 0.0]))
    r1 = m.result()
    assert backend.is_native(r1)
    assert r1.dtype == backend.dtype("float32")
    assert tuple(r1.shape) == ()
    np.testing.assert_allclose(backend.to_numpy(r1), 0.9162892, rtol=1e-7)
    m.update_state(t, p)
    r2 = m.result()
    assert backend.is_native(r2) and r2.dtype == backend.dtype("float32")
    np.testing.assert_allclose(backend.to_numpy(r2), 0.61085844, rtol=1e-7)


def test_reference_values_with_list_inputs() -> None:
    m = KLDivergence()
    m.update_state(SEED_T, SEED_P, sample_weight=[1, 0])
    assert str(m.result()) == "0.9162892"
    assert str(m(SEED_T, SEED_P)) == "0.61085844"  # __call__: update_state, then result


def test_default_name_and_config() -> None:
    m = KLDivergence()
    assert m.name == "kullback_leibler_divergence"
    assert m.get_config() == {"name": "kullback_leibler_divergence", "dtype": "float32"}
    m2 = KLDivergence.from_config(m.get_config())
    assert m2.get_config() == m.get_config()
    m3 = KLDivergence.from_config({"name": "kld", "dtype": "float64"})
    assert m3.get_config() == {"name": "kld", "dtype": "float64"}
    # Keras 3 saves a DTypePolicy; Keras 2 a "fn"
    k3 = {"name": "kl", "dtype": {"module": "keras", "class_name": "DTypePolicy",
                                  "config": {"name": "float32"}, "registered_name": None}}
    assert KLDivergence.from_config(k3).dtype == "float32"
    assert KLDivergence.from_config({"name": "kl", "dtype": "float32", "fn": "kl_divergence"}).name == "kl"
    with pytest.raises(ValueError, match="not the KL divergence"):
        KLDivergence.from_config({"name": "kl", "fn": "mean_squared_error"})
    with pytest.raises(TypeError, match="Unknown"):
        KLDivergence.from_config({"name": "kl", "reduction": "sum"})
    assert "kullback_leibler_divergence" in repr(m)


def test_dtype_argument(backend: ArrayBackend) -> None:
    assert KLDivergence(dtype=np.float64).dtype == "float64"
    with pytest.raises(ValueError, match="dtype"):
        KLDivergence(dtype="int32")
    with pytest.raises(TypeError, match="name"):
        KLDivergence(name=3)  # type: ignore[arg-type]
    m = KLDivergence(dtype="float64")
    m.update_state(backend.asarray(SEED_T), backend.asarray(SEED_P))
    r = m.result()
    assert r.dtype == backend.dtype("float64")
    np.testing.assert_allclose(backend.to_numpy(r), oracle(SEED_T, np.float32(SEED_P)).mean(), rtol=1e-6)


@pytest.mark.parametrize(("mean", "expected"), [(65510.0, 65504.0), (65530.0, np.inf), (1e5, np.inf)])
def test_float16_result_beyond_its_range_is_inf_without_a_warning(
        backend: ArrayBackend, mean: float, expected: float) -> None:
    """A float16 metric whose mean exceeded 65504 raised NumPy's "overflow encountered in
    cast" RuntimeWarning from result() (Dask's at compute time); the loss classes give the
    overflow as inf, as Keras' cast does, silently. Values below 65520 round to 65504."""
    m = KLDivergence(dtype="float16", inputs="log_probs")
    # log-probabilities: KL = sum(exp(t) * (t - p)) = 0 - (-mean) for t = [0, -inf], p = [-mean, 0]
    t = backend.asarray([[0.0, -np.inf], [0.0, -np.inf]], dtype="float32")
    p = backend.asarray([[-mean, 0.0], [-mean, 0.0]], dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.update_state(t, p)
        got = backend.to_numpy(m.result())
    if _lib(backend) == "array_api_strict":  # no float16 there: the result is float32
        assert got.dtype == np.float32 and float(got) == mean
    else:
        assert got.dtype == np.float16 and float(got) == expected


@pytest.mark.parametrize("make", [metrics.KLDivergence, metrics.ReverseKLDivergence,
                                  metrics.JensenShannonDivergence, metrics.KLEstimator])
def test_metric_name_is_a_plain_str_and_none_is_the_default_name(make: Any) -> None:
    """``name=np.str_("x")`` was kept as ``np.str_`` (in get_config, the repr and a saved
    config); ``name=None`` was a TypeError where Keras gives the default name
    (``keras.metrics.KLDivergence(name=None).name == "kl_divergence"``)."""
    m = make(name=np.str_("x"))
    assert type(m.name) is str and m.name == "x"
    assert type(m.get_config()["name"]) is str
    assert "np.str_" not in repr(m)
    assert type(pickle.loads(pickle.dumps(m)).name) is str
    assert make(name=None).name == make().name
    if make is not metrics.KLEstimator:  # (its get_config is its own: kldiv._estimator_metric)
        late = make()
        late.name = np.str_("y")  # set after construction: the config still holds a plain str
        assert type(late.get_config()["name"]) is str and "np.str_" not in repr(late)
    with pytest.raises(TypeError, match="name must be a str, got int"):
        make(name=3)


def test_low_precision_result_dtype() -> None:
    m = KLDivergence(dtype="bfloat16")  # NumPy has no bfloat16: float32
    m.update_state(SEED_T, SEED_P)
    assert m.result().dtype == np.float32
    m = KLDivergence(dtype="float16")
    m.update_state(SEED_T, SEED_P)
    assert m.result().dtype == np.float16
    np.testing.assert_allclose(float(m.result()), 0.45814306, rtol=1e-3)


def test_result_before_any_update_and_reset(backend: ArrayBackend) -> None:
    m = KLDivergence()
    r0 = m.result()
    assert type(r0) is np.float32 and float(r0) == 0.0  # a NumPy scalar (the package rule)
    assert m.library is None and m.device is None and m.variables == []
    m.update_state(backend.asarray(SEED_T), backend.asarray(SEED_P))
    assert m.library == {"dask": "dask"}.get(_lib(backend), _lib(backend))
    m.reset_state()
    assert float(m.result()) == 0.0 and m.library is None
    # after a reset, another library is fine
    m.update_state(np.asarray(SEED_T), np.asarray(SEED_P, dtype=np.float32))
    np.testing.assert_allclose(float(m.result()), 0.45814306, rtol=1e-6)


def test_zero_weights_give_zero(backend: ArrayBackend) -> None:
    m = KLDivergence()
    m.update_state(backend.asarray(SEED_T), backend.asarray(SEED_P), sample_weight=backend.asarray([0.0, 0.0]))
    assert _f(backend, m.result()) == 0.0


# -- state: library, device, dtype --------------------------------------------------------------


def test_state_stays_in_the_library_and_device(backend: ArrayBackend) -> None:
    m = KLDivergence()
    m.update_state(backend.asarray(SEED_T), backend.asarray(SEED_P))
    total, count = m.variables
    for v in (total, count):
        assert backend.is_native(v)
        assert tuple(v.shape) == ()
        assert v.dtype == backend.dtype("float64")  # every CPU backend here has float64
    assert _f(backend, count) == 2.0
    if _lib(backend) not in ("numpy", "dask"):
        assert m.device == kldiv._namespace.get_device(backend.asarray(SEED_P))


@pytest.mark.parametrize(
    ("weight", "expected_count"),
    [
        ([0.8, 0.2], 1.0),
        (np.array([[0.8], [0.2]]), 1.0),  # rank + 1 with a trailing 1: squeezed
        (2.0, 4.0),  # scalar: every sample
    ],
)
def test_sample_weight_forms(backend: ArrayBackend, weight: Any, expected_count: float) -> None:
    m = KLDivergence()
    w = weight if isinstance(weight, float) else backend.asarray(np.asarray(weight, dtype=np.float32))
    m.update_state(backend.asarray(SEED_T), backend.asarray(SEED_P), sample_weight=w)
    loss = oracle(SEED_T, np.float32(SEED_P))
    wb = np.broadcast_to(np.asarray(weight, dtype=np.float64).reshape(-1) if not isinstance(weight, float)
                         else np.float64(weight), loss.shape)
    np.testing.assert_allclose(_f(backend, m.variables[1]), expected_count, rtol=1e-7)
    np.testing.assert_allclose(_f(backend, m.result()), (wb * loss).sum() / wb.sum(), rtol=1e-6)


def test_rank3_weight_of_lower_rank_scales_rows(backend: ArrayBackend) -> None:
    rng = np.random.default_rng(7)
    t = rng.random((2, 3, 4)).astype(np.float32)
    p = rng.random((2, 3, 4)).astype(np.float32)
    m = KLDivergence()
    m.update_state(backend.asarray(t), backend.asarray(p), sample_weight=backend.asarray([1.0, 0.0]))
    loss = oracle(t, p)  # (2, 3)
    np.testing.assert_allclose(_f(backend, m.result()), loss[0].mean(), rtol=1e-6)
    np.testing.assert_allclose(_f(backend, m.variables[1]), 3.0)


def test_result_matches_loss_class_over_batches(backend: ArrayBackend) -> None:
    rng = np.random.default_rng(1)
    t = rng.dirichlet(np.ones(6), size=300).astype(np.float32)
    p = rng.dirichlet(np.ones(6), size=300).astype(np.float32)
    w = rng.random(300).astype(np.float32)
    m = KLDivergence()
    for i in range(0, 300, 64):
        m.update_state(backend.asarray(t[i:i + 64]), backend.asarray(p[i:i + 64]),
                       sample_weight=backend.asarray(w[i:i + 64]))
    expected = kldiv.KLDivergence(reduction="mean_with_sample_weight")(t, p, sample_weight=w)
    np.testing.assert_allclose(_f(backend, m.result()), float(expected), rtol=1e-6)


# -- merge_state ----------------------------------------------------------------------------------


def test_merge_state(backend: ArrayBackend) -> None:
    rng = np.random.default_rng(2)
    t = rng.dirichlet(np.ones(4), size=90).astype(np.float32)
    p = rng.dirichlet(np.ones(4), size=90).astype(np.float32)
    whole = KLDivergence()
    whole.update_state(backend.asarray(t), backend.asarray(p))
    workers = [KLDivergence() for _ in range(3)]
    for k, w in enumerate(workers):
        w.update_state(backend.asarray(t[k * 30:(k + 1) * 30]), backend.asarray(p[k * 30:(k + 1) * 30]))
    head, empty = KLDivergence(), KLDivergence()
    head.merge_state(empty, *workers)  # into an empty metric; an empty one is skipped
    np.testing.assert_allclose(_f(backend, head.result()), _f(backend, whole.result()), rtol=1e-6)
    # the merged-from metrics are untouched
    np.testing.assert_allclose(_f(backend, workers[0].variables[1]), 30.0)
    head.merge_state()  # nothing: fine
    with pytest.raises(TypeError, match="KLDivergence"):
        head.merge_state(kldiv.KLDivergence())  # the loss class is not a metric


def test_merge_state_of_pickled_workers(backend: ArrayBackend) -> None:
    """Workers' metrics travel as pickles (e.g. from Dask or multiprocessing) and merge."""
    if _lib(backend) == "jax":
        pytest.importorskip("jax")
    a, b = KLDivergence(), KLDivergence()
    a.update_state(backend.asarray(SEED_T), backend.asarray(SEED_P), sample_weight=backend.asarray([1.0, 0.0]))
    b.update_state(backend.asarray(SEED_T), backend.asarray(SEED_P))
    a2 = pickle.loads(pickle.dumps(a))
    assert a2.get_config() == a.get_config()
    np.testing.assert_allclose(_f(backend, a2.result()), 0.9162892, rtol=1e-7)
    a2.merge_state(pickle.loads(pickle.dumps(b)))
    np.testing.assert_allclose(_f(backend, a2.result()), 0.61085844, rtol=1e-7)


# -- mixing libraries or devices is an error ------------------------------------------------------


def test_mixing_libraries_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    m = KLDivergence()
    m.update_state(np.asarray(SEED_T, np.float32), np.asarray(SEED_P, np.float32))
    with pytest.raises(TypeError, match=r"numpy state.*torch arrays"):
        m.update_state(torch.tensor(SEED_T), torch.tensor(SEED_P))
    other = KLDivergence()
    other.update_state(torch.tensor(SEED_T), torch.tensor(SEED_P))
    with pytest.raises(TypeError, match=r"numpy state.*torch"):
        m.merge_state(other)
    # y_true of another library is fine: it is converted to y_pred's
    m.update_state(torch.tensor(SEED_T), np.asarray(SEED_P, np.float32))
    np.testing.assert_allclose(float(m.result()), 0.45814306, rtol=1e-6)


def test_mixing_devices_is_a_clear_error() -> None:
    xps = pytest.importorskip("array_api_strict")
    d0, d1 = xps.Device("CPU_DEVICE"), xps.Device("device1")
    m = KLDivergence()
    m.update_state(xps.asarray(SEED_T, device=d0), xps.asarray(SEED_P, device=d0, dtype=xps.float32))
    with pytest.raises(ValueError, match=r"device.*CPU_DEVICE.*device1"):
        m.update_state(xps.asarray(SEED_T, device=d1), xps.asarray(SEED_P, device=d1, dtype=xps.float32))
    other = KLDivergence()
    other.update_state(xps.asarray(SEED_T, device=d1), xps.asarray(SEED_P, device=d1, dtype=xps.float32))
    with pytest.raises(ValueError, match="device"):
        m.merge_state(other)


def test_mixing_torch_devices_is_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    m = KLDivergence()
    m.update_state(torch.tensor(SEED_T), torch.tensor(SEED_P))
    with pytest.raises(ValueError, match=r"device cpu.*device meta"):
        m.update_state(torch.tensor(SEED_T, device="meta"), torch.tensor(SEED_P, device="meta"))


# -- no host synchronisation, no autograd graph in the state -------------------------------------


def test_jax_updates_never_read_back_to_the_host() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    t, p, w = jnp.asarray(SEED_T), jnp.asarray(SEED_P, dtype=jnp.float32), jnp.asarray([1.0, 0.0])
    m = KLDivergence()
    with jax.transfer_guard_device_to_host("disallow"):
        m.update_state(t, p, sample_weight=w)
        m.update_state(t, p)
        r = m.result()
        other = KLDivergence()
        other.update_state(t, p)
        m.merge_state(other)
    np.testing.assert_allclose(np.asarray(r), 0.61085844, rtol=1e-7)


def test_torch_updates_never_read_back_to_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    t, p = torch.tensor(SEED_T), torch.tensor(SEED_P)
    w = torch.tensor([1.0, 0.0])

    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("a host read-back on the hot path")

    m = KLDivergence()
    m.update_state(t, p)  # first update creates the state (caches warm)
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    m.update_state(t, p, sample_weight=w)
    r = m.result()
    monkeypatch.undo()
    np.testing.assert_allclose(r.item(), (0.9162892 * 2 - 3.0809074e-06) / 3, rtol=1e-6)


def test_torch_state_holds_no_autograd_graph() -> None:
    torch = pytest.importorskip("torch")
    p = torch.tensor(SEED_P, requires_grad=True)
    m = KLDivergence()
    m.update_state(torch.tensor(SEED_T), p)
    assert all(not v.requires_grad for v in m.variables)
    assert not m.result().requires_grad


def test_dask_metric_is_lazy() -> None:
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")

    def no_compute(*_: Any, **__: Any) -> Any:
        raise AssertionError("computed before .compute()")

    t = da.from_array(np.asarray(SEED_T, np.float32), chunks=1)
    p = da.from_array(np.asarray(SEED_P, np.float32), chunks=1)
    m = KLDivergence()
    with dask.config.set(scheduler=no_compute):
        m.update_state(t, p, sample_weight=da.from_array(np.array([1.0, 0.0]), chunks=1))
        m.update_state(t, p)
        r = m.result()
    assert isinstance(r, da.Array)
    assert str(r.compute()) == "0.61085844"


# -- precision over long streams -----------------------------------------------------------------


def _stream(rows: int, batch: int, seed: int = 3) -> Any:
    rng = np.random.default_rng(seed)
    for _ in range(rows // batch):
        t = rng.random((batch, 2), dtype=np.float32)
        p = rng.random((batch, 2), dtype=np.float32)
        yield t, p


def _ulps(a: float, b: float) -> float:
    return abs(np.float32(a) - np.float32(b)) / np.spacing(np.float32(b))


def test_ten_million_rows_lose_no_precision(backend: ArrayBackend) -> None:
    """10^7 rows in 10 batches: the float32 result is the exact mean, to the last bit (±1 ulp)."""
    m = KLDivergence()
    exact = 0.0
    for t, p in _stream(10**7, 10**6):
        bt, bp = backend.asarray(t), backend.asarray(p)
        m.update_state(bt, bp)
        # the backend's own per-sample losses, summed in float64 (the exact reference)
        exact += float(backend.to_numpy(kldiv.kld(bt, bp)).astype(np.float64).sum())
    assert m.variables[0].dtype == backend.dtype("float64")
    res = _f(backend, m.result())
    assert _ulps(res, exact / 10**7) <= 1


def _float32_stream_check(make: Any, to_numpy: Any, rows: int, batch: int) -> tuple[float, float, float]:
    """(ulps off of the compensated metric, ulps off of naive float32 accumulation, ratio)."""
    m = KLDivergence()
    exact = 0.0
    naive = np.float32(0.0)
    for t, p in _stream(rows, batch, seed=5):
        bt, bp = make(t), make(p)
        m.update_state(bt, bp)
        loss = to_numpy(kldiv.kld(bt, bp))
        exact += float(loss.astype(np.float64).sum())
        naive = np.float32(naive + loss.sum(dtype=np.float32))
    assert m.variables[0].dtype == m._total.value.dtype  # type: ignore[union-attr]
    res = float(to_numpy(m.result()))
    return _ulps(res, exact / rows), _ulps(float(naive / np.float32(rows)), exact / rows), res


def test_float32_only_device_uses_compensated_summation() -> None:
    """array_api_strict's 'no_float64' device: a real float32-only device, 10^7 rows in 10^4 updates."""
    xps = pytest.importorskip("array_api_strict")
    dev = xps.Device("no_float64")

    def to_np(x: Any) -> np.ndarray:
        return np.asarray(x.to_device(xps.Device("CPU_DEVICE")))

    m = KLDivergence()
    m.update_state(xps.asarray(SEED_T, device=dev, dtype=xps.float32),
                   xps.asarray(SEED_P, device=dev, dtype=xps.float32),
                   sample_weight=xps.asarray([1.0, 0.0], device=dev, dtype=xps.float32))
    assert m._total is not None and m._total.comp is not None
    assert m._total.value.dtype == xps.float32
    assert str(to_np(m.result())) == "0.9162892"
    m.update_state(xps.asarray(SEED_T, device=dev, dtype=xps.float32),
                   xps.asarray(SEED_P, device=dev, dtype=xps.float32))
    assert str(to_np(m.result())) == "0.61085844"

    good, naive, _ = _float32_stream_check(
        lambda a: xps.asarray(a, device=dev), to_np, rows=10**7, batch=1000)
    assert good <= 1, f"compensated float32 accumulation is {good} ulps off"
    assert naive > 4 * max(good, 1), "the stream is too easy to show the compensation"


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax"])
def test_forced_float32_accumulation(lib: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where float64 is missing (torch on MPS, JAX without x64), float32 + compensation."""
    monkeypatch.setattr(metrics, "has_float64", lambda xp, device: False)
    if lib == "numpy":
        make, to_numpy = np.asarray, np.asarray
    elif lib == "torch":
        torch = pytest.importorskip("torch")
        make, to_numpy = torch.from_numpy, lambda x: x.numpy()
    else:
        jnp = pytest.importorskip("jax.numpy")
        make, to_numpy = jnp.asarray, np.asarray
    good, _, _ = _float32_stream_check(make, to_numpy, rows=2 * 10**6, batch=500)
    assert good <= 1, f"compensated float32 accumulation is {good} ulps off"


@pytest.mark.parametrize("lib", ["numpy", "array_api_strict", "torch", "jax"])
def test_running_sum_keeps_what_float32_drops(lib: str) -> None:
    """1 + 2000 * 3e-8 in float32: each addend is below half an ulp of 1 (naive: exactly 1)."""
    if lib == "numpy":
        make: Any = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
    elif lib == "array_api_strict":
        xps = pytest.importorskip("array_api_strict")
        make = lambda v: xps.asarray(v, dtype=xps.float32)  # noqa: E731
    elif lib == "torch":
        torch = pytest.importorskip("torch")
        make = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    else:
        jnp = pytest.importorskip("jax.numpy")
        make = lambda v: jnp.asarray(v, dtype=jnp.float32)  # noqa: E731
    n = 2000
    s = metrics.RunningSum(make(1.0), compensated=True)
    naive = make(1.0)
    tiny = make(3e-8)
    for _ in range(n):
        s.add(tiny)
        naive = naive + tiny
    total = s.total()
    assert float(naive) == 1.0
    np.testing.assert_allclose(float(total), 1.0 + n * np.float64(np.float32(3e-8)), rtol=1e-7)


def test_jax_without_x64_accumulates_float32_with_compensation() -> None:
    """In a fresh process with JAX's default (x64 off): float32 state plus compensation."""
    pytest.importorskip("jax")
    code = textwrap.dedent(
        """
        import json, numpy as np, jax, jax.numpy as jnp
        assert not jax.config.read("jax_enable_x64")
        from kldiv.metrics import KLDivergence
        import kldiv
        t, p = jnp.asarray([[0., 1.], [0., 0.]]), jnp.asarray([[.6, .4], [.4, .6]])
        m = KLDivergence(dtype="float64")
        m.update_state(t, p, sample_weight=[1, 0])
        r1 = str(np.asarray(m.result()))
        m.update_state(t, p)
        out = {"r1": r1, "r2": str(np.asarray(m.result())), "dtype": str(m._total.value.dtype),
               "comp": m._total.comp is not None, "result_dtype": str(m.result().dtype)}
        rng = np.random.default_rng(11)
        m = KLDivergence()
        exact, naive, rows = 0.0, np.float32(0), 0
        for _ in range(2000):
            a = jnp.asarray(rng.random((500, 2), dtype=np.float32))
            b = jnp.asarray(rng.random((500, 2), dtype=np.float32))
            m.update_state(a, b)
            loss = np.asarray(kldiv.kld(a, b))
            exact += float(loss.astype(np.float64).sum()); rows += 500
            naive = np.float32(naive + loss.sum(dtype=np.float32))
        ref = np.float32(exact / rows)
        out["ulps"] = float(abs(np.float32(m.result()) - ref) / np.spacing(ref))
        out["naive_ulps"] = float(abs(naive / np.float32(rows) - ref) / np.spacing(ref))
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["r1"] == "0.9162892" and out["r2"] == "0.61085844"
    assert out["dtype"] == "float32" and out["comp"] is True
    assert out["result_dtype"] == "float32"  # no float64 without x64: the result is float32
    assert out["ulps"] <= 1
    assert out["naive_ulps"] > 2 * max(out["ulps"], 1)


def test_has_float64_rules() -> None:
    import array_api_compat

    xps = pytest.importorskip("array_api_strict")
    torch = pytest.importorskip("torch")
    assert metrics.has_float64(array_api_compat.array_namespace(np.zeros(1)), "cpu")
    assert not metrics.has_float64(xps, xps.Device("no_float64"))
    assert metrics.has_float64(xps, xps.Device("CPU_DEVICE"))
    tx = array_api_compat.array_namespace(torch.zeros(1))
    assert metrics.has_float64(tx, torch.device("cpu"))
    assert not metrics.has_float64(tx, torch.device("mps"))


def test_dask_state_is_a_tree_not_a_chain() -> None:
    """20000 lazy updates: a chain of additions would take minutes (and overflow the stack)."""
    da = pytest.importorskip("dask.array")
    one = da.from_array(np.float64(1.0))
    s = metrics.RunningSum(one, compensated=False)
    for _ in range(20000):
        s.add(one)
    s.add(2)
    total = s.total()
    assert isinstance(total, da.Array)
    assert float(total.compute()) == 20003.0
    other = metrics.RunningSum(one, compensated=False)
    other.add(one)
    s.merge(other)
    assert float(s.total().compute()) == 20005.0


def test_dask_metric_over_many_updates() -> None:
    da = pytest.importorskip("dask.array")
    t = da.from_array(np.asarray(SEED_T, np.float32), chunks=1)
    p = da.from_array(np.asarray(SEED_P, np.float32), chunks=1)
    m = KLDivergence()
    m.update_state(t, p, sample_weight=[1.0, 0.0])
    for _ in range(199):
        m.update_state(t, p)
    expected = (0.9162892 * 200 - 199 * 3.0809074e-06) / 399
    np.testing.assert_allclose(float(m.result().compute()), expected, rtol=1e-6)


# -- error messages name the class unambiguously (the loss is also called KLDivergence) ----------


def test_merge_state_of_a_loss_names_both_classes_fully() -> None:
    m = KLDivergence()
    with pytest.raises(TypeError, match=r"kldiv\.metrics\.KLDivergence.*got kldiv\.losses\.KLDivergence \(a loss"):
        m.merge_state(kldiv.KLDivergence())
    with pytest.raises(TypeError, match=r"got numpy\.ndarray\."):
        m.merge_state(np.zeros(2))
    with pytest.raises(TypeError, match=r"got int\."):
        m.merge_state(3)  # type: ignore[arg-type]


def test_every_metric_error_names_the_metric_class_fully() -> None:
    torch = pytest.importorskip("torch")
    qualified = r"kldiv\.metrics\.KLDivergence"
    m = KLDivergence()
    m.update_state(np.asarray(SEED_T, np.float32), np.asarray(SEED_P, np.float32))
    with pytest.raises(TypeError, match=qualified + r"\(name=.*numpy state.*torch arrays"):
        m.update_state(torch.tensor(SEED_T), torch.tensor(SEED_P))
    other = KLDivergence(name="worker")
    other.update_state(torch.tensor(SEED_T), torch.tensor(SEED_P))
    with pytest.raises(TypeError, match=qualified + r".*merge_state\(" + qualified + r"\(name='worker'"):
        m.merge_state(other)
    with pytest.raises(ValueError, match=qualified + " dtype"):
        KLDivergence(dtype="int32")
    with pytest.raises(TypeError, match=qualified + " name must be a str, got int"):
        KLDivergence(name=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=qualified + " config names function"):
        KLDivergence.from_config({"name": "kl", "fn": "mean_squared_error"})
    with pytest.raises(TypeError, match="Unknown " + qualified + " config keys"):
        KLDivergence.from_config({"name": "kl", "reduction": "sum"})


def test_dtype_objects_of_every_library_and_keras_policies() -> None:
    class Policy:  # what a Keras DTypePolicy exposes
        name = "mixed_bfloat16"
        compute_dtype = "bfloat16"

    class TFDType:  # what a TensorFlow DType exposes (np.dtype() cannot read it)
        name = "float64"

        def __repr__(self) -> str:
            return "<dtype: 'float64'>"

    assert KLDivergence(dtype=Policy()).dtype == "bfloat16"
    assert KLDivergence(dtype=TFDType()).dtype == "float64"
    assert KLDivergence(dtype="mixed_float16").dtype == "float16"
    torch = pytest.importorskip("torch")
    assert KLDivergence(dtype=torch.float64).dtype == "float64"


def test_pickle_rebuilds_through_the_constructor() -> None:
    """A pickled metric is rebuilt with its config and state (never a half-made object)."""
    m = KLDivergence(name="kl", dtype="float64")
    m.update_state(SEED_T, SEED_P, sample_weight=[1, 0])
    func = m.__reduce__()[0]
    assert func is metrics._restore_metric
    copy = pickle.loads(pickle.dumps(m))
    assert type(copy) is type(m) and copy.get_config() == m.get_config()
    assert copy.result().dtype == np.float64 and copy.result() == m.result()
    assert str(np.float32(copy.result())) == "0.9162892"
    copy.update_state(SEED_T, SEED_P)
    assert str(np.float32(copy.result())) == "0.61085844"
    assert str(np.float32(m.result())) == "0.9162892"  # the original is untouched
    fresh = pickle.loads(pickle.dumps(KLDivergence()))
    assert fresh.variables == [] and fresh.library is None


def test_numpy_result_is_a_numpy_scalar() -> None:
    """The metric follows the package's rule: a reduced NumPy result is a NumPy scalar of the
    result dtype (also before any update)."""
    m = KLDivergence()
    assert type(m.result()) is np.float32
    m.update_state(np.array([[0, 1], [0, 0]], np.float32), np.array([[.6, .4], [.4, .6]], np.float32))
    assert type(m.result()) is np.float32
    assert type(KLDivergence(dtype="float64").result()) is np.float64
