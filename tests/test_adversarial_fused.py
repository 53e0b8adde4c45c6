"""Hostile inputs and options for ``kldiv.fused_linear_divergence`` / ``FusedLinearDivergence``.

Each test here failed on the code before its fix. The oracle is written from the definition
(docs/large-vocabulary.md): the logits materialised in float64, each row shifted by its
maximum *before* the division by the temperature (the same number, mathematically:
``max(x / T) = max(x) / T`` for ``T > 0``), log-softmaxed, then the divergence's terms with
``0 log 0 = 0``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import kldiv

F = kldiv.fused_linear_divergence
INF = math.inf
BETA = 0.3
H, V = 6, 11


# ------------------------------------------------------------------------------------ oracle
def _log_softmax64(x: np.ndarray, temperature: float) -> np.ndarray:
    out = np.full(x.shape, -INF)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        live = row > -INF
        if live.any():
            with np.errstate(over="ignore"):
                z = (row[live] - row[live].max()) / temperature  # <= 0: -inf at worst
            out[idx][live] = z - math.log(math.fsum(math.exp(v) for v in z))
    return out


def oracle(h: Any, w: Any, tl: Any, div: str, temperature: float = 1.0, beta: float = BETA,
           b: Any = None) -> np.ndarray:
    """Per-token divergence, float64, from the definition (Python floats per term)."""
    s = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    if b is not None:
        s = s + np.asarray(b, np.float64)
    lq = _log_softmax64(s, temperature)
    lp = _log_softmax64(np.asarray(tl, np.float64), temperature)
    out = np.zeros(lq.shape[:-1])
    for idx in np.ndindex(out.shape):
        terms = []
        for a, c in zip(lp[idx].tolist(), lq[idx].tolist(), strict=True):
            if div == "reverse_kl":
                a, c = c, a
            if div in ("kl", "reverse_kl"):
                if a > -INF:
                    terms.append(INF if c == -INF else math.exp(a) * (a - c))
            else:
                p, q = math.exp(a), math.exp(c)
                m = beta * p + (1 - beta) * q
                if p > 0:
                    terms.append(beta * p * math.log(p / m))
                if q > 0:
                    terms.append((1 - beta) * q * math.log(q / m))
        out[idx] = INF if INF in terms else math.fsum(terms)
    return out


def _data(seed: int = 0, tokens: tuple[int, ...] = (2, 5)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"h": rng.standard_normal((*tokens, H)), "w": rng.standard_normal((V, H)) / 2,
            "tl": 2 * rng.standard_normal((*tokens, V)), "b": rng.standard_normal(V)}


# ------------------------------------------------------------- JAX: hessian of per-token values
def test_jax_hessian_of_per_token_results() -> None:
    """``jax.hessian`` (forward over reverse) of ``reduction="none"`` results, and of reduced
    ones with the recomputing backward: the custom_vjp's forward rule must not call the
    custom_vjp function itself (JAX refuses forward mode through it: a TypeError)."""
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    from kldiv.backends import jax_fused

    d = _data(1, tokens=(3,))
    w, tl = jnp.asarray(d["w"]), jnp.asarray(d["tl"])

    def plain(h: Any) -> Any:
        lq = jax.nn.log_softmax(h @ w.T / 1.5)
        lp = jax.nn.log_softmax(tl / 1.5)
        return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)

    h = jnp.asarray(d["h"])
    got = jax.hessian(lambda h: F(h, w, tl, temperature=1.5, reduction="none", chunk_size=2))(h)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.hessian(plain)(h)), atol=1e-10)
    mp = pytest.MonkeyPatch()
    mp.setattr(jax_fused, "GRAD_MODE", "recompute")
    try:
        got = jax.hessian(lambda h: F(h, w, tl, temperature=1.5, chunk_size=2))(h)
    finally:
        mp.undo()
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(jax.hessian(lambda h: plain(h).mean())(h)), atol=1e-10)


# ------------------------------------------------------------------- wider-than-double inputs
def test_numpy_longdouble_is_not_computed_in_float32() -> None:
    """``np.longdouble`` inputs: at least float64 arithmetic (was float32: 2e-8 off), the
    result in the input's dtype."""
    d = _data(2)
    ld = np.longdouble
    out = F(d["h"].astype(ld), d["w"].astype(ld), d["tl"].astype(ld), reduction="none")
    assert out.dtype == ld
    want = oracle(d["h"], d["w"], d["tl"], "kl")
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------- sparse, masked and unsized inputs
@pytest.mark.parametrize("which", ["student_hidden", "student_weight", "teacher_logits"])
def test_torch_sparse_input_is_a_type_error(which: str) -> None:
    torch = pytest.importorskip("torch")
    d = _data(3)
    args = {"student_hidden": torch.tensor(d["h"][0]), "student_weight": torch.tensor(d["w"]),
            "teacher_logits": torch.tensor(d["tl"][0])}
    args[which] = args[which].to_sparse()
    with pytest.raises(TypeError, match=f"{which} is a sparse"):
        F(args["student_hidden"], args["student_weight"], args["teacher_logits"])


