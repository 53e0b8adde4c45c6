"""Hostile inputs against the Keras KL core: ``kldiv.kl_divergence`` (and aliases) and
``kldiv.KLDivergence`` (reductions, sample weights, config, attributes set after
construction), on every backend of the suite.

Each test here was written against a defect found by probing and failed before its fix; the
references are the float64 oracle of SPEC §1 and SPEC's numbers.
"""

from __future__ import annotations

import array
import json
import subprocess
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, oracle, run_tensorflow_script

YT = [[0.0, 1.0], [0.0, 0.0]]
YP = [[0.6, 0.4], [0.4, 0.6]]


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# ---- attributes set after construction -----------------------------------------------------

@pytest.mark.parametrize("bad", ["bogus", "SUM", 3, True, ["sum"]])
def test_invalid_reduction_set_after_construction_is_refused(backend: ArrayBackend, bad: Any) -> None:
    """``loss.reduction = "bogus"`` used to reduce silently as a mean (a wrong answer)."""
    loss = kldiv.KLDivergence()
    loss.reduction = bad
    with pytest.raises(ValueError, match="Invalid reduction"):
        loss(backend.asarray(YT), backend.asarray(YP))


@pytest.mark.parametrize(("value", "expected"), [(None, [0.9162892, -3.0809074e-06]),
                                                  ("sum", 0.9162861)])
def test_valid_reduction_set_after_construction_is_used(backend: ArrayBackend, value: Any,
                                                        expected: Any) -> None:
    loss = kldiv.KLDivergence()
    loss.reduction = value
    out = backend.to_numpy(loss(backend.asarray(YT), backend.asarray(YP)))
    np.testing.assert_allclose(out, expected, rtol=1e-5)


@pytest.mark.parametrize("bad", ["int32", "bool", 3])
def test_invalid_dtype_set_after_construction_is_refused(backend: ArrayBackend, bad: Any) -> None:
    """``loss.dtype = "int32"`` used to cast the loss to int32 silently (0.458 -> 0)."""
    loss = kldiv.KLDivergence()
    loss.dtype = bad
    with pytest.raises(ValueError, match="Invalid dtype"):
        loss(backend.asarray(YT), backend.asarray(YP))


def test_reduce_loss_refuses_unknown_names() -> None:
    """The reduction engine itself: an unknown name is an error, never a mean."""
    from kldiv import _reduction

    loss = np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="Invalid reduction 'bogus'"):
        _reduction.reduce_loss(np, loss, reduction="bogus")
    np.testing.assert_allclose(_reduction.reduce_loss(np, loss, reduction=None), loss)  # type: ignore[arg-type]


# ---- from_config on hostile configs --------------------------------------------------------

@pytest.mark.parametrize("config", [None, 3, "reduction", [("reduction", "sum")]])
def test_from_config_needs_a_mapping(config: Any) -> None:
    with pytest.raises(TypeError, match="config must be a dict"):
        kldiv.KLDivergence.from_config(config)


@pytest.mark.parametrize("dtype", [{"config": None}, {"config": 3}, {"config": {"name": 3}}, 3.5])
def test_from_config_bad_dtype_entry_is_a_clear_error(dtype: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="dtype"):
        kldiv.KLDivergence.from_config({"reduction": "sum", "name": "x", "dtype": dtype})


@pytest.mark.parametrize("fn", [["kl_divergence"], {"a": 1}])
def test_from_config_unhashable_fn_is_a_clear_error(fn: Any) -> None:
    with pytest.raises(ValueError, match="config names function"):
        kldiv.KLDivergence.from_config({"fn": fn})


def test_from_config_keras3_dtype_policy_round_trips() -> None:
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_float16"},
              "registered_name": None}
    loss = kldiv.KLDivergence.from_config({"reduction": "sum", "name": "x", "dtype": policy})
    assert loss.dtype == "float16"
    assert kldiv.KLDivergence.from_config(loss.get_config()) == loss


# ---- sample_weight messages ----------------------------------------------------------------

