"""Adversarial tests of function transforms and compiled/lazy execution: torch.compile
(fullgraph, dynamic), torch.func, JAX transforms, Dask lazy graphs.

Compiled functions use dynamo's ``"eager"`` backend where the test is about tracing (graph
breaks, guards, recompiles) rather than about Inductor's code: the same trace, seconds less.
Values are checked against the float64 oracle written from the definition (``conftest.oracle``)
or against the eager call.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import oracle
from kldiv import _dispatch, _estimator_math, _libraries, _namespace


def _probs(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Rows of probabilities bounded away from 0 (finite differences stay accurate)."""
    a = rng.uniform(0.5, 1.0, shape)
    return a / a.sum(-1, keepdims=True)


# ---- torch.compile --------------------------------------------------------------------------

@pytest.fixture
def torch() -> Iterator[Any]:
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache")
        yield torch
    torch._dynamo.reset()


def _compile(torch: Any, fn: Callable[..., Any], **kwargs: Any) -> Any:
    return torch.compile(fn, fullgraph=True, backend="eager", **kwargs)


@contextlib.contextmanager
def _empty_kldiv_caches() -> Iterator[None]:
    """kldiv's per-process caches emptied (as in a fresh process), restored afterwards."""
    caches: list[dict[Any, Any]] = [_namespace._NAMESPACE_CACHE, _namespace._KIND_CACHE,
                                    _namespace._LOW_CACHE, _dispatch._RESOLVED, _libraries._BY_ID,
                                    _estimator_math._COEFFICIENTS]
    saved = [dict(c) for c in caches]
    for c in caches:
        c.clear()
    try:
        yield
    finally:
        for c, s in zip(caches, saved, strict=True):
            c.clear()
            c.update(s)


@contextlib.contextmanager
def _a_new_module() -> Iterator[None]:
    """A module imported after compiling (``len(sys.modules)`` changes)."""
    name = f"kldiv_test_module_{id(object())}"
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]


class _Subclass(np.ndarray):
    """A NumPy array type kldiv has never seen."""


_COMPILED = {
    "kld": lambda a, b: kldiv.kld(a, b),
    "kld numpy y_true": lambda a, b: kldiv.kld(np.full((4, 5), 0.2), b),
    "kld list y_true": lambda a, b: kldiv.kld([0.1, 0.2, 0.3, 0.2, 0.2], b),
    "kld logits": lambda a, b: kldiv.kld(a, b, inputs="logits", temperature=2.0),
    "loss": lambda a, b: kldiv.KLDivergence()(a, b, sample_weight=b[:, 0]),
    "loss numpy weight": lambda a, b: kldiv.KLDivergence(reduction="sum")(a, b, sample_weight=np.arange(4.0)),
    "reverse": lambda a, b: kldiv.ReverseKLDivergence(inputs="log_probs", reduction="none")(a, b),
    "js": lambda a, b: kldiv.js_divergence(a, b, inputs=("probs", "logits"), beta=0.25),
    "estimate": lambda a, b: kldiv.kl_estimate(a.log(), b.log()),
}


@pytest.mark.parametrize("name", list(_COMPILED))
def test_compiled_function_is_not_recompiled_by_later_eager_calls(torch: Any, name: str) -> None:
    """A compiled function must not depend on kldiv's per-process caches: dynamo guarded on
    their sizes (``len(_RESOLVED) != 2``, ``len(_NAMESPACE_CACHE) ...``), so every eager call
    with a new array type, dtype or options afterwards recompiled it (after 8: eager fallback)."""
    fn = _COMPILED[name]
    rng = np.random.default_rng(0)
    t, p = torch.tensor(_probs(rng, 4, 5)), torch.tensor(_probs(rng, 4, 5))
    expected = fn(t, p)  # eagerly first (a loss class' Keras-aware form is then made)
    with _empty_kldiv_caches():
        compiled = _compile(torch, fn)
        first = compiled(t, p)
        # eager calls that fill every cache with something new
        kldiv.kld(np.ones((2, 3), np.float16), np.ones((2, 3), np.float16).view(_Subclass))
        kldiv.kld(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.int8))
        kldiv.kld(torch.nn.Parameter(t), p, inputs="logits", temperature=3.5)
        kldiv.js_divergence([[0.5, 0.5]], [[0.25, 0.75]], inputs="log_probs", beta=0.125)
        kldiv.reverse_kl_divergence(t, p, inputs=["logits", "probs"], temperature=1.25)
        kldiv.kl_estimate(np.log(np.full(3, 0.5)), np.log(np.full(3, 0.25, np.float32)))
        with _a_new_module(), torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(t, p)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=1e-6, atol=1e-12)


