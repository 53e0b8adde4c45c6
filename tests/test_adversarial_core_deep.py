"""Hostile inputs against the Keras KL core, second pass: ``kldiv.kl_divergence`` (and its
aliases) and ``kldiv.KLDivergence`` across libraries, conversion of Python containers, the
loss' repr.

Each test here was written against a defect found by probing and failed before its fix; the
reference values are the float64 oracle of SPEC §1 (``conftest.oracle``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, Backend, oracle

T = [[0.2, 0.8], [0.5, 0.5]]
P = [[0.6, 0.4], [0.3, 0.7]]


def _no_x64() -> Any:
    """JAX with ``jax_enable_x64`` off (its default; the suite's JAX handle turns it on)."""
    jax = pytest.importorskip("jax")
    return jax.enable_x64(False)


# ---- a float32-only JAX array meeting a float64 y_pred of another library ------------------

@pytest.mark.parametrize("pred", [Backend.NUMPY, Backend.TORCH, Backend.ARRAY_API_STRICT],
                         ids=str)
def test_jax_y_true_against_a_float64_y_pred_raises_no_jax_warning(pred: Backend) -> None:
    """Without x64, JAX warns ("Explicitly requested dtype float64 ... truncated") for every
    float64 cast: kldiv asked JAX for one, on the JAX side, for each call (an error under
    ``-W error``). The cast is made in y_pred's library instead."""
    handle = pred.handle()
    jnp = pytest.importorskip("jax.numpy")
    yp = handle.asarray(np.asarray(P, np.float64))
    with _no_x64():
        yt = jnp.asarray(np.asarray(T, np.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = kldiv.kld(yt, yp)
            loss = kldiv.KLDivergence(reduction="sum")(yp, yp, sample_weight=jnp.asarray([2.0, 1.0]))
    assert handle.is_native(out)
    np.testing.assert_allclose(handle.to_numpy(out), oracle(np.asarray(T, np.float32), P), rtol=1e-12)
    np.testing.assert_allclose(float(handle.to_numpy(loss)), 0.0, atol=1e-12)


# ---- Python containers holding arrays ----------------------------------------------------------

@pytest.mark.parametrize("where", ["y_true", "y_pred", "sample_weight"])
def test_list_of_tensors_requiring_grad_is_a_clear_type_error(where: str) -> None:
    """``np.asarray`` of a list holding a tensor that requires grad raises torch's
    RuntimeError ("Can't call numpy() on Tensor that requires grad"), which leaked."""
    torch = pytest.importorskip("torch")
    items = [torch.tensor(0.2, requires_grad=True), torch.tensor(0.8)]
    yp = torch.tensor([0.5, 0.5])
    with pytest.raises(TypeError, match=rf"{where} could not be converted.*stack"):
        if where == "y_true":
            kldiv.kld(items, yp)
        elif where == "y_pred":
            kldiv.kld([0.5, 0.5], items)
        else:
            kldiv.KLDivergence()(yp, yp, sample_weight=items)


def test_list_of_traced_values_says_to_stack_them() -> None:
    """A list of JAX tracers against a NumPy input: the message says how to build one array."""
    jax = pytest.importorskip("jax")
    with pytest.raises(TypeError, match=r"y_pred could not be converted to an array \(a list"):
        jax.jit(lambda a: kldiv.kld(np.array([0.5, 0.5]), [a, 1 - a]))(0.3)


def test_list_of_tensors_without_grad_still_converts(backend: ArrayBackend) -> None:
    """The plain case keeps working: a list of NumPy scalars / 0-d arrays is one array."""
    yp = backend.asarray(np.asarray(P[0], np.float32))
    out = kldiv.kld([np.float32(0.2), np.array(0.8, np.float32)], yp)
    np.testing.assert_allclose(backend.to_numpy(out), oracle(T[0], P[0]), rtol=1e-6)


# ---- repr ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_repr_shows_the_dtype(dtype: str) -> None:
    """Two unequal losses (``dtype=`` set on one) had the same repr; the repr now names it,
    as the metrics' does, and evaluates back to an equal loss."""
    loss = kldiv.KLDivergence(reduction="sum", dtype=dtype)
    assert repr(loss) == f"KLDivergence(reduction='sum', name='kl_divergence', dtype={dtype!r})"
    assert eval(repr(loss), {"KLDivergence": kldiv.KLDivergence}) == loss
    assert repr(kldiv.KLDivergence()) == "KLDivergence(reduction='auto', name='kl_divergence')"


def test_repr_with_an_invalid_dtype_set_afterwards_does_not_raise() -> None:
    loss = kldiv.KLDivergence()
    loss.dtype = "int32"
    assert "dtype='int32'" in repr(loss)


# ---- the generic switch --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["no", "false", 0, 1, None, [], 2.0])
def test_use_generic_takes_a_bool_only(bad: Any) -> None:
    """``use_generic("no")`` (any truthy non-bool) switched the fast paths *off*, and
    ``use_generic(0)`` on: a TypeError naming the argument, when called, not on entering."""
    with pytest.raises(TypeError, match=r"use_generic\(enabled=.*\): enabled must be a bool"):
        kldiv.use_generic(bad)


@pytest.mark.parametrize("enabled", [True, False, np.True_, np.False_])
def test_use_generic_with_a_bool_switches(enabled: Any) -> None:
    from kldiv import _switch

    with kldiv.use_generic(enabled):
        assert _switch._FORCE_GENERIC.get() is bool(enabled)
    assert _switch._FORCE_GENERIC.get() is False


# ---- config after attributes were set ------------------------------------------------------------

def _set_numpy_options(loss: Any) -> None:
    loss.reduction = np.str_("sum")
    loss.inputs = (np.str_("probs"), "logits")
    loss.temperature = np.float32(2.0)


def test_get_config_after_numpy_attribute_values_is_json_ready() -> None:
    """Options set as NumPy values after construction went into the config as they were:
    ``np.float32`` is not JSON-serializable (a Keras save failed). The config holds the
    validated values, as the constructor stores them."""
    import json

    loss = kldiv.KLDivergence()
    _set_numpy_options(loss)
    config = loss.get_config()
    assert config == {"reduction": "sum", "name": "kl_divergence",
                      "inputs": ["probs", "logits"], "temperature": 2.0}
    assert [type(v) for v in (config["reduction"], config["temperature"], *config["inputs"])] == [
        str, float, str, str]
    assert json.loads(json.dumps(config)) == config
    again = kldiv.KLDivergence.from_config(config)
    assert again == loss
    assert repr(loss) == ("KLDivergence(reduction='sum', name='kl_divergence', "
                          "inputs=('probs', 'logits'), temperature=2.0)")


def test_get_config_of_a_member_parameter_set_as_numpy_is_a_float() -> None:
    import json

    loss = kldiv.JensenShannonDivergence()
    loss.beta = np.float64(0.25)
    config = loss.get_config()
    assert type(config["beta"]) is float and config["beta"] == 0.25
    json.dumps(config)


@pytest.mark.parametrize(("attr", "value", "error"), [
    ("temperature", "x", TypeError),
    ("temperature", True, TypeError),  # was dropped from the config silently (True == 1.0)
    ("temperature", -1.0, ValueError),
    ("inputs", "probability", ValueError),
    ("reduction", "bogus", ValueError),
    ("name", 3, TypeError),
])
def test_get_config_refuses_an_invalid_attribute_set_afterwards(attr: str, value: Any,
                                                                error: type) -> None:
    """The config held any value set after construction (a config that ``from_config``
    then refused, or silently read as another option); the dtype was already checked. Now
    the constructor's error, and the repr still prints (it must not raise)."""
    loss = kldiv.KLDivergence(inputs="logits")
    setattr(loss, attr, value)
    with pytest.raises(error):
        loss.get_config()
    assert repr(value) in repr(loss)


# ---- dtype= that y_pred's library cannot hold ---------------------------------------------------

@pytest.mark.parametrize("reduction", ["auto", "none"])
def test_float64_dtype_on_jax_without_x64_is_a_clear_error(reduction: str) -> None:
    """``KLDivergence(dtype="float64")`` on JAX without x64 returned float32 (JAX truncates)
    with JAX's UserWarning: the result was not in the dtype asked for. Now the loss' own
    ValueError, as for a dtype the library lacks (array-api-strict's float16)."""
    jnp = pytest.importorskip("jax.numpy")
    loss = kldiv.KLDivergence(reduction=reduction, dtype="float64")
    with _no_x64():
        yt, yp = jnp.asarray(T), jnp.asarray(P)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match=r"KLDivergence\(dtype='float64'\): jax holds no "
                               r"float64.*jax_enable_x64"):
                loss(yt, yp)
            # the inputs' own dtype (no dtype=) keeps working
            out = kldiv.KLDivergence(reduction=reduction)(yt, yp)
    assert str(out.dtype) == "float32"


def test_float64_dtype_on_jax_with_x64_is_float64() -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    with jax.enable_x64(True):
        out = kldiv.KLDivergence(dtype="float64")(jnp.asarray(T), jnp.asarray(P, jnp.float32))
        assert str(out.dtype) == "float64"


def test_equality_with_an_invalid_attribute_does_not_raise() -> None:
    """``==`` compares configs; with an invalid attribute set since (which get_config refuses)
    it is identity, as the hash then falls back to the class': ``loss in [...]`` must work."""
    loss = kldiv.KLDivergence()
    loss.dtype = "int32"
    other = kldiv.KLDivergence()
    assert loss == loss
    assert loss != other and other != loss
    assert loss in [other, loss]
    assert hash(loss) == hash(loss)


# ---- a half-precision result beyond its range ------------------------------------------------

def _overflowing_half_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Rows whose KL (5000 x 16.12) is beyond float16's largest value (65504)."""
    return np.ones((4, 5000), np.float16), np.full((4, 5000), 1e-7, np.float16)


@pytest.mark.parametrize("face", ["function", "loss-none", "loss-sum"])
@pytest.mark.parametrize("lib", ["numpy", "dask"])
def test_half_result_beyond_its_range_is_inf_without_a_warning(lib: str, face: str) -> None:
    """A float16 result beyond float16's range is inf, as documented, with no warning: NumPy
    warned "overflow encountered in cast" when kl_divergence cast its float32 rows back, and
    Dask at compute() for the function and the loss (np.errstate cannot reach Dask's tasks)."""
    t, p = _overflowing_half_inputs()
    if lib == "dask":
        da = pytest.importorskip("dask.array")
        t, p = da.from_array(t, chunks=(2, 5000)), da.from_array(p, chunks=(2, 5000))
    call = {"function": kldiv.kl_divergence,
            "loss-none": kldiv.KLDivergence(reduction="none"),
            "loss-sum": kldiv.KLDivergence(reduction="sum")}[face]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = call(t, p)
        got = np.asarray(out.compute() if lib == "dask" else out)
    assert got.dtype == np.float16
    assert np.isposinf(got).all()


def test_half_result_in_range_is_unchanged(backend: ArrayBackend) -> None:
    """The quiet cast changes nothing in range: float16 rows as the float64 oracle rounds them."""
    if "float16" not in backend.float_dtypes:
        pytest.skip(f"{backend}: no float16 in this library")
    out = kldiv.kl_divergence(backend.asarray(np.asarray(T), "float16"),
                              backend.asarray(np.asarray(P), "float16"))
    want = oracle(np.asarray(T, np.float16), np.asarray(P, np.float16))
    np.testing.assert_allclose(backend.to_numpy(out).astype(np.float64), want, rtol=2e-3,
                               atol=1e-4)
