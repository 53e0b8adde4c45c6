"""A user migrating from PyTorch, TRL, Liger-Kernel or torchmetrics: where the peer defines the
same divergence, kldiv gives the definition's value.

Each test here failed on the code before its fix. The oracle is the definition: an entry
whose teacher (or student) probability is exactly 0 (a ``-inf`` logit) while the other
side's log-probability is finite makes ``KL`` ``+inf``, however small that other
probability is (``exp`` of it may underflow to 0 in the dtype; the probability itself is
not 0).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend

INF = math.inf


def _oracle_infinite(tl: np.ndarray, sl: np.ndarray, divergence: str) -> np.ndarray:
    """Rows whose divergence is ``+inf`` by definition: ``KL(A || B)`` is infinite where A
    has a finite logit (a probability > 0) and B a ``-inf`` one (a probability of 0)."""
    a, b = (tl, sl) if divergence == "kl" else (sl, tl)
    return (np.isfinite(a) & np.isneginf(b)).any(axis=-1)


# A finite logit far below its row's maximum: its probability, exp(-200) in float32 (and
# exp(-800) in float64), underflows to 0, but its log-probability is finite.
_CASES = {
    # KL(P || Q): the teacher keeps a tiny probability where the student's logit is -inf
    "kl": (np.array([[0.0, -800.0, 0.0, 1.0], [0.0, -INF, 2.0, 3.0]]),
           np.array([[0.0, -INF, 0.0, 1.0], [0.0, -INF, 2.0, 3.0]])),
    # KL(Q || P): the student keeps a tiny probability where the teacher's logit is -inf
    "reverse_kl": (np.array([[0.0, -INF, 0.0, 1.0], [3.0, 1.0, 2.0, 0.0]]),
                   np.array([[0.0, -800.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]])),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_fused_linear_underflowed_probability_against_zero_is_infinite(
        backend: ArrayBackend, divergence: str, dtype: str) -> None:
    """``fused_linear_divergence`` gave a finite KL (the term ``0 * inf`` counted as 0)
    where an underflowed probability met a probability of exactly 0; the family functions
    give ``+inf`` on the same logits, as the definition does."""
    tl, sl = _CASES[divergence]
    if dtype not in backend.float_dtypes:
        pytest.skip(f"{backend.name}: no {dtype}")
    V = sl.shape[-1]
    # student logits through an identity head: the student's -inf (a whole column) goes
    # into the bias
    assert (np.isneginf(sl).any(axis=0) == np.isneginf(sl).all(axis=0)).all()
    hidden = np.where(np.isfinite(sl), sl, 0.0)
    bias = np.where(np.isneginf(sl).any(axis=0), -INF, 0.0)
    want_inf = _oracle_infinite(tl, sl, divergence)
    assert want_inf.any() and not want_inf.all()
    h, w, b = (backend.asarray(x.astype(dtype)) for x in (hidden, np.eye(V), bias))
    t = backend.asarray(tl.astype(dtype))
    for chunk_size in (None, 1):
        got = backend.to_numpy(kldiv.fused_linear_divergence(
            h, w, t, student_bias=b, divergence=divergence, reduction="none",
            chunk_size=chunk_size))
        assert np.array_equal(np.isposinf(got), want_inf), (got, chunk_size)
        assert np.isfinite(got[~want_inf]).all()
    fn = kldiv.kl_divergence if divergence == "kl" else kldiv.reverse_kl_divergence
    same = backend.to_numpy(fn(t, backend.asarray((hidden + bias).astype(dtype)),
                               inputs="logits"))
    assert np.array_equal(np.isposinf(same), want_inf)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_fused_linear_torch_autograd_routes_agree_on_underflow(divergence: str) -> None:
    """The torch routes (the in-place one with its hand-written backward, and the one
    autograd sees whole, taken under ``torch.func``) give ``+inf`` alike."""
    torch = pytest.importorskip("torch")
    from torch.func import grad

    tl, sl = _CASES[divergence]
    V = sl.shape[-1]
    hidden = torch.tensor(np.where(np.isfinite(sl), sl, 0.0), dtype=torch.float32)
    bias = torch.tensor(np.where(np.isneginf(sl).any(axis=0), -INF, 0.0), dtype=torch.float32)
    t = torch.tensor(tl, dtype=torch.float32)
    w = torch.eye(V)
    want_inf = _oracle_infinite(tl, sl, divergence)

    def rows(h: object) -> object:
        return kldiv.fused_linear_divergence(h, w, t, student_bias=bias, divergence=divergence,
                                             reduction="none")

    eager = rows(hidden.clone().requires_grad_())
    assert np.array_equal(np.isposinf(eager.detach().numpy()), want_inf)
    seen: list[object] = []

    def finite_part(h: object) -> object:
        out = rows(h)
        seen.append(out)
        return out[1]

    g = grad(finite_part)(hidden)
    assert np.array_equal(np.isposinf(seen[0].detach().numpy()), want_inf)  # type: ignore[attr-defined]
    assert bool(torch.isfinite(g).all())
