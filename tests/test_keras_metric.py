"""``kldiv.metrics.KLDivergence`` in Keras: ``compile(metrics=[...])`` with ``fit``/``evaluate``.

Keras fixes its backend at import, so each Keras runs in its own subprocess (all at once):
Keras 3 on JAX, torch and TensorFlow (``KERAS_BACKEND``), and tf.keras (Keras 2 through
tf-keras, ``TF_USE_LEGACY_KERAS=1``). Each trains one model with three metrics side by side:
kldiv's metric created after Keras was imported (a ``keras.metrics.Metric``), kldiv's metric
created before (a plain kldiv metric that Keras wraps), and ``keras.metrics.KLDivergence``
itself, the reference. Every per-batch logged value (train and test), the history and
``evaluate(return_dict=True)`` must agree, compiled and eagerly, with and without sample
weights; controls show the weighted and unweighted runs differ, so the weights are used.

A Keras-aware metric used outside Keras keeps kldiv's behaviour (state in the inputs' library
and device, float64 accumulation): checked in a process with Keras loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240

# Runs with KERAS_BACKEND (or TF_USE_LEGACY_KERAS=1) set; prints one JSON object.
KERAS_SCRIPT = r"""
import json, os, pickle, sys, tempfile
try:
    import triton  # noqa: F401  (before TensorFlow: see tests/conftest.py)
except ImportError:
    pass
import numpy as np
import kldiv

early = kldiv.metrics.KLDivergence(name="early")  # created before any Keras is imported
early.update_state([[0.0, 1.0]], [[0.5, 0.5]])  # and used: Keras' wrapper holds its own state
early_before = [float(early.result()), [float(v) for v in early.variables]]
LEGACY = os.environ.get("TF_USE_LEGACY_KERAS") == "1"
if LEGACY:
    import tensorflow as tf
    keras = tf.keras  # tf-keras (Keras 2)
    backend = "tf_keras"
    VARIABLE = tf.Variable
else:
    import keras
    backend = keras.backend.backend()
    VARIABLE = keras.Variable

rng = np.random.default_rng(0)
x = rng.normal(size=(40, 6)).astype("float32")
y = rng.dirichlet(np.ones(4), size=40).astype("float32")
y[:6] = np.eye(4, dtype="float32")[rng.integers(0, 4, 6)]  # exact 0s and 1s
w = rng.random(40).astype("float32")
xv, yv, wv = x[:24], y[:24], w[:24]


class Log(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.train, self.test = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.train.append({k: float(v) for k, v in logs.items()})

    def on_test_batch_end(self, batch, logs=None):
        self.test.append({k: float(v) for k, v in logs.items()})


def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])


def run(weighted, eager):
    m = model()
    ours = kldiv.metrics.KLDivergence(name="ours")
    ref = keras.metrics.KLDivergence(name="ref")
    for met in (ours, ref):  # updated by hand first: what happens to that state is Keras' call
        met.update_state(y[:3], y[3:6])
    metrics = [ours, ref, early, keras.metrics.KLDivergence(name="ref0")]  # ref0: fresh, as early
    kw = {"weighted_metrics": metrics} if weighted else {"metrics": metrics}
    m.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", run_eagerly=eager, **kw)
    log = Log()
    sw = w if weighted else None
    hist = m.fit(x, y, sample_weight=sw, batch_size=16, epochs=2, shuffle=False, verbose=0,
                 callbacks=[log])
    ev = m.evaluate(xv, yv, sample_weight=wv if weighted else None, batch_size=10,
                    return_dict=True, verbose=0, callbacks=[log])
    out = {"train": log.train, "test": log.test, "history": hist.history, "evaluate": ev,
           "result_dtype": str(ours.result().dtype), "ref_result_dtype": str(metrics[1].result().dtype),
           "keras_variables": [isinstance(v, VARIABLE) for v in ours.variables],
           "n_variables": len(ours.variables), "repr": repr(ours)}
    return out, m, ours


