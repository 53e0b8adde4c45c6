"""The functional API (SPEC §1-2) on every backend, against SPEC's numbers and a float64 oracle."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, Backend, oracle
from kldiv import _namespace

SEED_T = [[0.0, 1.0], [0.0, 0.0]]
SEED_P = [[0.6, 0.4], [0.4, 0.6]]


def test_aliases_are_one_object_everywhere() -> None:
    fns = [
        getattr(mod, name)
        for mod in (kldiv, kldiv.losses, kldiv.metrics)
        for name in ("kl_divergence", "kld", "KLD", "kullback_leibler_divergence")
    ]
    assert all(f is kldiv.kl_divergence for f in fns)


def test_seed_1d(backend: ArrayBackend) -> None:
    out = kldiv.KLD(backend.asarray([0.4, 0.9, 0.2]), backend.asarray([0.5, 0.8, 0.12]))
    assert backend.is_native(out)
    assert tuple(out.shape) == ()
    np.testing.assert_allclose(backend.to_numpy(out), 0.11891246, rtol=1e-6)


def test_seed_2d(backend: ArrayBackend) -> None:
    out = kldiv.kl_divergence(backend.asarray(SEED_T), backend.asarray(SEED_P))
    assert backend.is_native(out)
    assert out.dtype == backend.dtype("float32")
    got = backend.to_numpy(out)
    np.testing.assert_allclose(got, [0.9162892, -3.0809074e-06], rtol=2e-6)
    assert got[1] < 0  # the small negative value from the clipping is kept


def test_float64_seed_example_exact_numpy() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y_true = rng.integers(0, 2, size=(2, 3)).astype(np.float64)
        y_pred = rng.random(size=(2, 3))
        loss = kldiv.kullback_leibler_divergence(y_true, y_pred)
        assert loss.shape == (2,)
        t = np.clip(y_true, 1e-7, 1)
        p = np.clip(y_pred, 1e-7, 1)
        assert np.array_equal(loss, np.sum(t * np.log(t / p), axis=-1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 3, 4), (2, 1, 3, 5), (0, 4), (3, 0)])
def test_matches_float64_oracle(backend: ArrayBackend, dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape) + len(shape))
    t = rng.uniform(-0.2, 1.3, size=shape).astype(dtype)
    p = rng.uniform(-0.2, 1.3, size=shape).astype(dtype)
    out = kldiv.kld(backend.asarray(t), backend.asarray(p))
    assert backend.is_native(out)
    assert out.dtype == backend.dtype(dtype)
    assert tuple(out.shape) == shape[:-1]
    rtol, atol = (1e-5, 1e-5) if dtype == "float32" else (1e-12, 1e-12)
    np.testing.assert_allclose(backend.to_numpy(out), oracle(t, p), rtol=rtol, atol=atol)


def test_clipping_and_nan(backend: ArrayBackend) -> None:
    out = backend.to_numpy(kldiv.kld(backend.asarray([[2.0, 3.0]]), backend.asarray([[1.0, 1.0]])))
    np.testing.assert_array_equal(out, [0.0])
    out = backend.to_numpy(kldiv.kld(backend.asarray([[np.nan, 1.0]]), backend.asarray([[0.5, 0.5]])))
    assert np.isnan(out).all() and out.shape == (1,)


def test_broadcasting(backend: ArrayBackend) -> None:
    t = np.array([[0.3, 0.7]], dtype=np.float32)
    p = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)
    out = kldiv.kld(backend.asarray(t), backend.asarray(p))
    assert tuple(out.shape) == (2,)
    np.testing.assert_allclose(backend.to_numpy(out), oracle(t, p), rtol=1e-5)


# (y_true shape, y_pred shape): the function broadcasts plainly, as tf.keras.losses.kld and
# keras.losses.kl_divergence do (checked against both in tests/test_parity.py); the rank squeeze
# is the loss class's (tests/test_loss_class.py).
BROADCAST_PAIRS = [
    ((3, 1), (3,)), ((3,), (3, 1)), ((3, 1), (5, 3, 1)), ((5, 3, 1), (3, 1)), ((2, 1), (2,)),
    ((2, 1, 1), (2, 1)), ((2, 1), (2, 1, 1)), ((1,), (3,)), ((2, 3), (3,)), ((4, 1), (4, 1)),
    ((0, 1), (0,)), ((3, 2, 1), (2,)), ((1, 1), (1,)),
]


@pytest.mark.parametrize(("t_shape", "p_shape"), BROADCAST_PAIRS)
def test_function_broadcasts_like_the_keras_function(
    backend: ArrayBackend, t_shape: tuple[int, ...], p_shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(len(t_shape) * 10 + len(p_shape))
    t = rng.random(t_shape).astype(np.float32)
    p = rng.random(p_shape).astype(np.float32)
    out = kldiv.kld(backend.asarray(t), backend.asarray(p))
    want = oracle(t, p)  # NumPy broadcasting, then the sum over the last axis
    assert tuple(out.shape) == np.broadcast_shapes(t_shape, p_shape)[:-1] == want.shape
    np.testing.assert_allclose(backend.to_numpy(out), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("t_shape", "p_shape"), [((2, 3), (2, 3, 1)), ((2, 3, 1), (2, 3)), ((5, 1), (3, 1)), ((3, 2), (3,))]
)
def test_function_shape_errors_name_the_shapes_given(
    backend: ArrayBackend, t_shape: tuple[int, ...], p_shape: tuple[int, ...]
) -> None:
    t = backend.asarray(np.ones(t_shape, np.float32))
    p = backend.asarray(np.ones(p_shape, np.float32))
    pattern = re.escape(f"y_true of shape {_s(t_shape)} and y_pred of shape {_s(p_shape)} do not broadcast")
    with pytest.raises(ValueError, match=pattern):
        kldiv.kld(t, p)


def _s(shape: tuple[int, ...]) -> str:
    return str(shape)


def test_python_lists_and_scalars() -> None:
    out = kldiv.KLD([0.4, 0.9, 0.2], [0.5, 0.8, 0.12])
    assert isinstance(out, (np.ndarray, np.float32)) and out.dtype == np.float32
    assert float(out) == pytest.approx(0.11891246, rel=1e-6)
    # scalar y_true broadcasts against y_pred's rows
    out = kldiv.kld(0.5, np.array([[0.5, 0.5]], dtype=np.float32))
    np.testing.assert_allclose(out, [0.0], atol=1e-7)
    # tuples too
    out = kldiv.kld(((0.0, 1.0), (0.0, 0.0)), ((0.6, 0.4), (0.4, 0.6)))
    np.testing.assert_allclose(out, [0.9162892, -3.0809074e-06], rtol=2e-6)


@pytest.mark.parametrize("true_dtype", ["int64", "bool", "float64", "float16"])
def test_y_true_cast_to_y_pred_dtype(backend: ArrayBackend, true_dtype: str) -> None:
    if true_dtype == "float16" and backend.name in {"array_api_strict", "dask"}:
        pytest.skip(f"{backend.name} fixture has no float16 inputs")
    t = np.array([[0, 1], [1, 0]]).astype(true_dtype)
    p = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)
    out = kldiv.kld(backend.asarray(t), backend.asarray(p))
    assert out.dtype == backend.dtype("float32")
    np.testing.assert_allclose(backend.to_numpy(out), oracle(t, p), rtol=1e-5)


@pytest.mark.parametrize("pred_dtype", ["int32", "int64", "bool"])
def test_integer_and_bool_y_pred_become_float32(backend: ArrayBackend, pred_dtype: str) -> None:
    p = np.array([[0, 1], [1, 1]]).astype(pred_dtype)
    t = np.array([[0.5, 0.5], [0.2, 0.8]], dtype=np.float32)
    out = kldiv.kld(backend.asarray(t), backend.asarray(p))
    assert out.dtype == backend.dtype("float32")
    np.testing.assert_allclose(backend.to_numpy(out), oracle(t, p), rtol=1e-5)


@pytest.mark.parametrize("low", ["float16", "bfloat16"])
def test_half_precision_computed_in_float32(backend: ArrayBackend, low: str) -> None:
    if low not in backend.float_dtypes:
        pytest.skip(f"{backend.name} has no {low}")
    mod = backend.module
    t = mod.asarray([[1.0, 0.0]], dtype=backend.dtype(low))
    p = mod.asarray([[1e-8, 1.0]], dtype=backend.dtype(low))
    if backend.name.startswith("torch"):
        t, p = t.to(backend.device), p.to(backend.device)
    out = kldiv.kld(t, p)
    assert out.dtype == backend.dtype(low)
    got = backend.to_numpy(out).astype(np.float64)
    assert np.isfinite(got).all()  # Keras overflows to inf here
    # the float32 value of the clipped inputs, rounded to the low-precision dtype
    t32 = backend.to_numpy(t).astype(np.float32)
    p32 = backend.to_numpy(p).astype(np.float32)
    want = np.asarray(oracle(t32, p32), dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-2)


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_computed_in_float32(lib: str, fmt: str) -> None:
    """float8 inputs (ml_dtypes for NumPy, torch, JAX) take the float16 route: computed in
    float32 and rounded back, never a backend error or NaN."""
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed")
    t = np.array([[0.0, 1.0], [0.0, 0.0], [0.3, 0.7]], np.float32)
    p = np.array([[0.6, 0.4], [0.4, 0.6], [0.5, 0.5]], np.float32)
    if lib == "numpy":
        dt = getattr(ml_dtypes, fmt)
        t8, p8 = t.astype(dt), p.astype(dt)
        back = np.asarray
    elif lib == "torch":
        torch = pytest.importorskip("torch", reason="torch is not installed")
        dt = getattr(torch, fmt)
        t8, p8 = torch.tensor(t).to(dt), torch.tensor(p).to(dt)
        def back(x: Any) -> np.ndarray:
            return x.float().numpy()
    else:
        jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
        dt = getattr(jnp, fmt)
        t8, p8 = jnp.asarray(t, dtype=dt), jnp.asarray(p, dtype=dt)
        back = np.asarray
    t32 = np.asarray(back(t8), np.float32)
    p32 = np.asarray(back(p8), np.float32)
    want = np.asarray(oracle(t32, p32), np.float32).astype(getattr(ml_dtypes, fmt))
    out = kldiv.kld(t8, p8)
    assert out.dtype == dt
    np.testing.assert_array_equal(np.asarray(back(out), np.float32), want.astype(np.float32))
    loss = kldiv.KLDivergence()(t8, p8)
    assert loss.dtype == dt
    mean = np.float32(np.mean(np.asarray(oracle(t32, p32), np.float32)))
    np.testing.assert_allclose(np.asarray(back(loss), np.float32), mean, rtol=0.15)


def _make(kind: str, arr: np.ndarray) -> object:
    if kind == "list":
        return arr.tolist()
    if kind == "numpy":
        return arr
    return Backend(kind).handle().asarray(arr)


MIX = ["numpy", "torch", "jax", "list"]


@pytest.mark.parametrize("true_kind", MIX)
@pytest.mark.parametrize("pred_kind", MIX)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mixed_libraries_follow_y_pred(true_kind: str, pred_kind: str, dtype: str) -> None:
    t = np.array(SEED_T, dtype=dtype)
    p = np.array(SEED_P, dtype=dtype)
    y_true, y_pred = _make(true_kind, t), _make(pred_kind, p)
    out = kldiv.kld(y_true, y_pred)
    if pred_kind == "list":
        assert isinstance(out, np.ndarray)
        assert out.dtype == np.float32  # Python floats are Keras floatx
    else:
        b = Backend(pred_kind).handle()
        assert b.is_native(out)
        assert out.dtype == b.dtype(dtype)
        assert str(kldiv._namespace.get_device(out)) == str(kldiv._namespace.get_device(y_pred))
    np.testing.assert_allclose(_to_np(out), oracle(t, p), rtol=2e-6, atol=1e-9)


def _to_np(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()  # type: ignore[no-any-return, attr-defined]
    return np.asarray(x)


def test_y_true_requiring_grad_from_torch_into_numpy() -> None:
    torch = Backend.TORCH.handle().module
    t = torch.tensor(SEED_T, requires_grad=True)
    out = kldiv.kld(t, np.array(SEED_P, dtype=np.float32))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [0.9162892, -3.0809074e-06], rtol=2e-6)


def test_dask_stays_lazy() -> None:
    b = Backend.DASK.handle()
    da = b.module
    dask = pytest.importorskip("dask")
    calls = []

    def make(block_info: object = None) -> np.ndarray:
        calls.append(1)
        return np.full((2, 3), 0.5, dtype=np.float32)

    p = da.map_blocks(make, chunks=((2,), (3,)), dtype=np.float32, meta=np.empty((0, 0), np.float32))
    out = kldiv.kld(np.full((2, 3), 0.25, dtype=np.float32), p)
    assert isinstance(out, da.Array)
    assert calls == []  # nothing computed yet
    with dask.config.set(scheduler="synchronous"):
        got = out.compute()
    assert calls
    np.testing.assert_allclose(got, oracle(np.full((2, 3), 0.25), np.full((2, 3), 0.5)), rtol=1e-6)
    # a Dask y_true with a NumPy y_pred keeps the computation lazy too
    out = kldiv.kld(da.from_array(np.array(SEED_T, dtype=np.float32)), np.array(SEED_P, dtype=np.float32))
    assert isinstance(out, da.Array)
    np.testing.assert_allclose(out.compute(), [0.9162892, -3.0809074e-06], rtol=2e-6)


@pytest.mark.parametrize("generic", [False, True])
def test_fast_and_generic_switch_agree(backend: ArrayBackend, generic: bool) -> None:
    rng = np.random.default_rng(3)
    t = rng.random((33, 17))
    p = rng.random((33, 17))
    with kldiv.use_generic(generic):
        out = backend.to_numpy(kldiv.kld(backend.asarray(t), backend.asarray(p)))
    np.testing.assert_allclose(out, oracle(t, p), rtol=1e-12)


def test_env_switch_forces_generic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLDIV_GENERIC", "1")
    assert kldiv.backends.generic_forced()
    assert kldiv.backends.fast_path("numpy") is None
    monkeypatch.setenv("KLDIV_GENERIC", "0")
    assert not kldiv.backends.generic_forced()
    with kldiv.use_generic():
        assert kldiv.backends.generic_forced()
    assert not kldiv.backends.generic_forced()


@pytest.mark.parametrize("pred_kind", ["torch", "jax", "array_api_strict"])
def test_dask_y_true_follows_non_numpy_y_pred(pred_kind: str) -> None:
    da = Backend.DASK.handle().module
    b = Backend(pred_kind).handle()
    t = np.array(SEED_T, dtype=np.float32)
    out = kldiv.kld(da.from_array(t, chunks=1), b.asarray(np.array(SEED_P, dtype=np.float32)))
    assert b.is_native(out)  # y_pred's library, device and dtype (SPEC §2), y_true computed
    assert out.dtype == b.dtype("float32")
    np.testing.assert_allclose(b.to_numpy(out), [0.9162892, -3.0809074e-06], rtol=2e-6)


@pytest.mark.parametrize("order", [">f8", ">f4"])
def test_big_endian_numpy_inputs(order: str) -> None:
    rng = np.random.default_rng(9)
    t, p = rng.random((6, 5)), rng.random((6, 5))
    native = order.replace(">", "=")
    out = kldiv.kld(t.astype(order), p.astype(order))
    assert out.dtype == np.dtype(native)
    assert np.array_equal(out, kldiv.kld(t.astype(native), p.astype(native)))
    loss = kldiv.KLDivergence()(t.astype(native), p.astype(native), sample_weight=np.arange(6.0).astype(">f8"))
    np.testing.assert_allclose(loss, (oracle(t, p) * np.arange(6.0)).mean(), rtol=1e-5)


@pytest.mark.parametrize("layout", ["C", "F", "transposed", "strided"])
def test_float64_seed_example_exact_any_layout(layout: str) -> None:
    rng = np.random.default_rng(1)
    t = rng.integers(0, 2, size=(300, 50)).astype(np.float64)
    p = rng.random(size=(300, 50))
    if layout == "F":
        t, p = np.asfortranarray(t), np.asfortranarray(p)
    elif layout == "transposed":
        t, p = t.T, p.T
    elif layout == "strided":
        t, p = t[::2, ::3], p[::2, ::3]
    yt, yp = np.clip(t, 1e-7, 1), np.clip(p, 1e-7, 1)
    assert np.array_equal(kldiv.kld(t, p), np.sum(yt * np.log(yt / yp), axis=-1))


def _layouts(t: np.ndarray, p: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    t3, p3 = t.reshape(6, -1, t.shape[-1]), p.reshape(6, -1, p.shape[-1])
    return {
        "C": (t, p),
        "F": (np.asfortranarray(t), np.asfortranarray(p)),
        "transposed": (t.T, p.T),
        "strided": (t[::2, ::3], p[::2, ::3]),
        "reversed": (t[::-1, ::-1], p[::-1, ::-1]),
        "mixed C/F": (t, np.asfortranarray(p)),
        "3-d permuted": (t3.transpose(1, 0, 2), np.asfortranarray(p3.transpose(1, 0, 2))),
        "3-d F": (np.asfortranarray(t3), np.asfortranarray(p3)),
        "broadcast row": (t[:1], p),
    }


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("rows", [12, 600])  # below and above the fast path's small-input cut
def test_generic_kernel_is_the_formula_as_written_in_any_layout(dtype: str, rows: int) -> None:
    """The generic kernel keeps NumPy's memory layout (NumPy's own clip, not a C-ordered
    copy), so it is bitwise the formula as written, and bitwise the NumPy fast path, for
    every layout (the fast path's blocked kernel is used for non-C layouts only above
    ``AS_WRITTEN_MAX_BYTES`` per temporary, far above these sizes)."""
    rng = np.random.default_rng(rows)
    t = rng.uniform(-0.1, 1.1, size=(rows, 60)).astype(dtype)
    p = rng.uniform(-0.1, 1.1, size=(rows, 60)).astype(dtype)
    for name, (a, b) in _layouts(t, p).items():
        ca, cb = np.clip(a, 1e-7, 1), np.clip(b, 1e-7, 1)
        written = np.sum(ca * np.log(ca / cb), axis=-1)
        with kldiv.use_generic():
            generic = kldiv.kld(a, b)
        fast = kldiv.kld(a, b)
        assert np.array_equal(generic, written), name
        assert np.array_equal(fast, generic), name


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_matrix_inputs_keep_their_dtype() -> None:
    """np.matrix is an ndarray subclass array-api-compat does not accept: it was read as a
    Python value (floats -> float32). It is an ndarray of its own dtype, and the result a
    plain ndarray (np.matrix cannot hold the 1-d per-sample loss)."""
    t = np.matrix(SEED_T)
    p = np.matrix(SEED_P)
    out = kldiv.kld(t, p)
    assert type(out) is np.ndarray and out.dtype == np.float64 and out.shape == (2,)
    assert np.array_equal(out, kldiv.kld(np.asarray(t), np.asarray(p)))
    loss = kldiv.KLDivergence()(t, p, sample_weight=np.matrix([[0.8], [0.2]]))
    assert type(loss) is np.float64
    np.testing.assert_allclose(loss, 0.3665154, rtol=1e-6)
    out32 = kldiv.kld(t, p.astype(np.float32))
    assert out32.dtype == np.float32


def test_jax_float32_seed_example_is_numpys_value() -> None:
    """XLA fused the product into the row sum's addition (one FMA rounding instead of two):
    -3.0809076e-06 where NumPy, tf.keras and JAX's own un-fused ops give -3.0809074e-06."""
    b = Backend.JAX.handle()
    t, p = np.array(SEED_T, np.float32), np.array(SEED_P, np.float32)
    want = np.sum(np.clip(t, 1e-7, 1) * np.log(np.clip(t, 1e-7, 1) / np.clip(p, 1e-7, 1)), axis=-1)
    assert want[1] == np.float32(-3.0809074e-06)
    out = np.asarray(kldiv.kld(b.asarray(t), b.asarray(p)))
    assert np.array_equal(out, want)
    import jax

    assert np.array_equal(np.asarray(jax.jit(kldiv.kld)(b.asarray(t), b.asarray(p))), want)