def test_compiled_kld_recompiles_for_nothing_but_its_inputs(torch: Any) -> None:
    """Same inputs, same graph: a hundred eager calls with distinct options in between."""
    t, p = torch.rand(3, 4).softmax(-1), torch.rand(3, 4).softmax(-1)
    with _empty_kldiv_caches():
        compiled = _compile(torch, lambda a, b: kldiv.kld(a, b, inputs="log_probs"))
        compiled(t.log(), p.log())
        for i in range(100):
            kldiv.kld(t, p, inputs="logits", temperature=1.0 + i / 64)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(t.log(), p.log())
    np.testing.assert_allclose(out.numpy(), oracle(t.numpy(), p.numpy()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("member", ["js_divergence", "reverse_kl_divergence", "kl_divergence"])
def test_compile_dynamic_true_with_default_options(torch: Any, member: str) -> None:
    """``torch.compile(dynamic=True)`` traces the functions' float defaults (``beta=0.5``,
    ``temperature=1.0``) as symbolic floats: resolving the options sorted them (dynamo: "sort
    with non-constant keys", a hard error under ``fullgraph``)."""
    fn = getattr(kldiv, member)
    compiled = _compile(torch, lambda a, b: fn(a, b), dynamic=True)
    rng = np.random.default_rng(1)
    for n in (2, 3, 5):
        t, p = _probs(rng, n, 4), _probs(rng, n, 4)
        out = compiled(torch.tensor(t), torch.tensor(p))
        torch.testing.assert_close(out, fn(torch.tensor(t), torch.tensor(p)), rtol=1e-12, atol=1e-14)
        if member != "js_divergence":
            a, b = (t, p) if member == "kl_divergence" else (p, t)
            np.testing.assert_allclose(out.numpy(), oracle(a, b), rtol=1e-12, atol=1e-14)


def test_compile_dynamic_true_with_a_symbolic_beta(torch: Any) -> None:
    """A float argument of a ``dynamic=True`` compiled function is a symbolic float: ``beta``
    given so was sorted with the other options (a hard error under ``fullgraph``); it is
    traced as a graph input instead, one graph for every beta."""
    compiled = _compile(torch, lambda a, b, beta: kldiv.js_divergence(
        a, b, inputs="logits", temperature=2.0, beta=beta), dynamic=True)
    rng = np.random.default_rng(2)
    t, p = torch.tensor(rng.normal(size=(3, 6))), torch.tensor(rng.normal(size=(3, 6)))
    for beta in (0.2, 0.3, 0.7):
        expected = kldiv.js_divergence(t, p, inputs="logits", temperature=2.0, beta=beta)
        torch.testing.assert_close(compiled(t, p, beta), expected, rtol=1e-12, atol=1e-14)


def test_loss_objects_are_hashable_for_jax_jit() -> None:
    """``jax.jit(loss_object)`` hashes the callable: kldiv's loss objects (equal ones hash
    equal) are accepted, and give the eager values."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(3)
    t, p = jnp.asarray(_probs(rng, 4, 5)), jnp.asarray(_probs(rng, 4, 5))
    for loss in (kldiv.KLDivergence(), kldiv.JensenShannonDivergence(beta=0.25),
                 kldiv.KLEstimator()):
        args = (jnp.log(t[:, 0]), jnp.log(p[:, 0])) if isinstance(loss, kldiv.KLEstimator) else (t, p)
        np.testing.assert_allclose(np.asarray(jax.jit(loss)(*args)), np.asarray(loss(*args)),
                                   rtol=1e-6)
    assert hash(kldiv.KLDivergence()) == hash(kldiv.KLDivergence.from_config(
        kldiv.KLDivergence().get_config()))  # equal objects hash alike
    fused = kldiv.FusedLinearDivergence("js")
    assert fused == kldiv.FusedLinearDivergence("js") and hash(fused) == hash(
        kldiv.FusedLinearDivergence("js"))


@pytest.mark.parametrize(("make", "attribute", "value"), [
    (lambda: kldiv.KLDivergence(), "inputs", "logits"),
    (lambda: kldiv.KLDivergence(inputs="logits"), "temperature", 3.0),
    (lambda: kldiv.JensenShannonDivergence(inputs="log_probs"), "beta", 0.125),
    (lambda: kldiv.ReverseKLDivergence(reduction="sum"), "inputs", ("probs", "logits")),
])
def test_compiled_loss_uses_options_set_after_construction(torch: Any, make: Callable[[], Any],
                                                           attribute: str, value: Any) -> None:
    """Options may be set as attributes after construction (checked again at each call);
    under ``torch.compile`` the loss used the options resolved at construction instead, a
    wrong value without a word. Compiled before and after the change, and eagerly, the
    values agree with a loss constructed with the option."""
    rng = np.random.default_rng(4)
    t, p = torch.tensor(_probs(rng, 4, 6)), torch.tensor(_probs(rng, 4, 6))
    if attribute == "beta":
        t, p = t.log(), p.log()
    loss = make()
    compiled = _compile(torch, lambda a, b: loss(a, b))
    before = compiled(t, p)
    torch.testing.assert_close(before, make()(t, p), rtol=1e-12, atol=0)
    setattr(loss, attribute, value)
    fresh = make()
    setattr(fresh, attribute, value)
    expected = type(fresh).from_config(fresh.get_config())(t, p)  # constructed with it
    assert not torch.allclose(expected, before)  # the option changes the value
    torch.testing.assert_close(compiled(t, p), expected, rtol=1e-12, atol=0)
    other = make()
    setattr(other, attribute, value)  # set before its first call, compiled first
    torch.testing.assert_close(_compile(torch, lambda a, b: other(a, b))(t, p), expected,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(other(t, p), expected, rtol=1e-12, atol=0)


def test_jax_jit_of_a_loss_is_not_served_a_trace_of_other_options() -> None:
    """``jax.jit`` keys its traces on the callable's hash and ``==``. Loss objects hashed by
    class alone: a loss traced and then given other options left its trace under a key
    that a new loss with those options matched, so ``jax.jit(KLDivergence(temperature=3))``
    returned the temperature-1 value. Equal objects still hash alike. (The changed object
    itself keeps its traces, as any state a jitted function captures: JAX's weak references
    remember its first hash.)"""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(6)
    t, p = jnp.asarray(rng.normal(size=(4, 5))), jnp.asarray(rng.normal(size=(4, 5)))
    first = kldiv.KLDivergence(inputs="logits")
    jax.jit(first)(t, p)
    first.temperature = 3.0
    second = kldiv.KLDivergence(inputs="logits", temperature=3.0)
    assert second == first and hash(second) == hash(first)
    expected = second(t, p)
    np.testing.assert_allclose(np.asarray(jax.jit(second)(t, p)), np.asarray(expected), rtol=1e-6)
    assert hash(second) != hash(kldiv.KLDivergence(inputs="logits"))
    broken = kldiv.KLDivergence()
    broken.dtype = "int32"  # invalid: refused at the call; hashing it is still fine
    assert isinstance(hash(broken), int)


_JIT_WITH_KERAS = r"""
import os
os.environ["KERAS_BACKEND"] = "jax"
import keras  # noqa: F401  (loaded first: kldiv's losses are keras.losses.Loss subclasses)
import jax
import jax.numpy as jnp
import numpy as np
import kldiv

assert isinstance(kldiv.KLDivergence(), keras.losses.Loss)
rng = np.random.default_rng(6)
t, p = jnp.asarray(rng.normal(size=(4, 5))), jnp.asarray(rng.normal(size=(4, 5)))
first = kldiv.KLDivergence(inputs="logits")
jax.jit(first)(t, p)
first.temperature = 3.0
second = kldiv.KLDivergence(inputs="logits", temperature=3.0)
print(float(jax.jit(second)(t, p)), float(second(t, p)),
      hash(second) != hash(kldiv.KLDivergence(inputs="logits")), hash(second) == hash(first))
"""


def test_jax_jit_of_a_keras_aware_loss_is_not_served_a_trace_of_other_options() -> None:
    """With Keras loaded (importing TensorFlow loads it too), the loss classes are Keras
    ``Loss`` subclasses, whose ``__hash__`` was the class' alone: ``jax.jit`` served
    ``KLDivergence(temperature=3)`` a trace made for temperature 1 (the defect
    :func:`test_jax_jit_of_a_loss_is_not_served_a_trace_of_other_options` covers without
    Keras came back)."""
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _JIT_WITH_KERAS], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jitted, eager, differ, same = proc.stdout.split()
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    assert differ == "True" and same == "True"
