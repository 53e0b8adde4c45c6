"""The KLDivergence loss class (SPEC §3): reductions, sample weights, config, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, oracle
from kldiv import KLDivergence, Reduction

SEED_T = [[0.0, 1.0], [0.0, 0.0]]
SEED_P = [[0.6, 0.4], [0.4, 0.6]]

# SPEC §3 reference table: (reduction, sample_weight) -> value
REFERENCE = [
    ("auto", None, 0.45814306),
    ("sum_over_batch_size", None, 0.45814306),
    ("mean", None, 0.45814306),
    ("sum", None, 0.9162861),
    ("none", None, [0.9162892, -3.0809074e-06]),
    ("auto", [0.8, 0.2], 0.3665154),
    ("sum_over_batch_size", [0.8, 0.2], 0.3665154),
    ("sum", [0.8, 0.2], 0.7330308),
    ("none", [0.8, 0.2], [0.7330314, -6.1618147e-07]),
    ("auto", [1.0, 0.0], 0.4581446),
    ("auto", 2.0, 0.9162861),
    ("auto", [[0.8], [0.2]], 0.3665154),
    (None, None, [0.9162892, -3.0809074e-06]),
]


@pytest.mark.parametrize(("reduction", "weight", "expected"), REFERENCE)
def test_reference_values(backend: ArrayBackend, reduction: str, weight: object, expected: object) -> None:
    loss = KLDivergence(reduction=reduction)
    w = None if weight is None else (backend.asarray(weight) if not isinstance(weight, float) else weight)
    out = loss(backend.asarray(SEED_T), backend.asarray(SEED_P), sample_weight=w)
    assert backend.is_native(out)
    assert out.dtype == backend.dtype("float32")
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=5e-6, atol=1e-12)


def test_sample_weight_as_list_and_numpy(backend: ArrayBackend) -> None:
    loss = KLDivergence()
    t, p = backend.asarray(SEED_T), backend.asarray(SEED_P)
    for w in ([0.8, 0.2], np.array([0.8, 0.2], dtype=np.float64)):
        out = loss(t, p, sample_weight=w)
        assert backend.is_native(out) and out.dtype == backend.dtype("float32")
        np.testing.assert_allclose(backend.to_numpy(out), 0.3665154, rtol=5e-6)


def _rank3() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    t = rng.random((2, 3, 4)).astype(np.float32)
    p = rng.random((2, 3, 4)).astype(np.float32)
    return t, p


def test_rank_rules_against_oracle(backend: ArrayBackend) -> None:
    t, p = _rank3()
    per = oracle(t, p)  # (2, 3)
    loss = KLDivergence()
    cases = {
        "scalar": (2.5, per * 2.5),
        "rank r-1 (B,)": (np.array([1.0, 0.0]), per * np.array([[1.0], [0.0]])),
        "rank r": (np.arange(6.0).reshape(2, 3), per * np.arange(6.0).reshape(2, 3)),
        "rank r+1, last 1": (np.arange(6.0).reshape(2, 3, 1), per * np.arange(6.0).reshape(2, 3)),
        "broadcast (1, 3)": (np.array([[1.0, 2.0, 3.0]]), per * np.array([[1.0, 2.0, 3.0]])),
    }
    for name, (w, weighted) in cases.items():
        wb = w if isinstance(w, float) else backend.asarray(w, dtype="float32")
        out = loss(backend.asarray(t), backend.asarray(p), sample_weight=wb)
        np.testing.assert_allclose(backend.to_numpy(out), weighted.sum() / per.size, rtol=1e-5, err_msg=name)
        none = KLDivergence(reduction="none")(backend.asarray(t), backend.asarray(p), sample_weight=wb)
        np.testing.assert_allclose(backend.to_numpy(none), weighted, rtol=1e-5, err_msg=name)


def test_spec_rank3_weight_forms(backend: ArrayBackend) -> None:
    # SPEC §3's (2, 3, 4) example: weight [1, 0] keeps the first batch row only (divided by
    # all 6 losses); ones((2, 3)) and ones((2, 3, 1)) equal no weight. (SPEC's own numbers
    # for it come from data it does not give, so the oracle stands in for them.)
    t, p = _rank3()
    loss = KLDivergence()
    expected_10 = oracle(t, p)[0].sum() / 6
    expected_ones = oracle(t, p).sum() / 6
    out = loss(backend.asarray(t), backend.asarray(p), sample_weight=backend.asarray([1.0, 0.0]))
    np.testing.assert_allclose(backend.to_numpy(out), expected_10, rtol=1e-5)
    for w in (np.ones((2, 3)), np.ones((2, 3, 1))):
        out = loss(backend.asarray(t), backend.asarray(p), sample_weight=backend.asarray(w, dtype="float32"))
        np.testing.assert_allclose(backend.to_numpy(out), expected_ones, rtol=1e-5)


def test_mean_with_sample_weight(backend: ArrayBackend) -> None:
    loss = KLDivergence(reduction=Reduction.MEAN_WITH_SAMPLE_WEIGHT)
    t, p = backend.asarray(SEED_T), backend.asarray(SEED_P)
    per = oracle(SEED_T, SEED_P)
    out = loss(t, p, sample_weight=backend.asarray([0.8, 0.2]))
    np.testing.assert_allclose(backend.to_numpy(out), (per * [0.8, 0.2]).sum() / 1.0, rtol=1e-5)
    out = loss(t, p, sample_weight=backend.asarray([3.0, 1.0]))
    np.testing.assert_allclose(backend.to_numpy(out), (per * [3.0, 1.0]).sum() / 4.0, rtol=1e-5)
    out = loss(t, p, sample_weight=backend.asarray([0.0, 0.0]))
    assert float(backend.to_numpy(out)) == 0.0
    out = loss(t, p)  # no weights: the plain mean
    np.testing.assert_allclose(backend.to_numpy(out), per.mean(), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["auto", "sum_over_batch_size", "mean", "sum", "mean_with_sample_weight"])
def test_empty_batch_reduces_to_zero(backend: ArrayBackend, reduction: str) -> None:
    t = backend.asarray(np.zeros((0, 3), dtype=np.float32))
    p = backend.asarray(np.zeros((0, 3), dtype=np.float32))
    out = KLDivergence(reduction=reduction)(t, p)
    assert float(backend.to_numpy(out)) == 0.0
    none = KLDivergence(reduction="none")(t, p)
    assert tuple(none.shape) == (0,)


def test_float64_and_dtype_argument(backend: ArrayBackend) -> None:
    t = backend.asarray(np.array(SEED_T), dtype="float64")
    p = backend.asarray(np.array(SEED_P), dtype="float64")
    out = KLDivergence()(t, p)
    assert out.dtype == backend.dtype("float64")
    out = KLDivergence(dtype="float32")(t, p)
    assert out.dtype == backend.dtype("float32")


def test_reduction_namespace() -> None:
    assert Reduction.AUTO == "auto"
    assert Reduction.NONE == "none"
    assert Reduction.SUM == "sum"
    assert Reduction.SUM_OVER_BATCH_SIZE == "sum_over_batch_size"
    assert Reduction.MEAN == "mean"
    assert Reduction.MEAN_WITH_SAMPLE_WEIGHT == "mean_with_sample_weight"
    assert Reduction.BATCHMEAN == "batchmean"  # issue 12: torch's batchmean
    assert set(Reduction.all()) == {"auto", "none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight",
                                    "batchmean"}
    assert Reduction.validate(None) == "none"
    assert Reduction.validate("sum") == "sum"
    with pytest.raises(ValueError, match="sum_over_batch_size"):
        Reduction.validate("average")


def test_config_round_trip_and_keras_forms() -> None:
    loss = KLDivergence()
    assert loss.get_config() == {"reduction": "auto", "name": "kl_divergence"}
    again = KLDivergence.from_config(loss.get_config())
    assert again == loss and again is not loss
    custom = KLDivergence(reduction="sum", name="kl")
    assert KLDivergence.from_config(custom.get_config()) == custom
    # Keras 2 (tf.keras) form: an extra "fn" key
    k2 = KLDivergence.from_config({"reduction": "auto", "name": "kl_divergence", "fn": "kl_divergence"})
    assert k2.reduction == "auto" and k2.name == "kl_divergence"
    # Keras 3 forms: "sum_over_batch_size", None, and a dtype
    k3 = KLDivergence.from_config({"name": "kl_divergence", "reduction": "sum_over_batch_size"})
    assert k3.reduction == "sum_over_batch_size"
    k3n = KLDivergence.from_config({"name": "kl_divergence", "reduction": None, "dtype": None})
    assert k3n.reduction == "none"
    k3d = KLDivergence.from_config({"name": "kl", "reduction": "sum", "dtype": "float64"})
    assert k3d.get_config() == {"reduction": "sum", "name": "kl", "dtype": "float64"}
    with pytest.raises(ValueError, match="not the KL divergence"):
        KLDivergence.from_config({"reduction": "auto", "name": "x", "fn": "mean_squared_error"})
    with pytest.raises(TypeError, match="Unknown"):
        KLDivergence.from_config({"reduction": "auto", "name": "x", "bogus": 1})


def test_pickle_and_repr() -> None:
    loss = KLDivergence(reduction="sum", name="my_kl")
    again = pickle.loads(pickle.dumps(loss))
    assert again == loss
    assert float(again(SEED_T, SEED_P)) == pytest.approx(0.9162861, rel=1e-6)
    assert repr(loss) == "KLDivergence(reduction='sum', name='my_kl')"


def test_call_is_unreduced() -> None:
    out = KLDivergence(reduction="sum").call(SEED_T, SEED_P)
    np.testing.assert_allclose(out, [0.9162892, -3.0809074e-06], rtol=2e-6)


def test_class_exported() -> None:
    assert kldiv.KLDivergence is kldiv.losses.KLDivergence


def test_python_weights_on_a_device_without_float64() -> None:
    xps = pytest.importorskip("array_api_strict")
    try:
        dev = xps.Device("no_float64")
    except (TypeError, ValueError) as exc:
        pytest.skip(f"this array_api_strict has no float64-less device: {exc}")
    t = xps.asarray(np.asarray(SEED_T, dtype=np.float32), device=dev)
    p = xps.asarray(np.asarray(SEED_P, dtype=np.float32), device=dev)
    out = KLDivergence()(t, p, sample_weight=[0.8, 0.2])  # Python floats: no float64 detour
    assert out.device == dev
    np.testing.assert_allclose(np.asarray(xps.asarray(out, device=xps.Device("CPU_DEVICE"))), 0.3665154, rtol=5e-6)


@pytest.mark.parametrize("reduction", ["auto", "mean_with_sample_weight", "none"])
def test_half_precision_reduced_in_float32(backend: ArrayBackend, reduction: str) -> None:
    if "float16" not in backend.float_dtypes:
        pytest.skip(f"{backend.name} fixture has no float16")
    # 10000 rows of loss 9.21 each: their float16 sum would overflow (max 65504)
    t = np.tile(np.array([[1.0, 0.0]], dtype=np.float16), (10000, 1))
    p = np.tile(np.array([[1e-4, 1.0]], dtype=np.float16), (10000, 1))
    mod = backend.module
    tt = mod.asarray(t)
    pp = mod.asarray(p)
    if backend.name.startswith("torch"):
        tt, pp = tt.to(backend.device), pp.to(backend.device)
    out = KLDivergence(reduction=reduction)(tt, pp, sample_weight=np.ones(10000, dtype=np.float32))
    assert out.dtype == backend.dtype("float16")
    want = np.float16(oracle(t.astype(np.float32), p.astype(np.float32)).astype(np.float32))
    got = backend.to_numpy(out).astype(np.float64)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want if reduction == "none" else want.mean(), rtol=1e-3)


def test_dtype_argument_is_validated() -> None:
    with pytest.raises(ValueError, match="Invalid dtype 'bogus'"):
        KLDivergence(dtype="bogus")
    assert KLDivergence(dtype="mixed_float16").dtype == "float16"
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_bfloat16"}}
    assert KLDivergence.from_config({"name": "kl", "reduction": "auto", "dtype": policy}).dtype == "bfloat16"


# Keras 2's squeeze_or_expand_dimensions (tf.keras' class on tensors; tests/test_parity.py
# checks these against tf_keras): (y_true shape, y_pred shape, per-sample loss shape, the
# oracle's inputs after the squeeze as index expressions).
SQUEEZE_CASES = [
    ((3, 1), (3,), ()),
    ((3,), (3, 1), ()),
    ((2, 3), (2, 3, 1), (2,)),
    ((2, 3, 1), (2, 3), (2,)),
    ((2, 1, 1), (2, 1), (2,)),
    ((2, 1), (2, 1, 1), (2,)),
    ((2, 3, 1), (2, 1), (2,)),
    ((2, 3), (3,), (2,)),  # ranks differ but no trailing 1: plain broadcasting
    ((3, 2, 1), (2,), (3, 2)),  # ranks differ by two: plain broadcasting
    ((0, 1), (0,), ()),
]


def _squeeze(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if t.ndim == p.ndim + 1 and t.shape[-1] == 1:
        return t[..., 0], p
    if p.ndim == t.ndim + 1 and p.shape[-1] == 1:
        return t, p[..., 0]
    return t, p


@pytest.mark.parametrize(("t_shape", "p_shape", "loss_shape"), SQUEEZE_CASES)
def test_class_applies_keras_rank_squeeze(
    backend: ArrayBackend, t_shape: tuple[int, ...], p_shape: tuple[int, ...], loss_shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(len(t_shape) + 3 * len(p_shape))
    t = rng.random(t_shape).astype(np.float32)
    p = rng.random(p_shape).astype(np.float32)
    want = oracle(*_squeeze(t, p))
    assert want.shape == loss_shape
    loss = KLDivergence(reduction="none")
    for out in (loss(backend.asarray(t), backend.asarray(p)), loss.call(backend.asarray(t), backend.asarray(p))):
        assert tuple(out.shape) == loss_shape
        np.testing.assert_allclose(backend.to_numpy(out), want, rtol=1e-5, atol=1e-7)
    mean = KLDivergence()(backend.asarray(t), backend.asarray(p))
    np.testing.assert_allclose(backend.to_numpy(mean), want.mean() if want.size else 0.0, rtol=1e-5, atol=1e-7)


def test_class_shape_error_names_the_shapes_given(backend: ArrayBackend) -> None:
    # Keras 2's class squeezes y_pred (5, 3, 1) to (5, 3), which does not broadcast with (3, 1)
    t = backend.asarray(np.ones((3, 1), np.float32))
    p = backend.asarray(np.ones((5, 3, 1), np.float32))
    with pytest.raises(ValueError, match=r"y_true of shape \(3, 1\) and y_pred of shape \(5, 3, 1\) do not "
                       r"broadcast \(.*y_pred's trailing axis of 1 squeezed, giving \(5, 3\)\)"):
        KLDivergence()(t, p)
    # the function broadcasts them as given, like tf.keras.losses.kld
    assert tuple(kldiv.kld(t, p).shape) == (5, 3)


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax", "ml_dtypes"])
def test_dtype_objects_are_saved_as_names_and_round_trip(lib: str) -> None:
    """A library's dtype object is stored as its name: a config Keras (and from_config) reads."""
    if lib == "numpy":
        objs = {"float64": np.float64, "float32": np.dtype("float32"), "float16": np.float16}
    elif lib == "ml_dtypes":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        objs = {"bfloat16": ml_dtypes.bfloat16, "float32": np.dtype(np.float32)}
    else:
        mod = pytest.importorskip("torch" if lib == "torch" else "jax.numpy")
        objs = {name: getattr(mod, name) for name in ("float64", "float32", "float16", "bfloat16")}
    for name, obj in objs.items():
        loss = KLDivergence(dtype=obj)
        config = loss.get_config()
        assert config["dtype"] == name
        again = KLDivergence.from_config(config)
        assert again == loss and again.get_config() == config
        assert pickle.loads(pickle.dumps(loss)) == loss