def test_sample_weight_error_names_the_shape_as_given(backend: ArrayBackend) -> None:
    """A (3,) weight against a (2, 3) loss used to be reported as shape (3, 1)."""
    x = backend.asarray(np.full((2, 3, 4), 0.25, np.float32))
    with pytest.raises(ValueError, match=r"given as \(3,\)") as info:
        kldiv.KLDivergence()(x, x, sample_weight=np.ones(3, np.float32))
    assert "(2, 3)" in str(info.value)


# ---- dtypes of y_pred given as other objects than arrays -----------------------------------

@pytest.mark.parametrize("make", [
    pytest.param(lambda v: array.array("d", v), id="array.array-d"),
    pytest.param(lambda v: memoryview(np.asarray(v, np.float64)), id="memoryview-f64"),
    pytest.param(lambda v: _ArrayLike(np.asarray(v, np.float64)), id="__array__-f64"),
])
def test_y_pred_with_a_float64_buffer_keeps_float64(make: Any) -> None:
    """Only Python values (floats, lists, tuples) are Keras floatx (float32); an object that
    carries float64 data (buffer protocol, ``__array__``) was silently rounded to float32."""
    t, p = [0.4, 0.9, 0.2], [0.5, 0.8, 0.12]
    out = kldiv.kl_divergence(make(t), make(p))
    assert out.dtype == np.float64
    assert np.array_equal(out, oracle(t, p))
    loss = kldiv.KLDivergence()(make(t), make(p))
    assert loss.dtype == np.float64


def test_python_values_stay_keras_floatx() -> None:
    assert kldiv.kld([0.4, 0.9, 0.2], [0.5, 0.8, 0.12]).dtype == np.float32
    assert kldiv.kld((0.4, 0.9, 0.2), (0.5, 0.8, 0.12)).dtype == np.float32
    assert kldiv.kld([0.5, 0.5], 0.5).dtype == np.float32
    assert kldiv.kld([0.5, 0.5], np.float64(0.5)).dtype == np.float64


class _ArrayLike:
    """An object NumPy converts through ``__array__`` (as pandas, xarray, h5py objects)."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._data if dtype is None else self._data.astype(dtype)


# ---- oracle checks of hostile values on every backend -------------------------------------

def test_hostile_values_match_the_oracle(backend: ArrayBackend) -> None:
    """NaN, +-inf, negatives, > 1, exact 0 and 1, in both inputs, broadcast rows."""
    t = np.array([[np.nan, 1, 0, 2], [-1, np.inf, 0.5, 1], [0, 0, 0, 0]], np.float64)
    p = np.array([[0.5, 0.5, 0.5, 0.5], [0.25, -np.inf, 0, 1e-9], [1, 1, 1, 1]], np.float64)
    out = backend.to_numpy(kldiv.kld(backend.asarray(t), backend.asarray(p)))
    np.testing.assert_allclose(out, oracle(t, p), rtol=1e-12, equal_nan=True)
    out = backend.to_numpy(kldiv.kld(backend.asarray(t[1:2]), backend.asarray(p)))
    np.testing.assert_allclose(out, oracle(t[1:2], p), rtol=1e-12)


# ---- tf.function: autograph leaves kldiv's Python alone ------------------------------------

_AUTOGRAPH = r"""
import sys
import triton  # noqa: F401  (before TensorFlow, see conftest.py)
import numpy as np
import kldiv
import tensorflow as tf

a = np.random.default_rng(0).random((3, 4)).astype(np.float32)

def loss(x, y):
    return kldiv.KLDivergence(reduction="sum")(x, y, sample_weight=tf.ones([tf.shape(x)[0]]))

def call(x, y):
    return kldiv.KLDivergence().call(x, y)

def fn(x, y):
    return kldiv.kld(x, y)

def log_probs(x, y):
    return kldiv.kl_divergence(tf.math.log(x), tf.math.log(y), inputs="log_probs")

