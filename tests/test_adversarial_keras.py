"""Hostile and unusual uses of kldiv's losses and metrics inside Keras.

Keras fixes its backend at import, so each Keras runs in its own subprocess (all at once):
Keras 3 on JAX, torch and TensorFlow (``KERAS_BACKEND``), and tf.keras (Keras 2 through
tf-keras, ``TF_USE_LEGACY_KERAS=1``). Each prints one JSON object; the tests compare kldiv
with Keras' own ``KLDivergence`` (and with a float64 oracle written from the definition) on:

- masked outputs (``Embedding(mask_zero=True)``): Keras' losses and metrics weight by the mask
  (a mean over the unmasked entries); kldiv's must too, in ``compile`` and called directly;
- a kldiv loss passed as a metric (Keras hashes it), and ``hash`` of equal losses;
- mixed precision policies (``mixed_float16``, ``mixed_bfloat16``): Keras 3 computes a compiled
  loss in float32 (its floatx), and so must kldiv's, not round it to the half type first;
- saving and loading a model that holds kldiv's loss *and* metric of one name
  (``"KLDivergence"``): ``custom_objects`` can map that name to one class only.

Every Keras process is skipped cleanly, with the reason, when its packages are missing.
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

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300

COMMON = r"""
import json, os, tempfile
try:
    import triton  # noqa: F401  (before TensorFlow: see tests/conftest.py)
except ImportError:
    pass
import numpy as np
import kldiv

early_loss = kldiv.KLDivergence(name="early_loss")  # made before any Keras is imported
LEGACY = os.environ.get("TF_USE_LEGACY_KERAS") == "1"
if LEGACY:
    import tensorflow as tf
    keras = tf.keras
    backend = "tf_keras"
else:
    import keras
    backend = keras.backend.backend()
res = {"backend": backend}
rng = np.random.default_rng(0)


def kl64(t, p):
    t = np.clip(np.asarray(t, np.float64), 1e-7, 1)
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1)
    return np.sum(t * np.log(t / p), axis=-1)


def capture(f):
    try:
        return f()
    except Exception as exc:  # reported, and the test names what failed
        return f"ERROR {type(exc).__name__}: {exc}"[:600]


def to_np(v):
    return np.asarray(keras.ops.convert_to_numpy(v) if not LEGACY else v.numpy(), np.float64)


# ---- masks: a (B, T) mask on a (B, T, C) output -------------------------------------------
B, T, C = 6, 5, 3
xm = rng.integers(1, 10, (B, T))
xm[:, 3:] = 0          # padding: masked
xm[0, 1:] = 0          # a row with one valid step
ym = rng.dirichlet(np.ones(C), (B, T)).astype("float32")
wm = rng.random(B).astype("float32")
wm2 = rng.random((B, T)).astype("float32")
keras.utils.set_random_seed(0)
inp = keras.Input((T,), dtype="int32")
out = keras.layers.Dense(C, activation="softmax")(keras.layers.Embedding(10, 4, mask_zero=True)(inp))
masked_model = keras.Model(inp, out)
pm = masked_model.predict(xm, verbose=0)
valid = (xm != 0).astype(np.float64)
per = kl64(ym, pm) * valid
oracle = {
    "auto": per.sum() / valid.sum(),
    "auto_w": (per * wm2).sum() / valid.sum(),
    "auto_w1": (per * wm[:, None]).sum() / valid.sum(),  # a (B,) weight: Keras 2's rank rule
    "sum": per.sum(),
    "sum_w": (per * wm2).sum(),
    "mean_with_sample_weight_w": (per * wm2).sum() / (valid * wm2).sum(),
}
res["mask_oracle"] = oracle
KERAS_RED = {"auto": "sum_over_batch_size", "sum": "sum",
             "mean_with_sample_weight": "mean_with_sample_weight"}