@pytest.mark.parametrize("bad", [np.int32, "int32", np.complex64, object()])
def test_dtype_that_is_not_a_float_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="Invalid dtype"):
        KLDivergence(dtype=bad)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64"])
def test_dtype_argument_on_every_backend(backend: ArrayBackend, name: str) -> None:
    """The result in the named dtype of y_pred's library; where the library has no such dtype
    a ValueError naming both (NumPy's bfloat16 comes from ml_dtypes)."""
    t, p = backend.asarray(SEED_T), backend.asarray(SEED_P)
    loss = KLDivergence(dtype=name)
    has = name in backend.float_dtypes or (backend.name in {"numpy", "dask"} and name == "bfloat16")
    if backend.name == "array_api_strict":
        has = name in {"float32", "float64"}
    if backend.name == "dask" and name == "float16":
        has = True
    if not has:
        with pytest.raises(ValueError, match=f"has no {name}"):
            loss(t, p)
        return
    if name == "bfloat16" and backend.name in {"numpy", "dask"}:
        pytest.importorskip("ml_dtypes")
    out = loss(t, p)
    assert str(out.dtype).endswith(name)
    np.testing.assert_allclose(np.asarray(backend.to_numpy(out), np.float64), 0.45814306, rtol=1e-2)


# ---- return types (issue 10): one rule on NumPy -----------------------------------------