spec = [tf.TensorSpec([None, None]), tf.TensorSpec([None, None])]
for f in (loss, call, fn, *((log_probs,) if "log_probs" in sys.argv else ())):
    print(f.__name__, float(tf.reduce_sum(tf.function(f, input_signature=spec)(a, a[::-1]))))
"""


def _autograph_probe(tmp_path: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return run_tensorflow_script(tmp_path, "autograph_probe.py", _AUTOGRAPH, *args,
                                 AUTOGRAPH_VERBOSITY="1")


def test_tf_function_does_not_convert_kldiv(tmp_path: Any) -> None:
    """Autograph used to rewrite kldiv's own functions inside a user's ``tf.function``, and
    printed "AutoGraph could not transform ... Please report this to the TensorFlow team"
    for those it could not (an annotated name in a branch, ``importlib``)."""
    proc = _autograph_probe(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "could not transform" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert all(name in proc.stdout for name in ("loss", "call", "fn")), proc.stdout


def test_tf_function_log_probs_in_a_graph(tmp_path: Any) -> None:
    """The family kernels' TensorFlow ``where`` must build in a graph (no Python ``bool`` of
    a symbolic tensor), with unknown shapes."""
    proc = _autograph_probe(tmp_path, "log_probs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "log_probs" in proc.stdout


# ---- second pass: exports, argument names in conversion messages, inference tensors --------

def test_losses_module_exports_the_estimator_loss() -> None:
    """``kldiv.losses`` holds every loss class (``kldiv.metrics.KLEstimator`` had no
    ``kldiv.losses`` counterpart) and the functional form, as the other members."""
    assert kldiv.losses.KLEstimator is kldiv.KLEstimator
    assert kldiv.losses.kl_estimate is kldiv.kl_estimate
    assert {"KLEstimator", "kl_estimate"} <= set(kldiv.losses.__all__)
    lp = np.log(np.array([[0.5, 0.25], [0.2, 0.4]], np.float32))
    ref = np.log(np.array([[0.25, 0.25], [0.4, 0.2]], np.float32))
    ratio = ref.astype(np.float64) - lp  # k3 = exp(r) - 1 - r, r = ref - lp, its mean
    np.testing.assert_allclose(float(kldiv.losses.KLEstimator()(lp, ref)),
                               np.mean(np.expm1(ratio) - ratio), rtol=1e-6)


@pytest.mark.parametrize(("weight", "match"), [
    (np.ones(2, np.complex64), "complex dtype complex64, which cannot be cast to the loss's real dtype"),
    (np.array(["a", "b"]), "sample_weight has dtype <U1, which cannot be cast to the loss's dtype"),
])
def test_sample_weight_cast_message_names_the_loss_not_y_pred(weight: Any, match: str) -> None:
    """A bad sample weight was said not to cast to "y_pred's" dtype, also for the estimator
    loss, whose inputs are ``logprob`` and ``ref_logprob``: it is cast to the loss' dtype."""
    x = np.log(np.full((2, 3), 0.5, np.float32))
    for loss, args in ((kldiv.KLEstimator(), (x, x)), (kldiv.KLDivergence(), (np.exp(x), np.exp(x)))):
        with pytest.raises(TypeError, match=match) as info:
            loss(*args, sample_weight=weight)
        assert "y_pred" not in str(info.value)


def test_conversion_messages_name_the_target_argument() -> None:
    """The conversion layer names the argument converted *to* as its caller says
    (``like=``): the estimators convert ``ref_logprob`` to ``logprob``'s library."""
    from kldiv import _convert

    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="ref_logprob has complex dtype complex128, which cannot "
                                        "be cast to logprob's real dtype") as info:
        _convert.to_namespace(np.ones(2, complex), np, "cpu", np.float32, what="ref_logprob",
                              like="logprob")
    assert "y_pred" not in str(info.value)
    meta = torch.ones(3, device="meta")  # no data: cannot reach NumPy
    with pytest.raises(TypeError, match=r"ref_logprob .* could not be converted to logprob's "
                                        "library numpy"):
        _convert.to_namespace(meta, np, "cpu", np.float32, what="ref_logprob", like="logprob")
    with pytest.raises(TypeError, match=r"y_true .* could not be converted to y_pred's library"):
        kldiv.kld(meta, np.ones(3, np.float32))  # the default: the functions' y_pred