res = {"backend": backend}
ours_fresh = kldiv.metrics.KLDivergence()
res["is_keras_metric"] = isinstance(ours_fresh, keras.metrics.Metric)
res["is_kldiv_metric"] = isinstance(ours_fresh, kldiv.metrics.KLDivergence)
res["early_is_keras_metric"] = isinstance(early, keras.metrics.Metric)
res["type"] = f"{type(ours_fresh).__module__}.{type(ours_fresh).__qualname__}"
res["config"] = ours_fresh.get_config()
res["ref_config"] = keras.metrics.KLDivergence(name="kullback_leibler_divergence").get_config()
for weighted in (False, True):
    for eager in (False, True):
        res[f"w{int(weighted)}e{int(eager)}"], trained, ours = run(weighted, eager)

# the trained metric pickles with its Keras state; its result survives
copy = pickle.loads(pickle.dumps(ours))
res["pickle"] = [float(ours.result()), float(copy.result()), isinstance(copy, keras.metrics.Metric)]
# the "early" metric was never touched: Keras' wrapper held the state
res["early_untouched"] = [float(early.result()), [float(v) for v in early.variables]] == early_before

# used outside Keras, a metric created after Keras was imported is kldiv's own metric
plain = kldiv.metrics.KLDivergence()
plain.update_state(np.array([[0, 1], [0, 0]], "float32"), np.array([[.6, .4], [.4, .6]], "float32"),
                   sample_weight=[1, 0])
r = plain.result()
res["plain"] = [type(r).__module__.split(".")[0], str(np.float32(r)), plain.library,
                isinstance(plain.variables[0], VARIABLE)]

if not LEGACY:
    # a compiled model with kldiv's metric saves and loads; the loaded one evaluates the same
    path = os.path.join(tempfile.mkdtemp(), "m.keras")
    trained.save(path)
    loaded = keras.models.load_model(path, custom_objects={"KLDivergence": kldiv.metrics.KLDivergence})
    res["loaded"] = [trained.evaluate(xv, yv, sample_weight=wv, return_dict=True, verbose=0),
                     loaded.evaluate(xv, yv, sample_weight=wv, return_dict=True, verbose=0)]

if backend == "jax":
    # a custom JAX loop: the stateless API under jax.jit (variables read before any update)
    import jax
    mets = [kldiv.metrics.KLDivergence(), keras.metrics.KLDivergence()]
    vals = []
    for met in mets:
        mv = [v.value for v in met.variables]  # kldiv's: none before Keras uses it
        step = jax.jit(lambda mv, t, p, sw, met=met: met.stateless_update_state(mv, t, p, sample_weight=sw))
        for i in range(0, 40, 16):
            p = np.full((len(y[i:i + 16]), 4), .125, "float32") + y[i:i + 16] / 2
            mv = step(mv, y[i:i + 16], p, w[i:i + 16])
        vals.append(float(jax.jit(met.stateless_result)(mv)))
    res["stateless"] = vals