RETURN_REDUCTIONS = ["auto", "sum_over_batch_size", "mean", "sum", "mean_with_sample_weight", "none"]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("case", ["normal", "empty batch", "sample weights", "zero weights", "1-d input"])
@pytest.mark.parametrize("reduction", RETURN_REDUCTIONS)
def test_numpy_return_types(reduction: str, case: str, dtype: str) -> None:
    """A reduced (0-d) result on NumPy is a NumPy scalar of the result dtype; an unreduced one
    an ndarray; on every path (fast, generic), every reduction, empty batches and weights."""
    t = np.array(SEED_T, dtype)
    p = np.array(SEED_P, dtype)
    w = None
    if case == "empty batch":
        t, p = t[:0], p[:0]
    elif case == "sample weights":
        w = np.array([0.8, 0.2], dtype)
    elif case == "zero weights":
        w = np.zeros(2, dtype)
    elif case == "1-d input":
        t, p = t[0], p[0]
    for generic in (False, True):
        with kldiv.use_generic(generic):
            out = KLDivergence(reduction=reduction)(t, p, sample_weight=w)
            fn = kldiv.kld(t, p)
        want_type = np.ndarray if reduction == "none" and case != "1-d input" else np.dtype(dtype).type
        assert type(out) is want_type, (type(out), generic)
        assert out.dtype == np.dtype(dtype)
        assert type(fn) is (np.dtype(dtype).type if case == "1-d input" else np.ndarray)
        assert fn.dtype == np.dtype(dtype)
    # and with an explicit result dtype
    out = KLDivergence(reduction=reduction, dtype="float64")(t, p, sample_weight=w)
    assert type(out) is (np.ndarray if reduction == "none" and case != "1-d input" else np.float64)