@pytest.mark.parametrize("rows", [4, 64])  # the native route and the fused one (>= 4096 elements)
def test_inference_mode_targets_with_a_student_requiring_grad(rows: int) -> None:
    """A teacher's output made under ``torch.inference_mode()`` (the usual distillation
    pattern) against a student that requires grad: fine on small inputs, but the fused route
    (4096 elements or more) saved the inference tensor for backward (torch's "Inference
    tensors cannot be saved for backward"); so did ``loss * sample_weight`` for an
    inference-mode weight. The gradient is the oracle's."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    t, p = rng.uniform(0.01, 1, (rows, 100)), rng.uniform(0.01, 1, (rows, 100))
    w = rng.uniform(0, 1, rows)
    with torch.inference_mode():
        teacher, weight = torch.tensor(t), torch.tensor(w)
    student = torch.tensor(p, requires_grad=True)
    loss = kldiv.KLDivergence(reduction="sum")(teacher, student, sample_weight=weight)
    loss.backward()
    np.testing.assert_allclose(float(loss.detach()), float(np.sum(oracle(t, p) * w)), rtol=1e-12)
    assert student.grad is not None
    np.testing.assert_allclose(student.grad.numpy(), -t / p * w[:, None], rtol=1e-12)
    student.grad = None
    kldiv.kld(teacher, student).sum().backward()
    np.testing.assert_allclose(student.grad.numpy(), -t / p, rtol=1e-12)


def test_sample_weight_against_a_loss_of_unknown_dask_size_says_why() -> None:
    """Dask arrays with chunks of unknown size (after boolean indexing) give a per-sample loss
    of size NaN, which Dask combines only with a size of 1 or another unknown size. A weight
    of known size was refused as not broadcasting to "(nan,)", which it does in NumPy's
    terms; the message now says what to do. The working forms give the oracle's value."""
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(7)
    t, p, w = rng.uniform(0.1, 1, (6, 5)), rng.uniform(0.1, 1, (6, 5)), rng.uniform(0, 1, 6)
    unknown = [x[x[:, 0] > -1] for x in (da.from_array(t, chunks=(2, 5)), da.from_array(p, chunks=(2, 5)))]
    loss = kldiv.KLDivergence(reduction="sum")
    with pytest.raises(ValueError, match=r"sample_weight of shape \(6,\).*unknown.*compute_chunk_sizes"):
        loss(*unknown, sample_weight=w)
    weight = da.from_array(w[:, None], chunks=(2, 1))
    weight = weight[weight[:, 0] > -1]  # the inputs' unknown chunks
    np.testing.assert_allclose(float(loss(*unknown, sample_weight=weight).compute()),
                               np.sum(oracle(t, p) * w), rtol=1e-12)
    np.testing.assert_allclose(float(loss(*unknown, sample_weight=[2.0]).compute()),
                               2 * np.sum(oracle(t, p)), rtol=1e-12)


