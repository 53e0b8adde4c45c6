"""The float64 oracle and the shared data of the fused linear divergence tests
(``test_fused_linear*.py``; not a test module).

The oracle materialises the logits and is written from the definitions (issue 12):
temperature divides the logits, log-softmax, then KL(teacher || student), KL(student ||
teacher) or the generalized Jensen-Shannon divergence, ``0 log 0 = 0``. It is written once
against the array API, so the same code differentiates under torch autograd and ``jax.grad``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kldiv import fused_linear_divergence

DIVS = ["kl", "reverse_kl", "js"]
BETA = 0.3
TOKENS = (2, 5)  # 10 tokens: chunk sizes 3 and 4 do not divide them
H, HT, V = 6, 5, 11


# ------------------------------------------------------------------------------ the oracle
def _lse(xp: Any, x: Any) -> Any:
    m = xp.max(x, axis=-1, keepdims=True)
    return m + xp.log(xp.sum(xp.exp(x - m), axis=-1, keepdims=True))


def _xlogy(xp: Any, a: Any, d: Any) -> Any:
    zero = a == 0  # the inner where keeps NaN (0 * inf) out of the gradient too
    return xp.where(zero, xp.zeros_like(a), a * xp.where(zero, xp.zeros_like(d), d))


def plain(xp: Any, h: Any, w: Any, b: Any, teacher: dict[str, Any], div: str, beta: float,
          temp: float) -> Any:
    """Per-token divergence with the logits materialised (float64 when the inputs are)."""
    s = h @ w.T + (b if b is not None else 0)
    if "logits" in teacher:
        t = teacher["logits"]
    else:
        t = teacher["hidden"] @ teacher["weight"].T
        if teacher.get("bias") is not None:
            t = t + teacher["bias"]
    s, t = s / temp, t / temp
    lq, lp = s - _lse(xp, s), t - _lse(xp, t)
    p, q = xp.exp(lp), xp.exp(lq)
    if div == "kl":
        return xp.sum(_xlogy(xp, p, lp - lq), axis=-1)
    if div == "reverse_kl":
        return xp.sum(_xlogy(xp, q, lq - lp), axis=-1)
    ninf = -math.inf
    both = (lp == ninf) & (lq == ninf)
    a = xp.where(both, xp.zeros_like(lp), lp + math.log(beta))
    c = xp.where(both, xp.zeros_like(lq), lq + math.log1p(-beta))
    lm = xp.where(both, xp.full_like(lp, ninf), xp.logaddexp(a, c))
    return beta * xp.sum(_xlogy(xp, p, lp - lm), axis=-1) + (1 - beta) * xp.sum(
        _xlogy(xp, q, lq - lm), axis=-1)


def reduce(xp: Any, per: Any, w: Any, reduction: str) -> Any:
    """The loss classes' reductions (plus batchmean), from their definitions."""
    lw = per if w is None else per * w
    if reduction == "none":
        return lw
    total = xp.sum(lw)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / per.shape[0]
    if reduction == "mean_with_sample_weight" and w is not None:
        return total / xp.sum(w * xp.ones_like(per))
    return total / math.prod(per.shape)


def _data(seed: int = 0, tokens: tuple[int, ...] = TOKENS, masked: str = "") -> dict[str, Any]:
    """Float64 NumPy inputs. ``masked``: "both" / "teacher" / "student": -inf logits on some
    vocabulary entries of those sides (where the divergence stays finite)."""
    rng = np.random.default_rng(seed)
    d = {"h": rng.standard_normal((*tokens, H)), "w": rng.standard_normal((V, H)) / 2,
         "b": rng.standard_normal(V), "tl": 2 * rng.standard_normal((*tokens, V)),
         "th": rng.standard_normal((*tokens, HT)), "tw": rng.standard_normal((V, HT)) / 2,
         "tb": rng.standard_normal(V), "sw": rng.random(tokens)}
    if masked in ("both", "student"):
        d["b"][[1, 7]] = -np.inf
    if masked in ("both", "teacher"):
        d["tl"][..., [1, 7] if masked == "both" else [2, 4]] = -np.inf
        d["tb"][[1, 7] if masked == "both" else [2, 4]] = -np.inf
    return d


def _teacher(d: dict[str, Any], form: str, conv: Any) -> dict[str, Any]:
    if form == "logits":
        return {"logits": conv(d["tl"])}
    return {"hidden": conv(d["th"]), "weight": conv(d["tw"]), "bias": conv(d["tb"])}


def _kwargs(teacher: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "logits" in teacher:
        return (teacher["logits"],), {}
    return (), {"teacher_hidden": teacher["hidden"], "teacher_weight": teacher["weight"],
                "teacher_bias": teacher["bias"]}


def _call(h: Any, w: Any, b: Any, teacher: dict[str, Any], **kw: Any) -> Any:
    args, tkw = _kwargs(teacher)
    return fused_linear_divergence(h, w, *args, student_bias=b, **tkw, **kw)


def _close(a: Any, b: Any, tol: float = 1e-10) -> None:
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               rtol=tol, atol=tol)



CASES = [(div, form, bias, temp, chunk) for div in DIVS for form in ("logits", "hidden")
         for bias, temp, chunk in ((True, 1.0, 3), (False, 2.5, 4), (True, 0.7, None))]


def _np_inputs() -> dict[str, Any]:
    """The NumPy inputs of the validation and loss-class tests."""
    d = _data(14)
    return {"h": d["h"], "w": d["w"], "tl": d["tl"], "th": d["th"], "tw": d["tw"]}