mask_eval = {}
for key, sw in (("auto", None), ("auto_w", wm2), ("auto_w1", wm), ("sum", None), ("sum_w", wm2),
                ("mean_with_sample_weight_w", wm2)):
    red = key.rsplit("_w", 1)[0] if "_w" in key else key
    vals = []
    # Keras 3 takes no (B,) weight with a (B, T) mask; tf.keras has no mean_with_sample_weight
    ref = (None if key == "auto_w1" or (LEGACY and red == "mean_with_sample_weight")
           else keras.losses.KLDivergence(reduction=KERAS_RED[red]))
    for loss in (kldiv.KLDivergence(reduction=red), ref):
        if loss is None:
            vals.append(None)
            continue
        masked_model.compile(loss=loss)
        vals.append(capture(lambda: masked_model.evaluate(xm, ym, sample_weight=sw, batch_size=B, verbose=0)))
    mask_eval[key] = vals
res["mask_eval"] = mask_eval
# every step masked: Keras gives 0 (nothing to average), never NaN
xz = np.zeros_like(xm)
zero = []
for loss in (kldiv.KLDivergence(), keras.losses.KLDivergence()):
    masked_model.compile(loss=loss)
    zero.append(capture(lambda: masked_model.evaluate(xz, ym, batch_size=B, verbose=0)))
res["mask_all_masked"] = zero
# called directly on a masked output (Keras' Loss.__call__ reads the mask too)
if not LEGACY:
    outm = masked_model(xm)
    res["mask_direct"] = [capture(lambda: float(to_np(kldiv.KLDivergence()(ym, outm, sample_weight=wm2)))),
                          capture(lambda: float(to_np(keras.losses.KLDivergence()(ym, outm, sample_weight=wm2))))]
    res["mask_direct_none"] = [
        capture(lambda: to_np(kldiv.KLDivergence(reduction="none")(ym, outm)).tolist()),
        capture(lambda: to_np(keras.losses.KLDivergence(reduction=None)(ym, outm)).tolist())]
    mets = [kldiv.metrics.KLDivergence(), keras.metrics.KLDivergence()]
    res["mask_metric_direct"] = [capture(lambda m=m: (m.update_state(ym, outm), float(to_np(m.result())))[1])
                                 for m in mets]

# ---- a kldiv loss as a metric (Keras hashes its metrics' functions) -------------------------
x = rng.random((32, 6), dtype=np.float32)
y = rng.dirichlet(np.ones(4), 32).astype("float32")
w = rng.random(32).astype("float32")


def model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])


m = model()
m.compile(loss="mse", metrics=[kldiv.KLDivergence(name="ours"), early_loss,
                               keras.metrics.KLDivergence(name="ref")])
res["loss_as_metric"] = capture(lambda: m.evaluate(x, y, verbose=0, return_dict=True))
a, b = kldiv.KLDivergence(reduction="sum"), kldiv.KLDivergence(reduction="sum")
res["hash"] = capture(lambda: [hash(a) == hash(b), a == b, len({a, b}), a in {b}])
"""

KERAS3 = r"""
# ---- mixed precision: Keras 3 computes a compiled loss in floatx ----------------------------
mixed = {}
for policy in ("mixed_float16", "mixed_bfloat16"):
    keras.mixed_precision.set_global_policy(policy)
    vals = []
    for loss in (kldiv.KLDivergence(), keras.losses.KLDivergence()):
        mp = model()
        mp.compile(optimizer="sgd", loss=loss)
        vals.append(capture(lambda: [mp.evaluate(x, y, sample_weight=w, batch_size=32, verbose=0),
                                     mp.fit(x, y, sample_weight=w, batch_size=32, epochs=2,
                                            shuffle=False, verbose=0).history["loss"]]))
    p16 = keras.ops.cast(keras.ops.convert_to_tensor(y * 0.5 + 0.125), policy[6:])
    # called directly, a kldiv loss keeps y_pred's dtype (SPEC): only compile computes in floatx
    direct = kldiv.KLDivergence()(y, p16)
    vals.append(keras.backend.standardize_dtype(direct.dtype))
    mixed[policy] = vals
    keras.mixed_precision.set_global_policy("float32")