def test_traced_y_true_against_a_numpy_y_pred_says_how_to_compute_in_jax() -> None:
    """A JAX tracer (``jax.jit``/``grad``/``vmap``) cannot become a NumPy array: the
    ``TypeError`` names the argument, and now also what to do (the call runs in
    ``y_pred``'s library)."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    p = np.array([[0.5, 0.5], [0.125, 0.875]], np.float32)
    with pytest.raises(TypeError, match=r"(?s)^y_true \(jax array.*give y_pred as a jax array\)"):
        jax.jit(lambda a: kldiv.kld(a, p))(jnp.asarray(p))
    with pytest.raises(TypeError, match=r"(?s)^sample_weight \(jax array.*give the inputs as jax arrays\)"):
        jax.grad(lambda w: kldiv.KLDivergence()(p, p, sample_weight=w))(jnp.ones(2))
    # given as JAX arrays, the same calls trace and give the oracle's values
    np.testing.assert_allclose(np.asarray(jax.jit(lambda a: kldiv.kld(a, jnp.asarray(p)))(jnp.asarray(p))),
                               oracle(p, p), atol=1e-7)


def test_result_dtype_message_names_the_losses_input() -> None:
    """``dtype=`` a library lacks: the message named ``y_pred`` also for the estimator loss,
    whose result has ``logprob``'s library."""
    xps = pytest.importorskip("array_api_strict")
    x = xps.asarray(np.log(np.full((2, 3), 0.5)))
    with pytest.raises(ValueError, match=r"no float16 dtype; choose one logprob's library holds"):
        kldiv.KLEstimator(dtype="float16")(x, x)
    with pytest.raises(ValueError, match=r"no float16 dtype; choose one y_pred's library holds"):
        kldiv.KLDivergence(dtype="float16")(xps.exp(x), xps.exp(x))


def test_torch_inputs_that_cannot_move_or_are_nested_are_clear_type_errors() -> None:
    """A ``y_true`` or ``sample_weight`` on torch's ``meta`` device (no data) against a CPU
    ``y_pred`` leaked torch's ``NotImplementedError``; a nested (ragged) tensor leaked
    torch's internal ``RuntimeError`` ("NestedTensorImpl doesn't support sizes")."""
    torch = pytest.importorskip("torch")
    p = torch.tensor(YP)
    with pytest.raises(TypeError, match=r"^y_true \(on device meta\) could not be moved to y_pred's device cpu"):
        kldiv.kld(torch.ones(2, 2, device="meta"), p)
    with pytest.raises(TypeError, match=r"^sample_weight \(on device meta\) could not be moved to the loss's device"):
        kldiv.KLDivergence()(p, p, sample_weight=torch.ones(2, device="meta"))
    nested = torch.nested.nested_tensor([torch.full((2,), 0.5), torch.full((3,), 1 / 3)],
                                        layout=torch.jagged)
    for args, what in (((p, nested), "y_pred"), ((nested, p), "y_true")):
        with pytest.raises(TypeError, match=rf"^{what} is a nested \(ragged\) \w*Tensor; pad it first"):
            kldiv.KLDivergence()(*args)
    meta = torch.ones(2, 2, device="meta")  # all on meta: shapes only, as torch does
    assert kldiv.KLDivergence(reduction="none")(meta, meta).shape == (2,)


# ---- follow-up round: dtype=float, overflowing casts, names ---------------------------------

@pytest.mark.parametrize("make", [
    lambda **kw: kldiv.KLDivergence(**kw),
    lambda **kw: kldiv.ReverseKLDivergence(**kw),
    lambda **kw: kldiv.JensenShannonDivergence(**kw),
])
def test_python_float_dtype_is_float32_as_in_keras(backend: ArrayBackend, make: Any) -> None:
    """Keras reads Python's ``float`` as float32 (``keras.losses.KLDivergence(dtype=float)``
    computes in float32), as kldiv's metrics do; the losses gave float64 (NumPy's reading)."""
    loss = make(dtype=float)
    assert loss.dtype == "float32"
    assert loss.get_config()["dtype"] == "float32"
    out = loss(backend.asarray(YT, "float32"), backend.asarray(YP, "float32"))
    assert out.dtype == backend.dtype("float32")
    assert make(dtype=float) == make(dtype="float32")


def test_python_float_dtype_of_the_estimator_loss_is_float32() -> None:
    loss = kldiv.KLEstimator(dtype=float)
    assert loss.dtype == "float32"
    lp = np.full((2, 3), -1.0, np.float32)
    assert loss(lp, lp).dtype == np.float32


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("case", ["weight", "y_true_f16", "y_true_f16_fn", "ref_logprob",
                                  "ref_logprob_fn", "python_list"])
