"""kldiv in training pipelines: Keras 3 ``compile`` on each backend, and a plain PyTorch loop.

Keras 3 fixes its backend at import (``KERAS_BACKEND``), so each backend trains in its own
subprocess; the three run concurrently and report JSON. Every comparison is against Keras'
own ``keras.losses.KLDivergence`` trained from the same start on the same data, and a control
shows the comparison can fail: kldiv's loss hidden in a plain function (which Keras wraps and
weights a second time) does not match once sample weights are given.

tf.keras (Keras 2, ``tf_keras``) compile is tested in ``test_tensorflow.py``, next to the
other TensorFlow tests, to import TensorFlow once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
KERAS_BACKENDS = ("jax", "torch", "tensorflow")

# Runs in a subprocess with KERAS_BACKEND set; prints one JSON object.
KERAS_SCRIPT = r"""
import json, os, pickle, sys, tempfile
import numpy as np
import keras
import kldiv

rng = np.random.default_rng(0)
x = rng.normal(size=(48, 6)).astype("float32")
y = rng.dirichlet(np.ones(4), size=48).astype("float32")
y[:8] = np.eye(4, dtype="float32")[rng.integers(0, 4, 8)]  # exact 0s and 1s
w = rng.random(48).astype("float32")


def model():
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])
    return m


def steps(loss, weighted=True, n=6):
    m = model()
    m.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    sw = w[:16] if weighted else None
    out = [float(m.train_on_batch(x[:16], y[:16], sample_weight=sw)) for _ in range(n)]
    return out, m.get_weights()[0].tolist()