res["mixed"] = mixed

# ---- save and load: kldiv's loss and metric share the name "KLDivergence" --------------------
m = model()
m.compile(optimizer="sgd", loss=kldiv.KLDivergence(),
          metrics=[kldiv.metrics.KLDivergence(), kldiv.metrics.JensenShannonDivergence(beta=0.3)])
m.fit(x, y, epochs=1, verbose=0)
path = os.path.join(tempfile.mkdtemp(), "m.keras")
m.save(path)
objs = {"KLDivergence": kldiv.metrics.KLDivergence,
        "JensenShannonDivergence": kldiv.metrics.JensenShannonDivergence}


def load(objs=objs):
    loaded = keras.models.load_model(path, custom_objects=objs)
    return [loaded.evaluate(x, y, verbose=0, return_dict=True),
            m.evaluate(x, y, verbose=0, return_dict=True), repr(loaded.loss)]


res["save_load"] = capture(load)
# the README's custom_objects: the loss class under the shared name
res["save_load_loss_class"] = capture(lambda: load(
    {"KLDivergence": kldiv.KLDivergence,
     "JensenShannonDivergence": kldiv.metrics.JensenShannonDivergence}))

# ---- torch: a Keras-aware loss under torch.compile, and Keras' jit_compile on torch ----------
if backend == "torch":
    import torch

    loss_fn = kldiv.KLDivergence()
    net = torch.nn.Linear(6, 4)
    step = torch.compile(lambda a, b, c: loss_fn(b, torch.softmax(net(a), -1), sample_weight=c),
                         fullgraph=True)
    xt, yt, wt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(w)
    res["torch_compile"] = [capture(lambda: float(step(xt, yt, wt))),
                            float(loss_fn(yt, torch.softmax(net(xt), -1), sample_weight=wt))]
    jit = []
    for loss in (kldiv.KLDivergence(), keras.losses.KLDivergence()):
        masked_model.compile(optimizer="sgd", loss=loss, jit_compile=True)
        jit.append(capture(lambda: masked_model.evaluate(xm, ym, batch_size=B, verbose=0)))
    res["torch_jit_mask"] = jit
    # a mask set by hand (torch tensors take attributes): of another library, or not an array
    yt4, pt4 = y[:4], torch.from_numpy(y[4:8].copy())
    pt4._keras_mask = np.array([True, False, True, True])
    valid4 = np.array([1.0, 0.0, 1.0, 1.0])
    res["mask_numpy_on_torch"] = [capture(lambda: float(kldiv.KLDivergence()(yt4, pt4))),
                                  float((kl64(yt4, y[4:8]) * valid4).sum() / valid4.sum())]
    pt5 = torch.from_numpy(y[4:8].copy())
    pt5._keras_mask = "yes"
    res["mask_not_an_array"] = capture(lambda: kldiv.KLDivergence()(yt4, pt5))
    # a mask of a shape that does not fit the per-sample loss: the error names the mask
    pt6 = torch.from_numpy(y[4:8].copy())
    pt6._keras_mask = np.array([True, False, True])
    res["mask_bad_shape"] = [capture(lambda: kldiv.KLDivergence()(yt4, pt6)),
                             capture(lambda: kldiv.KLDivergence()(yt4, pt6, sample_weight=w[:4]))]
    rp6 = torch.from_numpy(np.log(y[4:8, :3]).copy())
    rp6._keras_mask = np.ones((4, 2), dtype=bool)
    res["mask_bad_shape_estimator"] = capture(lambda: kldiv.KLEstimator()(np.log(y[:4, :3]), rp6))
# the estimator loss, by its argument names, with Keras loaded
lp = np.log(rng.random(16)).astype("float32")
rp = np.log(rng.random(16)).astype("float32")
est = kldiv.KLEstimator()
res["estimator_keywords"] = [capture(lambda: float(est(logprob=lp, ref_logprob=rp, sample_weight=w[:16]))),
                             float(est(lp, rp, w[:16]))]