@pytest.mark.parametrize("which", ["student_hidden", "student_weight", "teacher_logits",
                                   "student_bias"])
def test_numpy_masked_array_input_is_a_type_error(which: str) -> None:
    """A masked array's mask cannot take part in a matrix product: a TypeError pointing to
    ``sample_weight`` for masks (was NumPy's broadcasting ValueError or a silent answer)."""
    d = _data(4)
    args = {"student_hidden": d["h"], "student_weight": d["w"], "teacher_logits": d["tl"],
            "student_bias": d["b"]}
    x = args[which]
    args[which] = np.ma.masked_array(x, mask=np.zeros(x.shape, bool))
    with pytest.raises(TypeError, match=f"{which} is a masked array"):
        F(args["student_hidden"], args["student_weight"], args["teacher_logits"],
          student_bias=args["student_bias"])


def test_dask_unknown_sizes_are_a_clear_error() -> None:
    """Dask arrays of unknown size (after boolean indexing): a ValueError that names the input
    and says how to fix it (was 'must have shape (nan, 11) ... got (nan, 11)')."""
    da = pytest.importorskip("dask.array")
    d = _data(5, tokens=(10,))
    keep = da.from_array(np.arange(10) < 7, chunks=5)  # no zero-size chunk once computed
    h = da.from_array(d["h"], chunks=(5, H))[keep]
    tl = da.from_array(d["tl"], chunks=(5, V))[keep]
    with pytest.raises(ValueError, match=r"student_hidden has an unknown size.*compute_chunk_sizes"):
        F(h, da.from_array(d["w"]), tl)
    # with known sizes the same data works
    out = F(h.compute_chunk_sizes(), da.from_array(d["w"]), tl.compute_chunk_sizes(),
            reduction="none")
    np.testing.assert_allclose(np.asarray(out.compute()), oracle(d["h"][:7], d["w"],
                                                                 d["tl"][:7], "kl"), rtol=1e-12)


# ------------------------------------------------------------------------- options and config
@pytest.mark.parametrize("reduction", ["BATCHMEAN", "BatchMean", " batchmean"])
def test_reduction_names_are_exact(reduction: str) -> None:
    """Reduction names are exact, lower-case (Keras; kldiv's loss classes): 'SUM' was refused
    but 'BATCHMEAN' accepted."""
    d = _data(6)
    with pytest.raises(ValueError, match="Invalid reduction"):
        F(d["h"], d["w"], d["tl"], reduction=reduction)
    with pytest.raises(ValueError, match="Invalid reduction"):
        kldiv.FusedLinearDivergence(reduction=reduction)


@pytest.mark.parametrize("config", [None, [("divergence", "kl")], "kl", 3])
def test_from_config_of_a_non_mapping_is_a_clear_type_error(config: Any) -> None:
    with pytest.raises(TypeError, match="config must be a dict"):
        kldiv.FusedLinearDivergence.from_config(config)