def test_numpy_reprs_are_the_documented_ones() -> None:
    t = np.array(SEED_T, np.float32)
    p = np.array(SEED_P, np.float32)
    assert repr(kldiv.kld(t, p)) == "array([ 9.1628921e-01, -3.0809074e-06], dtype=float32)"
    assert repr(KLDivergence()(t, p)) == "np.float32(0.45814306)"
    assert repr(KLDivergence(reduction="mean_with_sample_weight")(t, p, sample_weight=[0.8, 0.2])) == (
        "np.float32(0.7330308)")
    assert repr(KLDivergence()(t[:0], p[:0])) == "np.float32(0.0)"
    assert repr(kldiv.kl_divergence([0.4, 0.9, 0.2], [0.5, 0.8, 0.12])) == "np.float32(0.11891246)"


# ---- discoverability and Keras import order (issue 10) ------------------------------------

def test_signature_is_visible() -> None:
    import inspect

    params = inspect.signature(KLDivergence).parameters
    assert [(p.name, p.default, p.kind) for p in params.values()] == [
        ("reduction", "auto", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("name", "kl_divergence", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        ("inputs", "probs", inspect.Parameter.KEYWORD_ONLY),  # issue 12
        ("temperature", 1.0, inspect.Parameter.KEYWORD_ONLY),
        ("dtype", None, inspect.Parameter.KEYWORD_ONLY),
    ]
    assert "reduction" in (KLDivergence.__init__.__doc__ or "") + (KLDivergence.__doc__ or "")

    class Sub(KLDivergence):  # a subclass with its own constructor keeps its own signature
        def __init__(self, temperature: float = 1.0, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]
            self.temperature = temperature

    assert list(inspect.signature(Sub).parameters) == ["temperature", "kwargs"]
    assert Sub(temperature=2.0, reduction="sum").reduction == "sum"


# A loss made before Keras is imported must train exactly like one made after (and like
# keras.losses.KLDivergence) once sample weights are given; a plain callable would be wrapped by
# Keras, which weights kldiv's already reduced loss a second time (the control).
IMPORT_ORDER_SCRIPT = r"""
import json, pickle
import numpy as np
import kldiv

before = kldiv.KLDivergence()
before_sum = kldiv.KLDivergence(reduction="sum")
pickled = pickle.dumps(before)
import keras

rng = np.random.default_rng(0)
x = rng.normal(size=(16, 6)).astype("float32")
y = rng.dirichlet(np.ones(4), size=16).astype("float32")
w = rng.random(16).astype("float32")


def losses(loss):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])
    m.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    return [float(m.train_on_batch(x, y, sample_weight=w)) for _ in range(3)]


class Plain:  # the control: a callable that is not a Keras Loss
    def __call__(self, y_true, y_pred, sample_weight=None):
        return kldiv.KLDivergence.__call__(kldiv.KLDivergence(), y_true, y_pred, sample_weight)


print(json.dumps({
    "before": losses(before),
    "after": losses(kldiv.KLDivergence()),
    "keras": losses(keras.losses.KLDivergence()),
    "control": losses(Plain()),
    "is_loss": isinstance(before, keras.losses.Loss),
    "sum_is_loss": isinstance(before_sum, keras.losses.Loss),
    "type_is_loss": issubclass(type(before), keras.losses.Loss),
    "unpickled_is_loss": isinstance(pickle.loads(pickled), keras.losses.Loss),
    "config": before.get_config(),
    "policy": kldiv.KLDivergence(dtype=keras.DTypePolicy("mixed_bfloat16")).get_config(),
}))
"""


def test_loss_made_before_importing_keras_trains_like_one_made_after() -> None:
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ORDER_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["before"], got["keras"], rtol=1e-5)
    np.testing.assert_allclose(got["after"], got["keras"], rtol=1e-5)
    assert not np.allclose(got["control"], got["keras"], rtol=1e-3)  # the comparison can fail
    assert got["is_loss"] and got["sum_is_loss"] and got["type_is_loss"] and got["unpickled_is_loss"]
    assert got["config"] == {"reduction": "auto", "name": "kl_divergence"}
    assert got["policy"] == {"reduction": "auto", "name": "kl_divergence", "dtype": "bfloat16"}