"""

LEGACY = r"""
# ---- save and load (HDF5): kldiv's loss and metric share the name "KLDivergence" -----------
m = model()
m.compile(optimizer="sgd", loss=kldiv.KLDivergence(), metrics=[kldiv.metrics.KLDivergence()])
m.fit(x, y, epochs=1, verbose=0)
path = os.path.join(tempfile.mkdtemp(), "m.h5")
m.save(path)


def load(cls=kldiv.metrics.KLDivergence):
    loaded = keras.models.load_model(path, custom_objects={"KLDivergence": cls})
    return [loaded.evaluate(x, y, verbose=0, return_dict=True),
            m.evaluate(x, y, verbose=0, return_dict=True), repr(loaded.loss)]


res["save_load"] = capture(load)
res["save_load_loss_class"] = capture(lambda: load(kldiv.KLDivergence))
"""

REGISTRY = r"""
# ---- Keras' registry: kldiv's classes saved as "kldiv>..." / "kldiv.metrics>...", loaded
# without custom_objects; Keras' own KLDivergence keeps its name
SAVE = os.environ["KLDIV_SAVE_DIR"]
S, D = keras.saving.serialize_keras_object, keras.saving.deserialize_keras_object
reg = {}
reg["keras_own"] = capture(lambda: [type(D(S(keras.losses.KLDivergence()))).__module__.split(".")[0],
                                    type(D(S(keras.metrics.KLDivergence()))).__module__.split(".")[0]])


def round_trip(obj):
    s = S(obj)
    n = D(json.loads(json.dumps(s)))
    return [s["registered_name"], type(n).__module__ + "." + type(n).__name__,
            n.get_config() == obj.get_config(), type(n) is type(obj)]


reg["round_trips"] = [capture(lambda o=o: round_trip(o)) for o in (
    kldiv.KLDivergence(reduction="sum", name="a"), kldiv.losses.ReverseKLDivergence(inputs="logits", temperature=2.0),
    kldiv.losses.JensenShannonDivergence(beta=0.25), kldiv.KLEstimator(), kldiv.metrics.KLDivergence(name="m"),
    kldiv.metrics.JensenShannonDivergence(beta=0.3, dtype="float64"),
    kldiv.metrics.ReverseKLDivergence(inputs=["log_probs", "logits"]), early_loss)]


# a user's subclasses, registered the Keras way: saved under the user's names
@keras.saving.register_keras_serializable("kldiv_test")
class MyKL(kldiv.KLDivergence):
    pass


@keras.saving.register_keras_serializable("kldiv_test")
class MyJS(kldiv.metrics.JensenShannonDivergence):
    pass


reg["user_subclasses"] = [capture(lambda o=o: round_trip(o)) for o in (MyKL(reduction="sum"), MyJS(beta=0.2))]
sm = model()
sm.compile(optimizer="sgd", loss=kldiv.KLDivergence(reduction="sum"),
           metrics=[kldiv.metrics.KLDivergence(), kldiv.metrics.JensenShannonDivergence(beta=0.3),
                    kldiv.ReverseKLDivergence(name="rk"), keras.metrics.KLDivergence(name="keras_kl")],
           weighted_metrics=[kldiv.metrics.KLDivergence(name="wkl")])
sm.fit(x, y, sample_weight=w, epochs=1, verbose=0)
np.savez(os.path.join(SAVE, "data.npz"), x=x, y=y, w=w)
reg["files"] = ["m.keras"] + (["m.h5"] if LEGACY else [])
reg["same_process"] = {}
for f in reg["files"]:
    sm.save(os.path.join(SAVE, f))
    reg["same_process"][f] = capture(lambda f=f: keras.models.load_model(os.path.join(SAVE, f)).evaluate(
        x, y, sample_weight=w, verbose=0, return_dict=True))