print("JSON" + json.dumps(res))
"""

RUNS = {
    "jax": {"KERAS_BACKEND": "jax"},
    "torch": {"KERAS_BACKEND": "torch"},
    "tensorflow": {"KERAS_BACKEND": "tensorflow"},
    "tf_keras": {"TF_USE_LEGACY_KERAS": "1"},
}
NEEDS = {"jax": ("keras", "jax"), "torch": ("keras", "torch"), "tensorflow": ("keras", "tensorflow"),
         "tf_keras": ("tensorflow", "tf_keras")}


def _missing(run: str) -> str | None:
    for module in NEEDS[run]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: the {run} Keras run needs {' and '.join(NEEDS[run])}"
    return None


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    for key in ("KERAS_BACKEND", "TF_USE_LEGACY_KERAS"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run_all(script: str, runs: dict[str, dict[str, str]]) -> dict[str, dict | str]:
    """Start one subprocess per run, all at once; collect their JSON (or their error)."""
    procs = {}
    results: dict[str, dict | str] = {}
    for name, extra in runs.items():
        reason = _missing(name)
        if reason is not None:
            results[name] = "SKIP " + reason
            continue
        procs[name] = subprocess.Popen([sys.executable, "-c", script], env=_env(extra), cwd=ROOT,
                                       text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err = f"timed out after {TIMEOUT} s\n{err}"
            line = next((ln for ln in out.splitlines() if ln.startswith("JSON")), None)
            results[name] = json.loads(line[4:]) if proc.returncode == 0 and line else err[-4000:]
    finally:  # never leave a Keras process behind
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def keras_runs() -> dict[str, dict | str]:
    return _run_all(KERAS_SCRIPT, RUNS)


@pytest.fixture(params=list(RUNS))
def run(request: pytest.FixtureRequest, keras_runs: dict[str, dict | str]) -> dict:
    res = keras_runs[request.param]
    if isinstance(res, str) and res.startswith("SKIP "):
        pytest.skip(res[5:])
    assert isinstance(res, dict), f"the {request.param} Keras run failed:\n{res}"
    assert res["backend"] == request.param
    return res


CASES = [f"w{w}e{e}" for w in (0, 1) for e in (0, 1)]


def test_metric_is_a_keras_metric_with_keras_config(run: dict) -> None:
    assert run["is_keras_metric"] and run["is_kldiv_metric"]
    assert run["type"] == "kldiv.metrics.KLDivergence"
    assert not run["early_is_keras_metric"]  # created before Keras: kldiv's own metric
    assert run["config"] == {"name": "kullback_leibler_divergence", "dtype": "float32"}
    assert run["config"] == run["ref_config"]


@pytest.mark.parametrize("case", CASES)
def test_logged_values_match_keras_batch_for_batch(run: dict, case: str) -> None:
    res = run[case]
    for phase in ("train", "test"):
        batches = res[phase]
        assert len(batches) == (6 if phase == "train" else 3)
        ours = [b["ours"] for b in batches]
        ref = [b["ref"] for b in batches]
        np.testing.assert_allclose(ours, ref, rtol=2e-6, err_msg=f"{phase} batches")
        np.testing.assert_allclose([b["early"] for b in batches], [b["ref0"] for b in batches],
                                   rtol=2e-6, err_msg=f"{phase} batches, metric created before Keras")
        assert len(set(np.round(ref, 6))) > 1, "the logged values do not change"
    for key in ("history", "evaluate"):
        np.testing.assert_allclose(np.asarray(res[key]["ours"]), np.asarray(res[key]["ref"]), rtol=2e-6)
        np.testing.assert_allclose(np.asarray(res[key]["early"]), np.asarray(res[key]["ref0"]), rtol=2e-6)


@pytest.mark.parametrize("eager", [0, 1])
def test_sample_weights_are_used(run: dict, eager: int) -> None:
    """The control: weighted and unweighted runs differ, so matching the reference means
    matching its weighting."""
    unweighted, weighted = run[f"w0e{eager}"]["evaluate"]["ref"], run[f"w1e{eager}"]["evaluate"]["ref"]
    assert abs(unweighted - weighted) > 1e-3 * abs(unweighted)
    np.testing.assert_allclose(run[f"w1e{eager}"]["evaluate"]["ours"], weighted, rtol=2e-6)


@pytest.mark.parametrize("case", CASES)
def test_state_in_keras_variables_and_result_dtype(run: dict, case: str) -> None:
    res = run[case]
    assert res["n_variables"] == 2
    assert all(res["keras_variables"]) and res["repr"].endswith("variables)"), res["repr"]
    assert "float32" in res["result_dtype"] and res["result_dtype"] == res["ref_result_dtype"]


def test_pickled_metric_keeps_its_result(run: dict) -> None:
    ours, copy, is_keras = run["pickle"]
    assert ours == copy and ours > 0 and is_keras


def test_metric_created_before_keras_is_left_untouched(run: dict) -> None:
    assert run["early_untouched"]


def test_used_outside_keras_it_is_kldivs_metric(run: dict) -> None:
    lib, value, library, keras_variables = run["plain"]
    assert (lib, value, library, keras_variables) == ("numpy", "0.9162892", "numpy", False)


def test_saved_and_loaded_model_evaluates_the_same(run: dict) -> None:
    if run["backend"] == "tf_keras":
        pytest.skip("the .keras save format is Keras 3's")
    before, after = run["loaded"]
    np.testing.assert_allclose(after["ours"], before["ours"], rtol=1e-6)
    np.testing.assert_allclose(after["ours"], after["ref"], rtol=2e-6)


def test_jax_stateless_api_under_jit(run: dict) -> None:
    if run["backend"] != "jax":
        pytest.skip("the stateless custom-loop API is checked on the JAX backend")
    ours, ref = run["stateless"]
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    assert ours > 0


# ---- a Keras-aware metric outside Keras -----------------------------------------------------

OUTSIDE_SCRIPT = r"""
import json, os, pickle, sys
try:
    import triton  # noqa: F401
except ImportError:
    pass
