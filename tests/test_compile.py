"""Compilers and transforms: torch.compile(fullgraph=True) and jax.jit / grad / vmap / checkpoint.

``fullgraph=True`` turns any graph break into an error, so these tests fail on a break.
Values are compared with the eager call, ``F.kl_div`` and analytic gradients; torch.compile
is checked with the registered fast paths and with a deliberately untraceable one.
"""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest

import kldiv
from conftest import oracle
from kldiv import _dispatch

ROOT = Path(__file__).resolve().parents[1]
REDUCTIONS = ["auto", "sum", "none", "mean_with_sample_weight"]


# ---- torch.compile ------------------------------------------------------------------------

@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    with warnings.catch_warnings():
        # dynamo notes every functools.lru_cache it traces through (array-api-compat's)
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache")
        yield torch
    torch._dynamo.reset()


def _batch(torch, n: int = 8, c: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.softmax(3 * torch.randn(n, c, generator=g), -1)
    y[0] = 0.0
    y[0, 1] = 1.0  # one-hot row: exact 0s and 1s
    w = torch.rand(n, generator=g)
    return x, y, w


def _reference(torch, y, p, w, reduction: str):
    """Keras' loss with F.kl_div on clipped log-inputs."""
    per = torch.nn.functional.kl_div(p.clamp(1e-7, 1).log(), y.clamp(1e-7, 1), reduction="none").sum(-1)
    weighted = per * w
    return {"auto": weighted.sum() / per.numel(), "sum": weighted.sum(), "none": weighted,
            "mean_with_sample_weight": weighted.sum() / w.sum()}[reduction]


def test_no_graph_breaks_explained(torch) -> None:
    model = torch.nn.Linear(6, 5)
    loss_fn = kldiv.KLDivergence()

    def step(x, y, w):
        p = torch.softmax(model(x), -1)
        return loss_fn(y, p, sample_weight=w) + kldiv.kld(y, p).mean()

    explanation = torch._dynamo.explain(step)(*_batch(torch))
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_training_step_fullgraph(torch, reduction: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    loss_fn = kldiv.KLDivergence(reduction=reduction)

    def step(x, y, w):
        return loss_fn(y, torch.softmax(model(x), -1), sample_weight=w)

    compiled = torch.compile(step, fullgraph=True)
    x, y, w = _batch(torch)
    loss = compiled(x, y, w)
    (grads,) = torch.autograd.grad(loss.sum(), [model.weight])
    eager = step(x, y, w)
    (eager_grads,) = torch.autograd.grad(eager.sum(), [model.weight])
    ref = _reference(torch, y, torch.softmax(model(x), -1), w, reduction)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads, eager_grads, rtol=1e-5, atol=1e-7)


def test_compiled_dynamic_shapes_and_python_inputs(torch) -> None:
    loss_fn = kldiv.KLDivergence()

    @torch.compile(fullgraph=True, dynamic=True)
    def f(y, p, w):
        return loss_fn(y, p, sample_weight=w)

    for n in (4, 7, 13):
        _, y, w = _batch(torch, n=n, seed=n)
        p = torch.softmax(torch.randn(n, 5), -1)
        torch.testing.assert_close(f(y, p, w), _reference(torch, y, p, w, "auto"), rtol=1e-5, atol=1e-7)

    @torch.compile(fullgraph=True)
    def g(p):
        # y_true as a list and as NumPy, a scalar weight, created inside the compiled region
        return (kldiv.kld([[0.0, 1.0], [0.0, 0.0]], p),
                kldiv.KLDivergence(reduction="sum")(np.array([[0.0, 1.0], [0.0, 0.0]]), p, sample_weight=2.0))

    per, total = g(torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    np.testing.assert_allclose(per.numpy(), [0.9162892, -3.0809074e-06], rtol=1e-5)
    np.testing.assert_allclose(float(total), 2 * 0.9162861, rtol=1e-5)

    @torch.compile(fullgraph=True)
    def h(y, p):
        return kldiv.kld(y, p)

    out = h(torch.tensor([[1.0, 0.0]], dtype=torch.float16), torch.tensor([[1e-8, 1.0]], dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    out = h(torch.tensor([[1, 0]]), torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), oracle([[1, 0]], [[0.6, 0.4]]), rtol=1e-12)


def test_compile_bypasses_fast_paths(torch, monkeypatch: pytest.MonkeyPatch) -> None:
    """An untraceable fast path (a trip through NumPy) is never traced: fullgraph still holds."""
    calls = []

    def untraceable(y_true, y_pred):
        calls.append(1)
        return torch.from_numpy(oracle(y_true.detach().numpy(), y_pred.detach().numpy()))

    monkeypatch.setattr(_dispatch, "fast_path", lambda name, op: untraceable)
    y, p = _batch(torch)[1], torch.softmax(torch.randn(8, 5), -1)
    eager = kldiv.kld(y, p)  # eagerly, the (patched) fast path runs
    assert calls == [1]
    compiled = torch.compile(lambda y, p: kldiv.KLDivergence(reduction="none")(y, p), fullgraph=True)
    torch.testing.assert_close(compiled(y, p), eager.to(p.dtype), rtol=1e-5, atol=1e-7)
    assert calls == [1]


def test_compiled_torch_training_loop_example(torch) -> None:
    history = runpy.run_path(str(ROOT / "examples" / "torch_training_loop.py"))["train"](
        "cpu", steps=4, compile=True)
    np.testing.assert_allclose(history["kldiv"], history["torch"], rtol=1e-5, atol=1e-7)


# ---- JAX transforms -----------------------------------------------------------------------

@pytest.fixture
def jax():
    return pytest.importorskip("jax")


def _jax_data(jnp):
    rng = np.random.default_rng(3)
    t = rng.dirichlet(np.ones(5), size=6)
    t[0] = [1, 0, 0, 0, 0]
    p = rng.uniform(0.02, 0.98, size=(6, 5))
    w = rng.random(6)
    return (jnp.asarray(t, jnp.float32), jnp.asarray(p, jnp.float32), jnp.asarray(w, jnp.float32))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_jax_jit_grad_vmap_checkpoint(jax, reduction: str) -> None:
    jnp = jax.numpy
    t, p, w = _jax_data(jnp)
    kl = kldiv.KLDivergence(reduction=reduction)

    def f(p, w):
        return jnp.sum(kl(t, p, sample_weight=w))

    eager = f(p, w)
    ref_per = oracle(np.asarray(t), np.asarray(p)) * np.asarray(w, np.float64)
    ref = {"auto": ref_per.sum() / 6, "sum": ref_per.sum(), "none": ref_per.sum(),
           "mean_with_sample_weight": ref_per.sum() / np.asarray(w, np.float64).sum()}[reduction]
    np.testing.assert_allclose(float(eager), ref, rtol=1e-5)
    np.testing.assert_allclose(float(jax.jit(f)(p, w)), float(eager), rtol=1e-6)

    scale = {"auto": 1 / 6, "sum": 1.0, "none": 1.0,
             "mean_with_sample_weight": 1 / float(np.asarray(w, np.float64).sum())}[reduction]
    analytic = -np.clip(np.asarray(t, np.float64), 1e-7, 1) / np.asarray(p, np.float64) * np.asarray(w)[:, None] * scale
    for grad in (jax.grad(f), jax.jit(jax.grad(f)), jax.checkpoint(jax.grad(f)),
                 jax.grad(jax.checkpoint(f)), jax.jit(jax.grad(jax.checkpoint(f)))):
        np.testing.assert_allclose(np.asarray(grad(p, w)), analytic, rtol=1e-5, atol=1e-9)

    # vmap over a batch of problems (and of weights), under jit too
    ps = jnp.stack([p, p * 0.5 + 0.25, jnp.flip(p, 0)])
    ws = jnp.stack([w, w, 1 - w])
    expected = np.array([float(f(pi, wi)) for pi, wi in zip(ps, ws, strict=True)])
    np.testing.assert_allclose(np.asarray(jax.vmap(f)(ps, ws)), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(f))(ps, ws)), expected, rtol=1e-5)
    per = jax.vmap(lambda pi: kl(t, pi))(ps)  # unweighted, per problem
    assert per.shape == ((3, 6) if reduction == "none" else (3,))


def test_jax_gradient_clipped_and_zeros(jax) -> None:
    jnp = jax.numpy
    t = jnp.asarray([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], jnp.float32)
    p = jnp.asarray([[0.0, 1.0, 1.5], [1e-9, 0.5, 0.5]], jnp.float32)
    g = jax.jit(jax.grad(lambda p: jnp.sum(kldiv.KLDivergence(reduction="sum")(t, p))))(p)
    g = np.asarray(g)
    assert np.all(np.isfinite(g))
    assert g[0, 2] == 0.0 and g[1, 0] == 0.0 and g[0, 0] == 0.0  # clipped: gradient 0
    np.testing.assert_allclose(g[0, 1], -1.0, rtol=1e-6)  # at the upper bound: inside
    np.testing.assert_allclose(g[1, 1], -1.0, rtol=1e-6)


def test_jax_jitted_training_loop(jax) -> None:
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    y = jnp.asarray(rng.dirichlet(np.ones(4), size=32), jnp.float32)
    w = jnp.asarray(rng.random(32), jnp.float32)
    loss_fn = kldiv.KLDivergence()

    def loss(params, x, y, w):
        return loss_fn(y, jax.nn.softmax(x @ params["W"] + params["b"]), sample_weight=w)

    @jax.jit
    def step(params, x, y, w):
        value, grads = jax.value_and_grad(loss)(params, x, y, w)
        return jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, params, grads), value

    params = {"W": jnp.zeros((6, 4), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    losses = []
    for _ in range(20):
        params, value = step(params, x, y, w)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    # the first step's loss is the weighted mean over a uniform prediction
    ref = oracle(np.asarray(y), np.full((32, 4), 0.25)) * np.asarray(w)
    np.testing.assert_allclose(losses[0], ref.sum() / 32, rtol=1e-5)


def test_compile_traces_no_lru_cache_helpers() -> None:
    """kldiv's type checks under dynamo: array-api-compat's ``is_torch_array`` /
    ``is_dask_array`` are ``functools.lru_cache``-wrapped, and dynamo warns for each one it
    traces through (a UserWarning per compile, in the user's log). Torch tensors (and the
    NumPy arrays, lists and numbers dynamo traces as tensors) are recognised first."""
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    model = torch.nn.Linear(6, 5)
    x, y, w = _batch(torch)
    inputs = {"tensors": (y, w), "numpy": (y.numpy(), w.numpy()),
              "lists": (y.tolist(), w.tolist()), "scalar weight": (y, 0.5)}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for reduction in REDUCTIONS:
                loss_fn = kldiv.KLDivergence(reduction=reduction)
                for name, (yt, wt) in inputs.items():

                    def step(x, yt=yt, wt=wt, loss_fn=loss_fn):
                        p = torch.softmax(model(x), -1)
                        return loss_fn(yt, p, sample_weight=wt).sum() + kldiv.kld(yt, p).sum()

                    torch._dynamo.reset()  # a fresh compile for each case
                    loss = torch.compile(step, fullgraph=True)(x)
                    loss.backward()
                    assert torch.isfinite(loss), (reduction, name)
    finally:
        torch._dynamo.reset()
    cache_notes = [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    assert not cache_notes, cache_notes


def test_compile_after_other_libraries_dtypes_were_seen() -> None:
    """kldiv's dtype caches, once they hold another library's dtype objects (TensorFlow's
    ``DType`` has a C ``__hash__`` dynamo cannot trace), must not break a later
    ``torch.compile(fullgraph=True)``: a cache written while tracing is a side effect dynamo
    replays by rebuilding, and hashing, the whole dict. Run in a subprocess so the caches
    start empty and Triton is imported before TensorFlow."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    pytest.importorskip("tensorflow")
    script = (
        "import contextlib\n"
        "with contextlib.suppress(ImportError):\n"
        "    import triton  # noqa: F401  (before TensorFlow: see the README)\n"
        "import numpy as np, tensorflow as tf, torch, kldiv\n"
        "kldiv.kld(tf.constant([[.5, .5]]), tf.constant([[.4, .6]]))\n"
        "kldiv.kld(np.ones((2, 3), np.float16), np.ones((2, 3), np.float16))\n"
        "loss = kldiv.KLDivergence()\n"
        "f = torch.compile(lambda y, p, w: loss(y, p, sample_weight=w), fullgraph=True)\n"
        "print(float(f(torch.rand(4, 3), torch.rand(4, 3), torch.rand(4))))\n"
    )
    env = {**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