reg["before"] = sm.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)
um = model()
um.compile(optimizer="sgd", loss=MyKL(), metrics=[MyJS(beta=0.2)])
um.save(os.path.join(SAVE, "user.keras"))
reg["user_model"] = capture(lambda: [type(v).__name__ for v in (
    keras.models.load_model(os.path.join(SAVE, "user.keras")).loss,)] + [
    um.evaluate(x, y, verbose=0, return_dict=True),
    keras.models.load_model(os.path.join(SAVE, "user.keras")).evaluate(x, y, verbose=0, return_dict=True)])
res["registry"] = reg
print("JSON" + json.dumps(res))
"""

# Loads the models saved by REGISTRY in a fresh process, with kldiv imported before or after Keras
LOAD = r"""
import json, os
try:
    import triton  # noqa: F401  (before TensorFlow: see tests/conftest.py)
except ImportError:
    pass
import numpy as np
LEGACY = os.environ.get("TF_USE_LEGACY_KERAS") == "1"
SAVE = os.environ["KLDIV_SAVE_DIR"]
if os.environ["KLDIV_ORDER"] == "kldiv_first":
    import kldiv
if LEGACY:
    import tensorflow as tf
    keras = tf.keras
else:
    import keras
import kldiv  # noqa: F811  (after Keras in the keras_first order)

data = np.load(os.path.join(SAVE, "data.npz"))
res = {}
for f in ["m.keras"] + (["m.h5"] if LEGACY else []):
    try:
        m = keras.models.load_model(os.path.join(SAVE, f))
        res[f] = [m.evaluate(data["x"], data["y"], sample_weight=data["w"], verbose=0, return_dict=True),
                  repr(m.loss), type(m.loss).__module__]
    except Exception as exc:
        res[f] = f"ERROR {type(exc).__name__}: {exc}"[:600]
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


