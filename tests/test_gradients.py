"""Gradients (SPEC §4): torch autograd, jax.grad / jit / vmap, against the analytic ones."""

from __future__ import annotations

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend

EPS = 1e-7


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    t = rng.uniform(0.05, 0.95, size=(4, 5))
    p = rng.uniform(0.05, 0.95, size=(4, 5))
    # elements outside the clip range on both sides, exact zeros and ones
    t[0, 0], t[1, 1], t[2, 2] = 0.0, 1.5, -0.3
    p[0, 1], p[1, 2], p[2, 3], p[3, 4] = 0.0, 1.7, -0.2, 1.0
    return t, p


def _analytic(t: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/dp = -t/p * w and d/dt = (log(t/p) + 1) * w inside [eps, 1], 0 outside."""
    tc, pc = np.clip(t, EPS, 1), np.clip(p, EPS, 1)
    in_t = (t >= EPS) & (t <= 1)
    in_p = (p >= EPS) & (p <= 1)
    gp = np.where(in_p, -tc / pc * w, 0.0)
    gt = np.where(in_t, (np.log(tc / pc) + 1) * w, 0.0)
    return gt, gp


@pytest.mark.parametrize("generic", [False, True])
def test_gradients_match_analytic(diff_backend: ArrayBackend, generic: bool) -> None:
    b = diff_backend
    t, p = _data()
    w = np.arange(1.0, 5.0)[:, None]  # sum(w_i * loss_i) -> per-row weight
    gt_want, gp_want = _analytic(t, p, w)
    with kldiv.use_generic(generic):
        if b.name.startswith("torch"):
            torch = b.module
            tt = torch.tensor(t, device=b.device, requires_grad=True)
            pp = torch.tensor(p, device=b.device, requires_grad=True)
            loss = kldiv.KLDivergence(reduction="sum")(tt, pp, sample_weight=torch.tensor(w[:, 0], device=b.device))
            loss.backward()
            gt, gp = tt.grad.cpu().numpy(), pp.grad.cpu().numpy()
        else:
            import jax

            def f(tt: object, pp: object) -> object:
                return kldiv.KLDivergence(reduction="sum")(tt, pp, sample_weight=w[:, 0])

            gt, gp = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(b.asarray(t), b.asarray(p)))
    assert np.isfinite(gt).all() and np.isfinite(gp).all()
    np.testing.assert_allclose(gp, gp_want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gt, gt_want, rtol=1e-10, atol=1e-12)


def test_gradients_finite_for_zeros(diff_backend: ArrayBackend) -> None:
    b = diff_backend
    z = np.zeros((3, 4), dtype=np.float32)
    if b.name.startswith("torch"):
        torch = b.module
        tt = torch.zeros((3, 4), device=b.device, requires_grad=True)
        pp = torch.zeros((3, 4), device=b.device, requires_grad=True)
        kldiv.KLDivergence()(tt, pp).backward()
        grads = [tt.grad.cpu().numpy(), pp.grad.cpu().numpy()]
    else:
        import jax

        grads = [np.asarray(g) for g in jax.grad(lambda a, c: kldiv.KLDivergence()(a, c), argnums=(0, 1))(b.asarray(z), b.asarray(z))]
    for g in grads:
        assert np.isfinite(g).all()
        np.testing.assert_array_equal(g, 0.0)  # all clipped at the lower bound


def test_torch_function_gradient_with_broadcasting() -> None:
    torch = pytest.importorskip("torch")
    t = torch.tensor([[0.3, 0.7]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[0.6, 0.4], [0.4, 0.6]], dtype=torch.float64, requires_grad=True)
    kldiv.kld(t, p).sum().backward()
    tn, pn = t.detach().numpy(), p.detach().numpy()
    np.testing.assert_allclose(p.grad.numpy(), -np.broadcast_to(tn, (2, 2)) / pn)
    np.testing.assert_allclose(t.grad.numpy(), (np.log(tn / pn) + 1).sum(axis=0, keepdims=True))


def test_jax_jit_and_vmap() -> None:
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    t, p = _data()
    t32, p32 = jnp.asarray(t, dtype=jnp.float32), jnp.asarray(p, dtype=jnp.float32)
    eager = np.asarray(kldiv.kld(t32, p32))
    np.testing.assert_allclose(np.asarray(jax.jit(kldiv.kld)(t32, p32)), eager, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(kldiv.kld)(t32, p32)), eager, rtol=1e-6)
    loss = kldiv.KLDivergence()
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda a, c, w: loss(a, c, sample_weight=w))(t32, p32, jnp.ones(4))),
        eager.mean(), rtol=1e-6)
    g = jax.jit(jax.grad(lambda c: loss(t32, c)))(p32)
    _, gp_want = _analytic(t, p, np.full((4, 1), 0.25))
    np.testing.assert_allclose(np.asarray(g), gp_want, rtol=1e-4, atol=1e-6)
