"""The fused linear divergence on JAX (``jax.grad``/``jit``/``vmap``, ``custom_vjp`` over chunks)
against the float64 oracle (``fused_linear_oracle.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fused_linear_oracle import (
    BETA,
    CASES,
    DIVS,
    TOKENS,
    H,
    V,
    _call,
    _close,
    _data,
    _teacher,
    plain,
    reduce,
)
from kldiv import fused_linear_divergence


# ------------------------------------------------------------------------------------ JAX
@pytest.fixture
def jax() -> Any:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax


@pytest.mark.parametrize("div,form,bias,temp,chunk", CASES)
def test_jax_values_and_gradients(jax: Any, div: str, form: str, bias: bool, temp: float,
                                  chunk: int | None) -> None:
    jnp = jax.numpy
    d = _data(11)
    teacher = _teacher(d, form, jnp.asarray)
    sw = jnp.asarray(d["sw"])

    def ours(h: Any, w: Any, b: Any) -> Any:
        return _call(h, w, b if bias else None, teacher, divergence=div, beta=BETA,
                     temperature=temp, sample_weight=sw, chunk_size=chunk)

    def ref(h: Any, w: Any, b: Any) -> Any:
        return reduce(jnp, plain(jnp, h, w, b if bias else None, teacher, div, BETA, temp), sw,
                      "mean_with_sample_weight")

    args = tuple(jnp.asarray(d[k]) for k in ("h", "w", "b"))
    _close(ours(*args), ref(*args))
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(*args)
    want = jax.grad(ref, argnums=(0, 1, 2))(*args)
    for g, e in zip(got, want, strict=True):
        _close(g, e)
    # per-token results: the backward rescans with the incoming cotangent
    cot = jnp.asarray(np.random.default_rng(0).random(TOKENS))

    def none(f: Any) -> Any:
        return jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=(0, 1))

    per = jax.jit(none(lambda h, w, b: _call(h, w, b if bias else None, teacher, divergence=div,
                                               beta=BETA, temperature=temp, chunk_size=chunk,
                                               reduction="none")))(*args)
    per_ref = none(lambda h, w, b: plain(jnp, h, w, b if bias else None, teacher, div, BETA,
                                         temp))(*args)
    for g, e in zip(per, per_ref, strict=True):
        _close(g, e)


def test_jax_masks_half_and_minus_inf(jax: Any) -> None:
    jnp = jax.numpy
    d = _data(12, masked="both")
    teacher = _teacher(d, "hidden", jnp.asarray)
    args = tuple(jnp.asarray(d[k]) for k in ("h", "w", "b"))
    # all masked: 0 with zero, finite gradients
    g = jax.grad(lambda h, w, b: _call(h, w, b, teacher, sample_weight=jnp.zeros(TOKENS)),
                 argnums=(0, 1, 2))(*args)
    assert all(bool(jnp.all(x == 0)) for x in g)
    for div in DIVS:
        got = jax.grad(lambda h, w, b, div=div: _call(h, w, b, teacher, divergence=div,
                                                     beta=BETA, chunk_size=4),
                       argnums=(0, 1, 2))(*args)
        want = jax.grad(lambda h, w, b, div=div: plain(jnp, h, w, b, teacher, div, BETA,
                                                       1.0).mean(), argnums=(0, 1, 2))(*args)
        for a, e in zip(got, want, strict=True):
            assert bool(jnp.all(jnp.isfinite(a)))
            _close(a, e)
    h16 = args[0].astype(jnp.bfloat16)
    out = _call(h16, args[1].astype(jnp.bfloat16), None, {"logits": jnp.asarray(d["tl"])},
                divergence="kl", chunk_size=3)
    assert out.dtype == jnp.bfloat16
    ref = plain(jnp, h16.astype(jnp.float64), args[1].astype(jnp.bfloat16).astype(jnp.float64),
                None, {"logits": jnp.asarray(d["tl"])}, "kl", BETA, 1.0).mean()
    np.testing.assert_allclose(float(out), float(ref), rtol=1.6e-2)


def test_jax_temporaries_do_not_grow_with_tokens(jax: Any) -> None:
    """XLA's compiled memory plan: the temporaries of value_and_grad grow with the tokens only
    by the per-token outputs (``dh``, the losses), never by a ``(tokens, V)`` array."""
    jnp = jax.numpy
    v, hid, chunk = 512, 8, 16

    def temp_bytes(n: int) -> int:
        def loss(h: Any, w: Any, t: Any) -> Any:
            return fused_linear_divergence(h, w, t, divergence="js", chunk_size=chunk)

        args = (jnp.zeros((n, hid), jnp.float32), jnp.zeros((v, hid), jnp.float32),
                jnp.zeros((n, v), jnp.float32))
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this JAX backend gives no memory analysis")
        return int(analysis.temp_size_in_bytes)

    small, large = temp_bytes(4 * chunk), temp_bytes(64 * chunk)
    extra_tokens = 60 * chunk
    assert large - small < extra_tokens * v * 4 / 8, (small, large)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean_with_sample_weight"])
@pytest.mark.parametrize("source", ["torch", "numpy"])
def test_jax_sample_weight_keeps_call_time_values(jax: Any, source: str,
                                                  reduction: str) -> None:
    """A torch or NumPy sample weight (the one input that crosses libraries) refilled after
    the call, before ``jax.vjp``'s backward runs, changes neither the value nor the
    gradient: kldiv's conversion copies it into memory JAX owns and waits for the copy
    (JAX dispatches asynchronously; a DLPack import of torch memory aliases it)."""
    torch = pytest.importorskip("torch") if source == "torch" else None
    jnp = jax.numpy
    d = _data(26)
    w, tl = jnp.asarray(d["w"]), jnp.asarray(d["tl"])
    results = []
    for refill in (True, False):
        sw = d["sw"].copy()
        weight = torch.from_numpy(sw) if torch is not None else sw

        def f(h: Any, weight: Any = weight) -> Any:
            return fused_linear_divergence(h, w, tl, sample_weight=weight, divergence="js",
                                           beta=BETA, reduction=reduction, chunk_size=3)

        out, vjp = jax.vjp(f, jnp.asarray(d["h"]))
        if refill:
            sw[...] = 7.0
        results.append((out, *vjp(jnp.ones_like(out))))
    for a, e in zip(*results, strict=True):
        _close(a, e, 1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean_with_sample_weight"])
def test_jax_vmap(jax: Any, reduction: str) -> None:
    """``jax.vmap`` over a batch axis of the inputs (hidden, teacher, weights; the matrix),
    alone and with ``jax.grad`` inside or outside it, gives the oracle's values."""
    jnp = jax.numpy
    d = _data(27)
    rng = np.random.default_rng(27)
    hb = jnp.asarray(rng.standard_normal((3, *TOKENS, H)))
    tlb = jnp.asarray(rng.standard_normal((3, *TOKENS, V)))
    swb = jnp.asarray(rng.random((3, *TOKENS)))
    w = jnp.asarray(d["w"])

    def ours(h: Any, w: Any, tl: Any, sw: Any) -> Any:
        return fused_linear_divergence(h, w, tl, sample_weight=sw, divergence="js", beta=BETA,
                                       reduction=reduction, chunk_size=3)

    def ref(h: Any, w: Any, tl: Any, sw: Any) -> Any:
        return reduce(jnp, plain(jnp, h, w, None, {"logits": tl}, "js", BETA, 1.0), sw,
                      reduction)

    def total(f: Any) -> Any:
        return lambda *a: jnp.sum(f(*a))

    axes = (0, None, 0, 0)
    for f, e in (
        (jax.vmap(ours, axes), jax.vmap(ref, axes)),
        (jax.jit(jax.vmap(jax.grad(total(ours), argnums=(0, 1)), axes)),
         jax.vmap(jax.grad(total(ref), argnums=(0, 1)), axes)),
        (jax.grad(total(jax.vmap(ours, axes)), argnums=(0, 1)),
         jax.grad(total(jax.vmap(ref, axes)), argnums=(0, 1))),
    ):
        for a, b in zip(jax.tree_util.tree_leaves(f(hb, w, tlb, swb)),
                        jax.tree_util.tree_leaves(e(hb, w, tlb, swb)), strict=True):
            assert a.shape == b.shape
            _close(a, b)
    wb = jnp.stack([w, w / 2])  # a batch of output matrices
    _close(jax.vmap(ours, (None, 0, None, None))(hb[0], wb, tlb[0], swb[0]),
           jax.vmap(ref, (None, 0, None, None))(hb[0], wb, tlb[0], swb[0]))


def test_jax_forward_mode_is_a_clear_error(jax: Any) -> None:
    """The JAX route is a ``jax.custom_vjp`` (reverse mode, memory bounded by the chunks):
    ``jax.jvp`` / ``jax.jacfwd`` are refused by JAX with a clear TypeError, never answered
    wrongly; ``jax.hessian`` (forward over reverse) gives the oracle's."""
    jnp = jax.numpy
    d = _data(28)
    h, w, tl = (jnp.asarray(d[k]) for k in ("h", "w", "tl"))

    def f(h: Any) -> Any:
        return fused_linear_divergence(h, w, tl, chunk_size=3)

    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (h,), (jnp.ones_like(h),))
    hess = jax.hessian(f)(h)
    want = jax.hessian(lambda h: plain(jnp, h, w, None, {"logits": tl}, "kl", BETA, 1.0)
                       .mean())(h)
    _close(hess, want)