def test_overflowing_float64_casts_are_inf_without_a_warning(backend: ArrayBackend, case: str) -> None:
    """A float64 value beyond the target dtype's range is inf after the cast (Keras' cast
    does the same), without NumPy's "overflow encountered in cast" RuntimeWarning."""
    big = np.array([1e300, 1.0])
    if case == "weight":
        loss = kldiv.KLDivergence(reduction="none")
        out = backend.to_numpy(loss(backend.asarray(YT, "float32"), backend.asarray(YP, "float32"),
                                    sample_weight=big))
        assert np.isposinf(out[0]) and np.isfinite(out[1])
    elif case.startswith("y_true_f16"):
        if backend.name == "array_api_strict":
            pytest.skip("array-api-strict has no float16")
        p = backend.asarray(np.full((1, 3), 1 / 3), "float16")
        t = np.array([[1e300, 1.0, 0.0]])
        fn = kldiv.kl_divergence if case.endswith("_fn") else kldiv.KLDivergence(reduction="none")
        out = backend.to_numpy(fn(t, p))
        assert out.shape == (1,)
    elif case.startswith("ref_logprob"):
        lp = backend.asarray(np.full((2, 3), -1.0), "float32")
        ref = np.full((2, 3), -1e300)
        if case.endswith("_fn"):
            out = backend.to_numpy(kldiv.kl_estimate(lp, ref, estimator="k1"))
        else:
            out = backend.to_numpy(kldiv.KLEstimator(estimator="k1", reduction="none")(lp, ref))
        assert np.all(np.isposinf(out))
    else:
        out = kldiv.kl_divergence([[1e300, 1.0]], [[0.5, 0.5]])  # inf, clipped to 1
        np.testing.assert_allclose(out, [2 * np.log(2.0)], rtol=1e-6)


@pytest.mark.parametrize("make", [kldiv.KLDivergence, kldiv.ReverseKLDivergence,
                                  kldiv.JensenShannonDivergence, kldiv.KLEstimator])
def test_name_is_a_plain_str_and_none_is_the_default_name(make: Any) -> None:
    """``name=np.str_("x")`` was kept as ``np.str_`` (in get_config and the repr:
    ``name=np.str_('x')``); ``name=None`` was a TypeError where Keras gives the default name."""
    loss = make(name=np.str_("x"))
    assert type(loss.name) is str
    assert type(loss.get_config()["name"]) is str
    assert "np.str_" not in repr(loss)
    assert make(name=None).name == make().name
    with pytest.raises(TypeError, match="name must be a str"):
        make(name=3)


def test_dtype_helpers_read_scalar_type_dtypes() -> None:
    """The NumPy, Dask and JAX namespaces name their dtypes by scalar types (``np.float16``);
    their ``str()`` is ``"<class 'numpy.float16'>"``, which the helpers read as ``"float16'>"``:
    ``is_low_precision(np.float16)`` was False, and the cast of a y_true or weight to such a
    target dtype on the source's side (before crossing libraries) never happened."""
    from kldiv._namespace import _dtype_name, is_low_precision

    assert _dtype_name(np.float32) == "float32"
    assert _dtype_name(np.dtype("float64")) == "float64"
    assert is_low_precision(np.float16)
    assert not is_low_precision(np.float32)


@pytest.mark.parametrize("make", [kldiv.KLDivergence, kldiv.KLEstimator])
def test_name_set_after_construction_is_saved_as_a_plain_str(make: Any) -> None:
    loss = make()
    loss.name = np.str_("x")
    assert type(loss.get_config()["name"]) is str
    assert "np.str_" not in repr(loss)


# ---- logits whose class axis is unknown until run time ---------------------------------------