def _collect(procs: dict[str, subprocess.Popen[str]]) -> dict[str, dict[str, Any] | str]:
    """Each process' JSON line (or its error output)."""
    results: dict[str, dict[str, Any] | str] = {}
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
def save_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Where each Keras run saves its models (and the data to evaluate them on)."""
    return {name: tmp_path_factory.mktemp(f"saved_{name}") for name in RUNS}


@pytest.fixture(scope="module")
def keras_runs(save_dirs: dict[str, Path]) -> dict[str, dict[str, Any] | str]:
    """One subprocess per Keras, all at once; their JSON (or their error, or a skip reason)."""
    procs = {}
    skipped: dict[str, dict[str, Any] | str] = {}
    for name, extra in RUNS.items():
        reason = _missing(name)
        if reason is not None:
            skipped[name] = "SKIP " + reason
            continue
        script = COMMON + (LEGACY if name == "tf_keras" else KERAS3) + REGISTRY
        env = _env({**extra, "KLDIV_SAVE_DIR": str(save_dirs[name])})
        procs[name] = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT,
                                       text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return {**skipped, **_collect(procs)}


ORDERS = ("kldiv_first", "keras_first")
# the post-import hook (kldiv first) is the same for Keras 3's three backends: checked on one
HOOK_RUNS = ("jax", "tf_keras")


@pytest.fixture(scope="module")
def loading_runs(keras_runs: dict[str, dict[str, Any] | str],
                 save_dirs: dict[str, Path]) -> dict[str, dict[str, Any] | str]:
    """The models each Keras run saved, loaded without ``custom_objects`` in fresh processes
    (kldiv imported before Keras, and after), all at once."""
    procs = {}
    for name, extra in RUNS.items():
        if not isinstance(keras_runs.get(name), dict):
            continue
        for order in ORDERS:
            if order == "kldiv_first" and name not in HOOK_RUNS:
                continue
            env = _env({**extra, "KLDIV_SAVE_DIR": str(save_dirs[name]), "KLDIV_ORDER": order})
            procs[f"{name}/{order}"] = subprocess.Popen(
                [sys.executable, "-c", LOAD], env=env, cwd=ROOT, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return _collect(procs)


@pytest.fixture(params=list(RUNS))
def run(request: pytest.FixtureRequest, keras_runs: dict[str, dict[str, Any] | str]) -> dict[str, Any]:
    res = keras_runs[request.param]
    if isinstance(res, str) and res.startswith("SKIP "):
        pytest.skip(res[5:])
    assert isinstance(res, dict), f"the {request.param} Keras run failed:\n{res}"
    assert res["backend"] == request.param
    return res


def _number(value: Any, what: str) -> float:
    assert not isinstance(value, str), f"{what}: {value}"
    return float(value)


def test_masked_output_compiled_loss_matches_keras_and_the_oracle(run: dict[str, Any]) -> None:
    """Keras weights a loss by the output's mask (a mean over the unmasked steps): kldiv's
    loss in ``compile`` did not, and averaged over the padding too."""
    for key, (ours, ref) in run["mask_eval"].items():
        ours = _number(ours, f"kldiv, {key}")
        np.testing.assert_allclose(ours, run["mask_oracle"][key], rtol=2e-5, err_msg=key)
        if ref is not None:
            np.testing.assert_allclose(ours, _number(ref, f"Keras, {key}"), rtol=2e-5, err_msg=key)
    # the control: the mask changes the value (padding steps have a non-zero divergence)
    unmasked_mean = run["mask_oracle"]["sum"] / 30
    assert abs(run["mask_oracle"]["auto"] - unmasked_mean) > 0.1 * unmasked_mean


def test_all_masked_batch_is_zero_not_nan(run: dict[str, Any]) -> None:
    ours, ref = (_number(v, "all masked") for v in run["mask_all_masked"])
    assert ours == 0.0
    if run["backend"] != "tf_keras":  # tf.keras divides 0 by 0 here: NaN
        assert ref == 0.0


def test_masked_output_called_directly(run: dict[str, Any]) -> None:
    if run["backend"] == "tf_keras":
        pytest.skip("tf.keras outputs carry their mask inside compile's graph only")
    ours, ref = (_number(v, "direct call") for v in run["mask_direct"])
    np.testing.assert_allclose(ours, ref, rtol=2e-5)
    ours_none, ref_none = run["mask_direct_none"]
    assert not isinstance(ours_none, str), ours_none
    np.testing.assert_allclose(ours_none, ref_none, rtol=2e-5, atol=1e-7)
    ours_m, ref_m = (_number(v, "metric") for v in run["mask_metric_direct"])
    np.testing.assert_allclose(ours_m, ref_m, rtol=2e-5)


def test_loss_object_as_metric(run: dict[str, Any]) -> None:
    """``compile(metrics=[kldiv.KLDivergence()])``: Keras 3 asks ``fn in ALL_OBJECTS``, which
    hashes the loss (unhashable before); also for a loss made before Keras was imported."""
    logs = run["loss_as_metric"]
    assert isinstance(logs, dict), logs
    assert logs["ours"] == pytest.approx(logs["ref"], rel=2e-6)
    assert logs["early_loss"] == pytest.approx(logs["ref"], rel=2e-6)


def test_equal_losses_hash_equal(run: dict[str, Any]) -> None:
    assert run["hash"] == [True, True, 1, True]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_compiled_loss_in_floatx(run: dict[str, Any], policy: str) -> None:
    """Keras 3 computes a compiled loss in float32 from the half-precision output; kldiv
    rounded its loss to the output's half type first (bfloat16 keeps 3 digits: the logged
    loss did not move between epochs)."""
    if run["backend"] == "tf_keras":
        pytest.skip("tf.keras computes its losses in the output's dtype: kldiv matches it as is")
    ours, ref, direct_dtype = run["mixed"][policy]
    assert not isinstance(ours, str), ours
    assert not isinstance(ref, str), ref
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5)
    assert ours[1][0] != ours[1][1]
    assert direct_dtype == policy[len("mixed_"):]  # a direct call keeps y_pred's dtype


def test_save_load_with_loss_and_metric_of_one_name(run: dict[str, Any]) -> None:
    """``custom_objects={"KLDivergence": kldiv.metrics.KLDivergence}`` loads a model whose
    loss is kldiv's ``KLDivergence`` too: the metric class rebuilds a loss from a loss config."""
    for entry in ("save_load", "save_load_loss_class"):  # either class under the name
        res = run[entry]
        assert not isinstance(res, str), (entry, res)
        after, before, loss_repr = res
        assert loss_repr.startswith("KLDivergence(reduction='auto'"), loss_repr
        assert set(after) == set(before)
        for key, value in before.items():
            np.testing.assert_allclose(after[key], value, rtol=1e-6, err_msg=key)