def fit(loss):
    m = model()
    m.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    h = m.fit(x, y, sample_weight=w, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return h.history["loss"], [v.tolist() for v in m.get_weights()]


res = {"backend": keras.backend.backend()}
loss = kldiv.KLDivergence()
res["is_keras_loss"] = isinstance(loss, keras.losses.Loss) and isinstance(loss, kldiv.KLDivergence)
res["pickle_roundtrip"] = pickle.loads(pickle.dumps(loss)) == loss
for reduction in ("sum_over_batch_size", "sum"):
    ours = "auto" if reduction == "sum_over_batch_size" else reduction
    res[reduction] = {
        "kldiv": steps(kldiv.KLDivergence(reduction=ours)),
        "keras": steps(keras.losses.KLDivergence(reduction=reduction)),
    }
res["unweighted"] = {"kldiv": steps(kldiv.KLDivergence(), weighted=False),
                     "keras": steps(keras.losses.KLDivergence(), weighted=False)}
res["control"] = steps(lambda t, p: kldiv.KLDivergence()(t, p))
res["fit"] = {"kldiv": fit(kldiv.KLDivergence()), "keras": fit(keras.losses.KLDivergence())}

# a compiled model saves and loads with its kldiv loss
m = model()
m.compile(optimizer="sgd", loss=kldiv.KLDivergence(reduction="sum"))
m.train_on_batch(x[:16], y[:16])
path = os.path.join(tempfile.mkdtemp(), "m.keras")
m.save(path)
loaded = keras.models.load_model(path, custom_objects={"KLDivergence": kldiv.KLDivergence})
res["loaded_loss"] = repr(loaded.loss)
res["loaded_train"] = float(loaded.train_on_batch(x[:16], y[:16], sample_weight=w[:16]))
print("JSON" + json.dumps(res))
"""


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def keras_runs() -> dict[str, dict | str]:
    """Start one training subprocess per Keras backend, all at once; collect their JSON."""
    if not _have("keras"):
        pytest.skip("keras (Keras 3) is not installed")
    procs = {}
    for backend in KERAS_BACKENDS:
        if not _have({"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}[backend]):
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu",
                   TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        env.pop("TF_USE_LEGACY_KERAS", None)
        procs[backend] = subprocess.Popen(
            [sys.executable, "-c", KERAS_SCRIPT], env=env, cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    results: dict[str, dict | str] = {}
    try:
        for backend, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err = f"timed out after 300 s\n{err}"
            line = next((ln for ln in out.splitlines() if ln.startswith("JSON")), None)
            results[backend] = json.loads(line[4:]) if proc.returncode == 0 and line else err[-4000:]
    finally:  # never leave a training process behind (a failure above, an interrupt)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(params=KERAS_BACKENDS)
def keras_run(request: pytest.FixtureRequest, keras_runs: dict[str, dict | str]) -> dict:
    backend = request.param
    if backend not in keras_runs:
        pytest.skip(f"Keras backend {backend} is not installed")
    res = keras_runs[backend]
    assert isinstance(res, dict), f"Keras {backend} training failed:\n{res}"
    assert res["backend"] == backend
    return res


def test_keras3_compile_takes_kldiv_as_a_keras_loss(keras_run: dict) -> None:
    assert keras_run["is_keras_loss"]
    assert keras_run["pickle_roundtrip"]


@pytest.mark.parametrize("case", ["sum_over_batch_size", "sum", "unweighted"])
def test_keras3_compile_matches_keras_step_for_step(keras_run: dict, case: str) -> None:
    (ours, w_ours), (ref, w_ref) = keras_run[case]["kldiv"], keras_run[case]["keras"]
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(w_ours, w_ref, rtol=1e-5, atol=1e-6)
    assert ours[-1] < ours[0], "the loss did not go down"


def test_keras3_fit_honours_sample_weight(keras_run: dict) -> None:
    (hist, weights), (ref_hist, ref_weights) = keras_run["fit"]["kldiv"], keras_run["fit"]["keras"]
    np.testing.assert_allclose(hist, ref_hist, rtol=2e-5)
    for a, b in zip(weights, ref_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the control: a plain function around kldiv is wrapped by Keras, which applies the
    # weights to the already reduced loss; its losses differ, so the comparison above can fail
    control = keras_run["control"][0]
    ref = keras_run["sum_over_batch_size"]["keras"][0]
    assert not np.allclose(control, ref, rtol=1e-3)


def test_keras3_model_with_kldiv_loss_saves_and_loads(keras_run: dict) -> None:
    assert keras_run["loaded_loss"] == "KLDivergence(reduction='sum', name='kl_divergence')"
    assert np.isfinite(keras_run["loaded_train"])


def test_keras_example_runs() -> None:
    if not (_have("keras") and _have("jax")):
        pytest.skip("keras and jax are needed")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "keras_compile.py")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 7: kldiv" in out.stdout


# ---- a plain PyTorch training loop --------------------------------------------------------



def _example() -> dict:
    return runpy.run_path(str(ROOT / "examples" / "torch_training_loop.py"))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_training_loop_example_matches_f_kl_div(device: str, torch: Any) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    history = _example()["train"](device, steps=15)
    np.testing.assert_allclose(history["kldiv"], history["torch"], rtol=1e-5, atol=1e-7)
    assert history["max_param_diff"][0] < 1e-5
    assert history["kldiv"][-1] < history["kldiv"][0]


def test_kldiv_per_sample_loss_and_gradient_equal_f_kl_div_on_clipped_inputs(torch: Any) -> None:
    F = torch.nn.functional
    g = torch.Generator().manual_seed(1)
    t = torch.softmax(4 * torch.randn(32, 7, generator=g), -1)
    t[:4] = 0.0
    t[:4, 0] = 1.0
    logits = torch.randn(32, 7, generator=g, requires_grad=True)
    import kldiv

    p = torch.softmax(logits, -1)
    ours = kldiv.kld(t, p)
    ref = F.kl_div(p.clamp(1e-7, 1).log(), t.clamp(1e-7, 1), reduction="none").sum(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    (g_ours,) = torch.autograd.grad(kldiv.KLDivergence()(t, p), logits, retain_graph=True)
    (g_ref,) = torch.autograd.grad(F.kl_div(p.clamp(1e-7, 1).log(), t.clamp(1e-7, 1),
                                            reduction="batchmean"), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