import numpy as np
import kldiv
if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    import tf_keras as keras
else:
    import keras
import jax.numpy as jnp
import torch
from kldiv.metrics import KLDivergence

T, P = [[0.0, 1.0], [0.0, 0.0]], [[0.6, 0.4], [0.4, 0.6]]
res = {}
m = KLDivergence()
res["keras_metric"] = isinstance(m, keras.metrics.Metric)
res["fresh"] = [m.variables == [], m.library, type(m.result()).__module__.split(".")[0]]
m.update_state(torch.tensor(T), torch.tensor(P), sample_weight=torch.tensor([1.0, 0.0]))
r1 = m.result()
m(torch.tensor(T), torch.tensor(P))  # __call__: update, then result
r2 = m.result()
res["torch"] = [type(r1).__module__.split(".")[0], str(r1.dtype), float(r1), float(r2), m.library,
                [str(v.dtype) for v in m.variables]]
try:
    m.update_state(jnp.asarray(T), jnp.asarray(P))
    res["mixing"] = "no error"
except TypeError as e:
    res["mixing"] = str(e)
other = KLDivergence()
other.update_state(torch.tensor(T), torch.tensor(P))
m.merge_state(other)
res["merged"] = float(m.result())
copy = pickle.loads(pickle.dumps(m))
res["pickle"] = [float(copy.result()), copy.library, isinstance(copy, keras.metrics.Metric)]
try:
    m.merge_state(kldiv.KLDivergence())
    res["merge_loss"] = "no error"
except TypeError as e:
    res["merge_loss"] = str(e)
m.reset_state()
res["reset"] = [m.variables == [], m.library]
if "tensorflow" in sys.modules:
    import tensorflow as tf
    # kldiv's state (torch) moves into Keras' variables when a graph needs them
    g = KLDivergence()
    g.update_state(torch.tensor(T), torch.tensor(P), sample_weight=torch.tensor([1.0, 0.0]))
    step = tf.function(lambda: g.update_state(tf.constant(T), tf.constant(P)))
    step()
    step()  # the traced graph: one more batch, the carried state is not added again
    res["graph"] = [float(g.result()), repr(g), all(isinstance(v, tf.Variable) for v in g.variables)]
print("JSON" + json.dumps(res))
"""

OUTSIDE_RUNS = {"jax": {"KERAS_BACKEND": "jax"}, "tf_keras": {"TF_USE_LEGACY_KERAS": "1"}}


@pytest.fixture(scope="module")
def outside_runs() -> dict[str, dict | str]:
    for module in ("torch", "jax"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: the outside-Keras check uses torch and JAX arrays")
    return _run_all(OUTSIDE_SCRIPT, OUTSIDE_RUNS)


@pytest.mark.parametrize("name", list(OUTSIDE_RUNS))
def test_keras_aware_metric_outside_keras_keeps_kldiv_behaviour(name: str, outside_runs: dict[str, Any]) -> None:
    res = outside_runs[name]
    if isinstance(res, str) and res.startswith("SKIP "):
        pytest.skip(res[5:])
    assert isinstance(res, dict), f"the {name} run failed:\n{res}"
    assert res["keras_metric"]
    assert res["fresh"] == [True, None, "numpy"]
    lib, dtype, r1, r2, library, var_dtypes = res["torch"]
    assert (lib, dtype, library, var_dtypes) == ("torch", "torch.float32", "torch", ["torch.float64"] * 2)
    np.testing.assert_allclose([r1, r2], [0.9162892, 0.61085844], rtol=1e-7)
    assert "torch state" in res["mixing"] and "jax arrays" in res["mixing"]
    assert "kldiv.metrics.KLDivergence" in res["mixing"]
    np.testing.assert_allclose(res["merged"], (0.9162892 * 3 - 2 * 3.0809074e-06) / 5, rtol=1e-6)
    copy_value, copy_library, copy_is_keras = res["pickle"]
    assert copy_value == res["merged"] and copy_library == "torch" and copy_is_keras
    assert "kldiv.losses.KLDivergence" in res["merge_loss"]
    if name == "tf_keras":
        value, text, tf_variables = res["graph"]
        np.testing.assert_allclose(value, (0.9162892 * 3 - 2 * 3.0809074e-06) / 5, rtol=1e-6)
        assert text.endswith("tf_keras variables)") and tf_variables
    assert res["reset"] == [True, None]