def test_keras_aware_loss_under_torch_compile(run: dict[str, Any]) -> None:
    """With Keras loaded, kldiv's loss is Keras-aware: its call must stay traceable by
    ``torch.compile(fullgraph=True)`` (no frame inspection, no Keras mask table), and Keras'
    own ``jit_compile=True`` on torch must still weigh by the mask."""
    if run["backend"] != "torch":
        pytest.skip("torch.compile is checked on Keras' torch backend")
    compiled, eager = run["torch_compile"]
    np.testing.assert_allclose(_number(compiled, "torch.compile"), eager, rtol=1e-5)
    ours, ref = (_number(v, "jit_compile") for v in run["torch_jit_mask"])
    np.testing.assert_allclose(ours, ref, rtol=2e-5)


def test_estimator_by_argument_names_with_keras_loaded(run: dict[str, Any]) -> None:
    if run["backend"] == "tf_keras":
        pytest.skip("checked with Keras 3 loaded")
    by_name, positional = run["estimator_keywords"]
    assert _number(by_name, "keywords") == positional


# ---- Keras' registry: saved models load without custom_objects -----------------------------

REGISTERED = ["kldiv>KLDivergence", "kldiv>ReverseKLDivergence", "kldiv>JensenShannonDivergence",
              "kldiv>KLEstimator", "kldiv.metrics>KLDivergence", "kldiv.metrics>JensenShannonDivergence",
              "kldiv.metrics>ReverseKLDivergence", "kldiv>KLDivergence"]


def _close_logs(after: dict[str, float], before: dict[str, float], what: str) -> None:
    assert set(after) == set(before), what
    for key, value in before.items():
        np.testing.assert_allclose(after[key], value, rtol=1e-6, err_msg=f"{what}: {key}")


def test_registered_names_round_trip_and_leave_keras_own_class_alone(run: dict[str, Any]) -> None:
    """kldiv's classes are registered as ``kldiv>Name`` (losses) and ``kldiv.metrics>Name``
    (metrics: the loss and metric classes share their names); Keras' own ``KLDivergence``
    still deserializes to Keras' class; configs round-trip exactly, through JSON."""
    reg = run["registry"]
    assert reg["keras_own"] == [run["backend"] if run["backend"] == "tf_keras" else "keras"] * 2
    names = []
    for entry in reg["round_trips"]:
        assert not isinstance(entry, str), entry
        name, cls, same_config, same_class = entry
        names.append(name)
        assert cls.startswith("kldiv."), cls
        assert same_config and same_class, entry
    assert names == REGISTERED


def test_user_subclass_registered_the_keras_way_saves_and_loads(run: dict[str, Any]) -> None:
    """A user's registered subclass of kldiv's loss or metric: its instances are of the
    Keras-aware class made of it, which Keras saved under the bare class name (not loadable)."""
    reg = run["registry"]
    assert [e if isinstance(e, str) else e[0] for e in reg["user_subclasses"]] == [
        "kldiv_test>MyKL", "kldiv_test>MyJS"]
    assert all(e[2] and e[3] for e in reg["user_subclasses"])
    user = reg["user_model"]
    assert not isinstance(user, str), user
    assert user[0] == "MyKL"
    _close_logs(user[2], user[1], "user model")