@pytest.mark.parametrize("shape", [(1000, 2), (300, 3), (200, 100), (16, 5000), (3, 4, 7)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jax_fast_path_is_bitwise_the_generic_kernel(shape: tuple[int, ...], dtype: str) -> None:
    b = Backend.JAX.handle()
    rng = np.random.default_rng(sum(shape))
    t = b.asarray(rng.uniform(-0.1, 1.1, size=shape), dtype=dtype)
    p = b.asarray(rng.uniform(-0.1, 1.1, size=shape), dtype=dtype)
    fast = np.asarray(kldiv.kld(t, p))
    with kldiv.use_generic():
        generic = np.asarray(kldiv.kld(t, p))
    assert np.array_equal(fast, generic)


# ---- y_true / sample_weight in a dtype (or on a device) y_pred's library lacks -------------

def _source(kind: str, a: np.ndarray) -> Any:
    """``a`` as an array of library/dtype ``kind`` ("lib-dtype")."""
    lib, dtype = kind.split("-", 1)
    if lib == "numpy":
        if dtype in ("bfloat16", "float8_e4m3fn"):
            ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed")
            return a.astype(getattr(ml_dtypes, dtype))
        return a.astype(dtype)
    if lib == "dask":
        return Backend.DASK.handle().asarray(a, dtype=dtype)
    b = Backend(lib).handle()
    if lib == "torch":
        return b.module.as_tensor(a).to(getattr(b.module, dtype))
    if lib == "jax":
        return b.module.asarray(a, dtype=getattr(b.module, dtype))
    return b.asarray(a, dtype=dtype)


def _target(kind: str, a: np.ndarray) -> Any:
    if kind == "array_api_strict-no_float64":
        xps = pytest.importorskip("array_api_strict")
        try:
            dev = xps.Device("no_float64")
        except (TypeError, ValueError) as exc:
            pytest.skip(f"this array_api_strict has no float64-less device: {exc}")
        return xps.asarray(a, device=dev)
    return Backend(kind).handle().asarray(a)


def _host(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return (x.float() if x.dtype.itemsize < 4 else x).numpy()  # type: ignore[no-any-return]
    if hasattr(x, "compute"):
        return np.asarray(x.compute())
    mod = type(x).__module__
    if mod.startswith("array_api_strict"):
        import array_api_strict as xps

        return np.asarray(xps.asarray(x, device=xps.Device("CPU_DEVICE")))
    return np.asarray(x)


SOURCES = [
    "numpy-float16", "numpy-bfloat16", "numpy-float8_e4m3fn", "numpy-float64",
    "torch-bfloat16", "torch-float16", "torch-float64", "jax-bfloat16", "jax-float16",
    "jax-float64", "array_api_strict-float64", "dask-float16", "dask-float64",
]
TARGETS = ["numpy", "torch", "jax", "array_api_strict", "array_api_strict-no_float64", "dask"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES)
def test_y_true_and_weight_in_a_dtype_the_target_lacks(source: str, target: str) -> None:
    """Cast on the source side (to y_pred's dtype) before crossing libraries or devices:
    NumPy has no bfloat16, array-api-strict no float16, a float64-less device no float64."""
    t = np.array([[0.0, 1.0], [0.25, 0.75]])
    p = np.array([[0.6, 0.4], [0.4, 0.6]], np.float32)
    w = np.array([0.5, 2.0])
    y_true = _source(source, t)
    y_pred = _target(target, p)
    t_seen = _host(_source(source, t)).astype(np.float64)  # the values after the source's rounding
    out = kldiv.kld(y_true, y_pred)
    assert out.dtype == y_pred.dtype
    np.testing.assert_allclose(_host(out), oracle(t_seen, p), rtol=1e-5, atol=1e-7)
    w_seen = _host(_source(source, w)).astype(np.float64)
    loss = kldiv.KLDivergence(reduction="none")(_target(target, t.astype(np.float32)), y_pred,
                                                sample_weight=_source(source, w))
    np.testing.assert_allclose(_host(loss), oracle(t, p) * w_seen, rtol=1e-5, atol=1e-7)


def test_is_array_does_not_depend_on_earlier_calls() -> None:
    """A NumPy float64 scalar (a Python float subclass) is not an array input, before and
    after the metric's NumPy scalar totals put its type in the namespace cache."""
    is_array = _namespace.is_array

    before = is_array(np.float64(1.0))
    m = kldiv.metrics.KLDivergence()
    m.update_state(np.full((2, 2), 0.5), np.full((2, 2), 0.5))
    m.result()
    assert before is False and is_array(np.float64(1.0)) is False