_RUN_TIME_CLASSES = r"""
import json
import triton  # noqa: F401  (before TensorFlow, see conftest.py)
import numpy as np
import kldiv
import tensorflow as tf

rng = np.random.default_rng(0)
one = tf.constant(rng.random((3, 1)).astype(np.float32))
full = tf.constant(rng.random((3, 4)).astype(np.float32))
spec = tf.TensorSpec([None, None], tf.float32)
cases = {
    "fn": lambda t, p: kldiv.kl_divergence(t, p, inputs="logits"),
    "loss": lambda t, p: kldiv.KLDivergence(inputs="logits", reduction="none")(t, p),
    "js": lambda t, p: kldiv.JensenShannonDivergence(inputs="logits", reduction="none")(t, p),
}
for name, f in cases.items():
    for jit in (False, True):
        g = tf.function(f, input_signature=[spec, spec], jit_compile=jit)
        print(name, jit, "same", json.dumps(np.asarray(g(full, full)).tolist()).replace(" ", ""))
        for label, (t, p) in (("true1", (one, full)), ("pred1", (full, one))):
            try:
                print(name, jit, label, json.dumps(np.asarray(g(t, p)).tolist()).replace(" ", ""))
            except Exception as exc:
                print(name, jit, label, "ERROR", type(exc).__name__, " ".join(str(exc).split())[:400])
"""


def test_tf_function_logits_broadcast_at_run_time_is_refused(tmp_path: Any) -> None:
    """A ``tf.function`` traced with ``(None, None)`` shapes: a logits input whose class axis
    is 1 at run time, against 4 classes, gave a wrong value silently (eager mode raises
    ValueError). Now the graph raises, naming the input; where XLA drops the assertion
    (``jit_compile=True``) the result is NaN, never a value."""
    proc = run_tensorflow_script(tmp_path, "run_time_classes.py", _RUN_TIME_CLASSES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line.split(" ", 3) for line in proc.stdout.splitlines()]
    assert len(lines) == 18, proc.stdout
    for name, jit, label, rest in lines:
        if label == "same":
            np.testing.assert_allclose(json.loads(rest), [0.0] * 3, atol=1e-6)
        elif jit == "False":
            what = "y_true" if label == "true1" else "y_pred"
            assert rest.startswith("ERROR InvalidArgumentError"), (name, label, rest)
            assert f"{what} holds logits" in rest and "class (last) axis has size 1" in rest, rest
        else:
            assert np.all(np.isnan(json.loads(rest))), (name, label, rest)


def test_torch_compile_dynamic_logits_broadcast_is_refused() -> None:
    """``torch.compile(dynamic=True)``: dynamo specializes sizes of 1, so the eager check runs
    in the trace (a graph compiled for full shapes recompiles for a class axis of 1)."""
    torch = pytest.importorskip("torch")
    f = torch.compile(lambda t, p: kldiv.kl_divergence(t, p, inputs="logits"), dynamic=True)
    full = torch.randn(3, 4)
    np.testing.assert_allclose(f(full, full).numpy(), 0.0, atol=1e-6)
    f(torch.randn(3, 5), torch.randn(3, 5))  # a dynamic class axis from here on
    for t, p, what in ((torch.randn(3, 1), full, "y_true"), (full, torch.randn(3, 1), "y_pred")):
        with pytest.raises(ValueError, match=f"{what} holds logits of shape"):
            f(t, p)


def test_dask_logits_of_unknown_class_axis_is_refused() -> None:
    """A Dask class axis of unknown size (NaN) cannot be checked when the graph runs: refused
    with a clear error (was computed as if broadcast, a wrong value)."""
    da = pytest.importorskip("dask.array")
    x = np.random.default_rng(0).random((3, 4))
    full = da.from_array(x, chunks=(3, 2))
    unknown = full[:, full[0] >= 0]  # the class axis' size: NaN until computed
    assert unknown.shape[-1] != unknown.shape[-1]
    one = da.from_array(x[:, :1])
    with pytest.raises(ValueError, match="unknown size"):
        kldiv.kl_divergence(one, unknown, inputs="logits")
    out = kldiv.kl_divergence(full, unknown.compute_chunk_sizes(), inputs="logits").compute()
    np.testing.assert_allclose(out, 0.0, atol=1e-12)