def test_saved_model_loads_without_custom_objects_in_the_same_process(run: dict[str, Any]) -> None:
    reg = run["registry"]
    for f in reg["files"]:
        after = reg["same_process"][f]
        assert not isinstance(after, str), (f, after)
        _close_logs(after, reg["before"], f)
    assert "keras_kl" in reg["before"] and "wkl" in reg["before"]


@pytest.mark.parametrize("order", ORDERS)
def test_saved_model_loads_without_custom_objects_in_a_fresh_process(
        run: dict[str, Any], loading_runs: dict[str, dict[str, Any] | str], order: str) -> None:
    """``import keras; import kldiv`` (kldiv's classes do not exist when Keras' registry is
    filled: stand-ins) and ``import kldiv; import keras`` (a post-import hook registers)."""
    if order == "kldiv_first" and run["backend"] not in HOOK_RUNS:
        pytest.skip(f"the post-import hook is checked on {' and '.join(HOOK_RUNS)}")
    loaded = loading_runs[f"{run['backend']}/{order}"]
    assert isinstance(loaded, dict), loaded
    reg = run["registry"]
    for f in reg["files"]:
        entry = loaded[f]
        assert not isinstance(entry, str), (f, entry)
        after, loss_repr, loss_module = entry
        _close_logs(after, reg["before"], f"{order} {f}")
        assert loss_repr == "KLDivergence(reduction='sum', name='kl_divergence')"
        assert loss_module == "kldiv.losses"


def test_registry_lists_every_keras_aware_class_kldiv_exports() -> None:
    """A new loss or metric class must be added to the registry's table, or its models would
    not load without custom_objects (checked without Keras: the table is static)."""
    import kldiv
    import kldiv.losses
    import kldiv.metrics
    from kldiv._keras import KerasAwareLoss
    from kldiv._keras.registry import LOSS_PACKAGE, METRIC_PACKAGE, PUBLIC_CLASSES
    from kldiv._metric_base import DivergenceMetric

    losses = {n for m in (kldiv, kldiv.losses) for n, v in vars(m).items()
              if isinstance(v, type) and issubclass(v, KerasAwareLoss) and not n.startswith("_")
              and n not in ("DivergenceLoss", "LossBase")}
    metrics = {n for n, v in vars(kldiv.metrics).items() if isinstance(v, type)
               and issubclass(v, DivergenceMetric) and v is not DivergenceMetric}
    assert losses == set(PUBLIC_CLASSES[LOSS_PACKAGE][1])
    assert metrics == set(PUBLIC_CLASSES[METRIC_PACKAGE][1])


def test_hand_set_mask_of_another_library_or_not_an_array(run: dict[str, Any]) -> None:
    """A ``_keras_mask`` set by hand on a torch output: a NumPy mask weighs as Keras' would
    (was an AttributeError: the mask was cast with torch's functions), a string is a TypeError
    naming the mask (was an AttributeError from the backend)."""
    if run["backend"] != "torch":
        pytest.skip("torch tensors take attributes: checked on Keras' torch backend")
    ours, oracle = run["mask_numpy_on_torch"]
    np.testing.assert_allclose(_number(ours, "NumPy mask"), oracle, rtol=1e-5)
    message = run["mask_not_an_array"]
    assert message.startswith("ERROR TypeError: the Keras mask (_keras_mask) of y_pred"), message


def test_mask_of_a_shape_that_does_not_fit_names_the_mask(run: dict[str, Any]) -> None:
    """A ``_keras_mask`` whose shape does not fit the per-sample loss: the ValueError names
    the mask (was "sample_weight of shape (3,) does not broadcast ...", naming an argument
    the caller never gave)."""
    if run["backend"] != "torch":
        pytest.skip("torch tensors take attributes: checked on Keras' torch backend")
    for message in (*run["mask_bad_shape"], run["mask_bad_shape_estimator"]):
        assert message.startswith("ERROR ValueError: the Keras mask (_keras_mask) of "), message
        assert "does not broadcast" in message, message
