"""The family's metrics in Keras 3 (JAX backend, one subprocess): ``fit`` and ``evaluate``
with ``kldiv.metrics.KLDivergence``/``ReverseKLDivergence``/``JensenShannonDivergence`` (with
``inputs=``, ``temperature=``, ``beta=``) log, batch for batch, what hand-written
``keras.metrics.MeanMetricWrapper`` s of the same divergences (written in ``keras.ops`` from the
definitions) log, compiled and eagerly, with sample weights; a metric made before Keras was
imported (which Keras wraps) too. Pickling, repr, configs and a saved and loaded model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

KERAS_SCRIPT = r"""
import json, pickle, os, tempfile
import numpy as np
import kldiv
from kldiv.metrics import JensenShannonDivergence, KLDivergence, ReverseKLDivergence

OPTS = {"inputs": ("probs", "logits"), "temperature": 2.0}
early = ReverseKLDivergence(name="early", **OPTS)  # made before Keras: Keras wraps it
import keras
from keras import ops

def logs(y_true, y_pred):
    lp = ops.log(ops.clip(y_true, 1e-7, 1.0))
    lq = ops.log_softmax(y_pred / 2.0, axis=-1)
    return lp, lq

def kl_ref(y_true, y_pred):
    lp, lq = logs(y_true, y_pred)
    return ops.sum(ops.exp(lp) * (lp - lq), axis=-1)

def rkl_ref(y_true, y_pred):
    lp, lq = logs(y_true, y_pred)
    return ops.sum(ops.exp(lq) * (lq - lp), axis=-1)

def js_ref(y_true, y_pred):
    lp, lq = logs(y_true, y_pred)
    lm = ops.logaddexp(np.log(0.3) + lp, np.log(0.7) + lq)
    return 0.3 * ops.sum(ops.exp(lp) * (lp - lm), axis=-1) + 0.7 * ops.sum(ops.exp(lq) * (lq - lm), axis=-1)

rng = np.random.default_rng(0)
x = rng.normal(size=(40, 6)).astype("float32")
y = rng.dirichlet(np.ones(4), size=40).astype("float32")
y[:6] = np.eye(4, dtype="float32")[rng.integers(0, 4, 6)]
w = (rng.random(40) * (rng.random(40) > 0.2)).astype("float32")  # weights, some masked

class Log(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []
    def on_train_batch_end(self, batch, logs=None):
        self.rows.append({k: float(v) for k, v in logs.items()})
    def on_test_batch_end(self, batch, logs=None):
        self.rows.append({k: float(v) for k, v in logs.items()})

res = {}
for eager in (False, True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])  # logits
    ours = [KLDivergence(name="kl", **OPTS), ReverseKLDivergence(name="rkl", **OPTS),
            JensenShannonDivergence(name="js", beta=0.3, **OPTS), early]
    refs = [keras.metrics.MeanMetricWrapper(fn, name=n) for fn, n in
            ((kl_ref, "kl_ref"), (rkl_ref, "rkl_ref"), (js_ref, "js_ref"), (rkl_ref, "early_ref"))]
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", run_eagerly=eager,
                  weighted_metrics=ours + refs)
    log = Log()
    model.fit(x, y, sample_weight=w, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[log])
    ev = model.evaluate(x[:24], y[:24], sample_weight=w[:24], batch_size=10, return_dict=True, verbose=0,
                        callbacks=[log])
    res[f"eager{int(eager)}"] = {"rows": log.rows, "evaluate": ev}
    res["keras_metric"] = [isinstance(m, keras.metrics.Metric) for m in ours]
    res["repr"] = repr(ours[2])
    copy = pickle.loads(pickle.dumps(ours[2]))
    res["pickle"] = [float(ours[2].result()), float(copy.result()), copy.get_config() == ours[2].get_config(),
                     isinstance(copy, keras.metrics.Metric)]
    res["config"] = ours[2].get_config()
# a model compiled with kldiv's metrics saves and loads (their configs go through Keras' JSON)
saved = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
saved.compile(loss="mse", weighted_metrics=[KLDivergence(name="kl", **OPTS), ReverseKLDivergence(name="rkl", **OPTS),
                                            JensenShannonDivergence(name="js", beta=0.3, **OPTS)])
path = os.path.join(tempfile.mkdtemp(), "m.keras")
saved.save(path)
objects = {c.__name__: c for c in (KLDivergence, ReverseKLDivergence, JensenShannonDivergence)}
loaded = keras.models.load_model(path, custom_objects=objects)
res["loaded"] = [saved.evaluate(x[:24], y[:24], sample_weight=w[:24], return_dict=True, verbose=0),
                 loaded.evaluate(x[:24], y[:24], sample_weight=w[:24], return_dict=True, verbose=0),
                 [m.get_config() for m in loaded.metrics[-1].metrics] if hasattr(loaded.metrics[-1], "metrics") else None]
res["early_untouched"] = early.variables == []
print("JSON" + json.dumps(res))
"""


def test_keras3_jax_matches_a_hand_written_mean_metric_wrapper() -> None:
    for module in ("keras", "jax"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: the Keras 3 JAX-backend run needs keras and jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", KERAS_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("JSON")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    res = json.loads(line[4:])
    assert res["keras_metric"] == [True, True, True, False]  # "early" was made before Keras
    for case in ("eager0", "eager1"):
        rows = res[case]["rows"]
        assert len(rows) == 6 + 3
        for name in ("kl", "rkl", "js", "early"):
            ours = [r[name] for r in rows]
            ref = [r[f"{name}_ref"] for r in rows]
            np.testing.assert_allclose(ours, ref, rtol=2e-6, err_msg=f"{case}: {name}")
            assert len(set(np.round(ref, 5))) > 3, "the logged values do not change"
            np.testing.assert_allclose(res[case]["evaluate"][name], res[case]["evaluate"][f"{name}_ref"], rtol=2e-6)
    before, after, configs = res["loaded"]
    assert configs is None or [c.get("temperature") for c in configs] == [2.0] * 3
    for name in ("kl", "rkl", "js"):
        assert before[name] > 0
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6)
    ours, copied, same_config, is_keras = res["pickle"]
    assert ours == copied and ours > 0 and same_config and is_keras
    assert res["config"] == {"name": "js", "dtype": "float32", "beta": 0.3, "inputs": ["probs", "logits"],
                             "temperature": 2.0}
    assert res["repr"].endswith("temperature=2.0, state in keras variables)"), res["repr"]
    assert res["early_untouched"]
