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
from conftest import ArrayBackend

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


# ------------------------------------------------------------------------- tiny temperatures
# student logits = h @ eye(V).T = h exactly; the teacher's as logits or as hidden @ eye
TINY_S = np.array([[30.0, 20.0, 30.0], [10.0, 40.0, 0.0], [5.0, -5.0, 2.5], [10.0, 10.0, 9.0]])
TINY_T = np.array([[10.0, 20.0, 30.0], [40.0, 40.0, 10.0], [5.0, -5.0, 2.5], [-INF, 10.0, 10.0]])
# normal numbers (XLA flushes subnormal ones to 0 on CPU), small enough that 40 / T overflows
TINY = (("float64", 1e-307), ("float32", 2e-38))


def _tiny_want(div: str, dtype: str, temperature: float) -> np.ndarray:
    with np.errstate(over="ignore"):  # a divergence beyond float32's range is +inf there
        return oracle(TINY_S, np.eye(3), TINY_T, div, temperature).astype(dtype).astype(float)


def _close_finite(got: Any, want: np.ndarray, rtol: float = 1e-5) -> None:
    got = np.asarray(got, dtype=np.float64)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("div", ["kl", "reverse_kl", "js"])
def test_tiny_temperature_is_the_argmax_limit(backend: ArrayBackend, div: str) -> None:
    """``x / T`` overflows for a tiny (valid) temperature; the log-softmax of ``x / T`` is
    still defined (one-hot at the row maximum, shared between ties): the oracle's value,
    never NaN (JS was NaN where it is finite), on every backend and both teacher forms."""
    for dtype, temperature in TINY:
        if dtype not in backend.float_dtypes:
            continue
        h, w = backend.asarray(TINY_S, dtype), backend.asarray(np.eye(3), dtype)
        tl = backend.asarray(TINY_T, dtype)
        want = _tiny_want(div, dtype, temperature)
        got = F(h, w, tl, divergence=div, beta=BETA, temperature=temperature, reduction="none",
                chunk_size=3)
        _close_finite(backend.to_numpy(got), want)
        th = backend.asarray(np.where(np.isinf(TINY_T), -1e30, TINY_T), dtype)  # finite
        got = F(h, w, teacher_hidden=th, teacher_weight=w, divergence=div, beta=BETA,
                temperature=temperature, reduction="none")
        with np.errstate(over="ignore"):
            want = oracle(TINY_S, np.eye(3), np.asarray(backend.to_numpy(th), np.float64), div,
                          temperature).astype(dtype).astype(float)
        _close_finite(backend.to_numpy(got), want)


def _torch_plain(torch: Any, h: Any, w: Any, b: Any, tl: Any, div: str, temperature: float
                 ) -> Any:
    """Per-token divergence by torch autograd's own operations (float64), for gradients."""
    lq = torch.log_softmax((h @ w.T + b) / temperature, -1)
    lp = torch.log_softmax(tl / temperature, -1)
    p, q = lp.exp(), lq.exp()
    if div == "kl":
        return (p * (lp - lq)).sum(-1)
    if div == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    lm = torch.logaddexp(lp + math.log(BETA), lq + math.log1p(-BETA))
    return BETA * (p * (lp - lm)).sum(-1) + (1 - BETA) * (q * (lq - lm)).sum(-1)


TORCH_MODES = [("forward", "chunks"), ("forward", "slabs"), ("recompute", "chunks"),
               ("recompute", "slabs")]


@pytest.mark.parametrize("grad_mode,weight_grad", TORCH_MODES)
@pytest.mark.parametrize("div", ["kl", "reverse_kl", "js"])
def test_torch_temperature_below_one_every_mode(monkeypatch: pytest.MonkeyPatch, div: str,
                                                grad_mode: str, weight_grad: str) -> None:
    """A temperature below 1 shifts each row before the division: the weight gradient by
    vocabulary slabs must shift its tiles' rows by the chunk pass's amounts (stored with the
    log-sum-exps). Values and all three gradients against autograd's float64 formula, slabs
    of 4 entries, chunks of 3 tokens, both reductions' routes."""
    torch = pytest.importorskip("torch")
    from kldiv.backends import torch_fused, torch_fused_slabs

    monkeypatch.setattr(torch_fused, "GRAD_MODE", grad_mode)
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", weight_grad)
    monkeypatch.setattr(torch_fused_slabs, "SLAB_COLUMNS", 4)
    d = _data(7, tokens=(7,))
    h, w, b = (torch.tensor(d[k] * 3, requires_grad=True) for k in ("h", "w", "b"))
    tl = torch.tensor(d["tl"] * 3)
    sw = torch.tensor(np.random.default_rng(8).random(7))
    for reduction in ("mean_with_sample_weight", "none"):
        out = F(h, w, tl, student_bias=b, divergence=div, beta=BETA, temperature=0.4,
                sample_weight=sw, reduction=reduction, chunk_size=3)
        per = _torch_plain(torch, h, w, b, tl, div, 0.4) * sw
        ref = per if reduction == "none" else per.sum() / sw.sum()
        np.testing.assert_allclose(out.detach().numpy(), ref.detach().numpy(), rtol=1e-10)
        cot = torch.ones_like(out)
        for g, e in zip(torch.autograd.grad(out, (h, w, b), cot),
                        torch.autograd.grad(ref, (h, w, b), cot), strict=True):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("grad_mode,weight_grad", TORCH_MODES)
def test_torch_tiny_temperature_gradient_is_finite_where_the_limit_is_flat(
        monkeypatch: pytest.MonkeyPatch, grad_mode: str, weight_grad: str) -> None:
    """Student == teacher at a temperature so small that ``x / T`` overflows: KL 0 and
    gradients 0 (were NaN), in every gradient mode."""
    torch = pytest.importorskip("torch")
    from kldiv.backends import torch_fused, torch_fused_slabs

    monkeypatch.setattr(torch_fused, "GRAD_MODE", grad_mode)
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", weight_grad)
    monkeypatch.setattr(torch_fused_slabs, "SLAB_COLUMNS", 2)
    t = torch.tensor(TINY_S)
    h, w = t.clone().requires_grad_(), torch.eye(3, dtype=torch.float64).requires_grad_()
    for div in ("kl", "reverse_kl"):
        for reduction in ("sum", "none"):
            out = F(h, w, t, divergence=div, temperature=1e-307, reduction=reduction,
                    chunk_size=3)
            assert torch.equal(out.detach(), torch.zeros_like(out))
            for g in torch.autograd.grad(out, (h, w), torch.ones_like(out)):
                assert torch.equal(g, torch.zeros_like(g)), (div, reduction, g)


_TRITON_TINY = r"""
import math, numpy as np, torch, triton
from kldiv.backends import torch_fused_chunks, torch_fused_slabs
from kldiv import fused_linear_divergence as F
from test_adversarial_fused import TINY_S, TINY_T, BETA, _tiny_want, _close_finite, _data
from test_adversarial_fused import _torch_plain
torch_fused_chunks.FORCE_ROUTE = "triton"
torch_fused_slabs.SLAB_COLUMNS = 4
for div in ("kl", "reverse_kl", "js"):
    # tiny temperature: the kernels shift each row before dividing (were NaN)
    h, w = torch.tensor(TINY_S, dtype=torch.float32), torch.eye(3)
    got = F(h, w, torch.tensor(TINY_T, dtype=torch.float32), divergence=div, beta=BETA,
            temperature=2e-38, reduction="none")
    _close_finite(got.numpy(), _tiny_want(div, "float32", 2e-38))
    # a temperature below 1, both weight-gradient modes: the slab kernel reads the shifts
    d = _data(9, tokens=(7,))
    for mode in ("chunks", "slabs"):
        torch_fused_slabs.WEIGHT_GRAD = mode
        f32 = lambda a: torch.tensor(a * 1.5, dtype=torch.float32)
        h, w, b = (f32(d[k]).requires_grad_() for k in ("h", "w", "b"))
        tl = f32(d["tl"])
        out = F(h, w, tl, student_bias=b, divergence=div, beta=BETA, temperature=0.4,
                chunk_size=3)
        x64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
        ref = _torch_plain(torch, *x64, tl.double(), div, 0.4).mean()
        assert abs(float(out) - float(ref)) < 1e-5 * (1 + abs(float(ref))), (div, mode)
        for g, e in zip(torch.autograd.grad(out, (h, w, b)), torch.autograd.grad(ref, x64)):
            np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=1e-4, atol=1e-5)
# a teacher row of all -inf (no mass): the generic functions' value, zero gradients for it
from test_adversarial_fused import _empty_row_case
h, w, tl = (torch.tensor(a, dtype=torch.float32) for a in _empty_row_case())
keep = [0, 2, 3, 4]
for div in ("kl", "js"):
    for mode in ("chunks", "slabs"):
        torch_fused_slabs.WEIGHT_GRAD = mode
        x = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        per = F(*x, tl, divergence=div, beta=BETA, reduction="none", chunk_size=2)
        assert torch.isfinite(per).all(), (div, mode, per)
        got = torch.autograd.grad(F(*x, tl, divergence=div, beta=BETA, reduction="sum",
                                    chunk_size=2), x)
        y = [h[keep].clone().requires_grad_(), w.clone().requires_grad_()]
        want = torch.autograd.grad(F(*y, tl[keep], divergence=div, beta=BETA,
                                     reduction="sum", chunk_size=2), y)
        assert float(got[0][1].abs().max()) < 1e-6, (div, mode)
        np.testing.assert_allclose(got[0][keep].numpy(), want[0].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-4, atol=1e-6)
# a probability that underflows to 0 against a -inf logit on the other side: +inf (the
# family functions' value), not 0 * inf = 0
inf = float("inf")
eye = torch.eye(4)
kl = F(torch.tensor([[0.0, 0.0, 0.0, 1.0]]), eye, torch.tensor([[0.0, -200.0, 0.0, 1.0]]),
       student_bias=torch.tensor([0.0, -inf, 0.0, 0.0]), divergence="kl", reduction="none")
rkl = F(torch.tensor([[0.0, -200.0, 0.0, 1.0]]), eye, torch.tensor([[0.0, -inf, 0.0, 1.0]]),
        divergence="reverse_kl", reduction="none")
assert float(kl[0]) == inf and float(rkl[0]) == inf, (kl, rkl)
print("TRITON-TINY-OK")
"""


def test_triton_kernels_tiny_temperature_interpreted() -> None:
    """The Triton kernels (chunk and slab gradient) in Triton's interpreter on CPU: a tiny
    temperature gives the oracle's values, a temperature below 1 the float64 gradients by
    chunks and by slabs, a teacher row of all ``-inf`` finite values and zero gradients. A subprocess: TRITON_INTERPRET is read at import."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    from test_triton_family import skip_if_triton_interpreter_defective

    skip_if_triton_interpreter_defective()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(root, "src"), os.path.join(root, "tests"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _TRITON_TINY], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "TRITON-TINY-OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------- -inf logits, no warnings
@pytest.mark.parametrize("div", ["kl", "reverse_kl", "js"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_numpy_minus_inf_logits_warn_nothing(div: str, temperature: float) -> None:
    """``-inf`` logits are documented input (a masked vocabulary entry, ``0 log 0 = 0``):
    NumPy must not warn ('invalid value encountered in multiply/subtract' from the masked
    ``0 * inf`` terms, an error under ``-W error``), and a float16 result beyond its range
    is inf without a cast warning."""
    import warnings

    d = _data(10, tokens=(4,))
    tl = d["tl"].copy()
    tl[:, [2, 5]] = -INF
    b = np.zeros(V)
    b[[3, 5]] = -INF
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = F(d["h"], d["w"], tl, student_bias=b, divergence=div, beta=BETA,
                temperature=temperature, reduction="none")
        half = F(d["h"].astype(np.float16) * 300, d["w"].astype(np.float16),
                 (d["tl"] * 0).astype(np.float16), divergence="kl", reduction="sum",
                 temperature=1e-3)
    _close_finite(out, oracle(d["h"], d["w"], tl, div, temperature, b=b))
    assert half.dtype == np.float16 and half == np.inf


# ------------------------------------------------------------------------- second pass
def _dask_case(which: str) -> tuple[Any, ...]:
    """``(args, kwargs, numpy args, numpy kwargs)``: Dask inputs with a block of size 0 on
    one axis (chunks such as ``((3, 0, 7), ...)``, as ``x[mask]`` then
    ``compute_chunk_sizes()`` gives)."""
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(31)
    h, w = rng.standard_normal((10, H)), rng.standard_normal((V, H))
    tl, b = rng.standard_normal((10, V)) * 2, rng.standard_normal(V)
    th, tw = rng.standard_normal((10, 3)), rng.standard_normal((V, 3))
    sw = rng.random(10)
    rows, vocab = (3, 0, 7), (4, 0, 7)
    dh = da.from_array(h, chunks=(rows, -1) if which == "tokens" else -1)
    dw = da.from_array(w, chunks=(vocab, -1) if which == "vocabulary" else -1)
    db = da.from_array(b, chunks=(vocab,) if which == "bias" else -1)
    dsw = da.from_array(sw, chunks=(rows,))
    if which == "teacher_hidden":
        return ((dh, dw), {"teacher_hidden": da.from_array(th, chunks=((5, 0, 5), (1, 0, 2))),
                           "teacher_weight": da.from_array(tw, chunks=(vocab, (2, 0, 1))),
                           "sample_weight": dsw},
                (h, w), {"teacher_hidden": th, "teacher_weight": tw, "sample_weight": sw})
    dtl = da.from_array(tl, chunks=(rows, vocab) if which == "teacher_logits" else -1)
    return ((dh, dw, dtl), {"student_bias": db, "sample_weight": dsw},
            (h, w, tl), {"student_bias": b, "sample_weight": sw})


@pytest.mark.parametrize("which", ["tokens", "vocabulary", "bias", "teacher_logits",
                                   "teacher_hidden"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_dask_blocks_of_size_zero(which: str, temperature: float) -> None:
    """Dask arrays with an empty block on the token, vocabulary or hidden axis (boolean
    indexing then ``compute_chunk_sizes()``) give the NumPy result; they failed inside Dask
    at ``compute()`` (``zero-size array to reduction operation maximum``, a concatenate
    shape error)."""
    args, kwargs, np_args, np_kwargs = _dask_case(which)
    for reduction in ("none", "sum"):
        got = F(*args, **kwargs, divergence="js", beta=BETA, temperature=temperature,
                reduction=reduction).compute()
        want = F(*np_args, **np_kwargs, divergence="js", beta=BETA, temperature=temperature,
                 reduction=reduction)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_dask_boolean_indexed_inputs() -> None:
    """The documented recipe: ``x[mask]``, ``compute_chunk_sizes()``, then the call (the
    last block of the tokens is empty here); the default chunk size takes all tokens."""
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(32)
    h, w, tl = rng.standard_normal((10, H)), rng.standard_normal((V, H)), rng.standard_normal((10, V))
    mask = np.array([True, False] * 5)
    dh = da.from_array(h, chunks=3)[da.from_array(mask, chunks=3)]
    dtl = da.from_array(tl, chunks=3)[da.from_array(mask, chunks=3)]
    dh.compute_chunk_sizes()
    dtl.compute_chunk_sizes()
    assert 0 in dh.chunks[0]
    got = F(dh, da.from_array(w), dtl, reduction="none").compute()
    np.testing.assert_allclose(got, oracle(h[mask], w, tl[mask], "kl"), rtol=1e-10, atol=1e-12)


def _empty_row_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(33)
    h, w = rng.standard_normal((5, H)), rng.standard_normal((V, H))
    tl = rng.standard_normal((5, V))
    tl[1] = -INF  # a teacher row with no distribution (e.g. a padding token's logits)
    tl[3, :4] = -INF
    return h, w, tl


@pytest.mark.parametrize("div", ["kl", "reverse_kl", "js"])
def test_all_minus_inf_teacher_row_is_the_generic_functions_value(backend: ArrayBackend,
                                                                  div: str) -> None:
    """A teacher row of all ``-inf`` logits: the value of ``kl_divergence`` /
    ``reverse_kl_divergence`` / ``js_divergence`` with ``inputs="logits"`` (the documented
    definition: P = 0 there, so KL 0, reverse KL inf, JS ``-(1 - beta) log(1 - beta)``);
    was NaN, and a zero sample weight on that token made the whole reduced loss NaN."""
    h, w, tl = _empty_row_case()
    fn = {"kl": kldiv.kl_divergence, "reverse_kl": kldiv.reverse_kl_divergence,
          "js": kldiv.js_divergence}[div]
    kw = {"beta": BETA} if div == "js" else {}
    want = np.asarray(fn(tl, h @ w.T, inputs="logits", **kw), dtype=np.float64)
    assert want[1] == (INF if div == "reverse_kl" else 0.0 if div == "kl"
                       else pytest.approx(-(1 - BETA) * math.log1p(-BETA)))
    for dtype in ("float32", "float64"):
        if dtype not in backend.float_dtypes:
            continue
        x = [backend.asarray(a, dtype) for a in (h, w, tl)]
        got = np.asarray(backend.to_numpy(F(*x, divergence=div, beta=BETA, reduction="none",
                                              chunk_size=2)), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-10)
        if div != "reverse_kl":  # inf * 0 is NaN there, as in the generic functions
            sw = backend.asarray(np.array([1.0, 0.0, 1.0, 1.0, 1.0]), dtype)
            got_mean = float(backend.to_numpy(F(*x, divergence=div, beta=BETA,
                                                sample_weight=sw, chunk_size=2)))
            assert got_mean == pytest.approx(float(np.delete(want, 1).mean()), rel=1e-5)


@pytest.mark.parametrize("grad_mode,weight_grad", TORCH_MODES)
@pytest.mark.parametrize("div", ["kl", "js"])
def test_torch_all_minus_inf_teacher_row_gradients(monkeypatch: pytest.MonkeyPatch, div: str,
                                                   grad_mode: str, weight_grad: str) -> None:
    """The gradients of a teacher row of all ``-inf``: its loss is a constant (KL 0, JS
    ``-(1 - beta) log(1 - beta)``), so it adds nothing: the gradients equal those of the
    other tokens alone, in every gradient mode (were NaN)."""
    torch = pytest.importorskip("torch")
    from kldiv.backends import torch_fused, torch_fused_slabs

    monkeypatch.setattr(torch_fused, "GRAD_MODE", grad_mode)
    monkeypatch.setattr(torch_fused_slabs, "WEIGHT_GRAD", weight_grad)
    monkeypatch.setattr(torch_fused_slabs, "SLAB_COLUMNS", 4)
    h, w, tl = _empty_row_case()
    keep = [0, 2, 3, 4]
    for reduction in ("sum", "none"):
        x = [torch.tensor(a, requires_grad=True) for a in (h, w)]
        out = F(*x, torch.tensor(tl), divergence=div, beta=BETA, reduction=reduction,
                chunk_size=2)
        got = torch.autograd.grad(out.sum(), x)
        y0 = [torch.tensor(h[keep], requires_grad=True), torch.tensor(w, requires_grad=True)]
        ref = F(*y0, torch.tensor(tl[keep]), divergence=div, beta=BETA, reduction="sum",
                chunk_size=2)
        want = torch.autograd.grad(ref, y0)
        assert float(got[0][1].abs().max()) < 1e-12  # JS: 0 up to rounding
        np.testing.assert_allclose(got[0][keep].numpy(), want[0].numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("div", ["kl", "js"])
def test_jax_all_minus_inf_teacher_row_gradients(div: str) -> None:
    """JAX's custom VJP: a teacher row of all ``-inf`` adds nothing to the gradients (were
    NaN, and NaN everywhere once reduced)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    h, w, tl = _empty_row_case()
    keep = [0, 2, 3, 4]

    def loss(a: Any, b: Any, t: Any) -> Any:
        return F(a, b, t, divergence=div, beta=BETA, reduction="sum", chunk_size=2)

    f32 = [np.asarray(a, np.float32) for a in (h, w, tl)]
    got = jax.grad(loss, argnums=(0, 1))(*map(jnp.asarray, f32))
    want = jax.grad(loss, argnums=(0, 1))(jnp.asarray(f32[0][keep]), jnp.asarray(f32[1]),
                                          jnp.asarray(f32[2][keep]))
    assert float(jnp.abs(got[0][1]).max()) < 1e-6
    np.testing.assert_allclose(np.asarray(got[0])[keep], want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1e-320, 1e-40])
@pytest.mark.parametrize("div", ["kl", "reverse_kl", "js"])
def test_temperature_zero_in_the_compute_dtype_is_the_limit(backend: ArrayBackend, div: str,
                                                           temperature: float) -> None:
    """A temperature below the compute dtype's smallest normal number (0 there: it rounds to 0
    or is subnormal, which XLA flushes) is the ``T -> 0`` limit, as in the family functions
    (their value on the same logits); was NaN (``0 / 0`` at each row's maximum)."""
    h, w, tl = _empty_row_case()
    tl[1] = tl[0]  # rows with mass only (the all -inf row is tested above)
    tl[2, :3] = tl[2].max()  # a tie at the maximum: the limit shares the mass
    fn = {"kl": kldiv.kl_divergence, "reverse_kl": kldiv.reverse_kl_divergence,
          "js": kldiv.js_divergence}[div]
    kw = {"beta": BETA} if div == "js" else {}
    for dtype in ("float32", "float64"):
        if dtype not in backend.float_dtypes or (dtype == "float64" and temperature > 1e-300):
            continue
        s32 = (np.asarray(h, dtype) @ np.asarray(w, dtype).T).astype(np.float64)
        want = np.asarray(fn(np.asarray(tl, dtype), np.asarray(s32, dtype), inputs="logits",
                             temperature=temperature, **kw), np.float64)
        assert np.isfinite(want).any() or div != "js"
        x = [backend.asarray(a, dtype) for a in (h, w, tl)]
        got = np.asarray(backend.to_numpy(F(*x, divergence=div, beta=BETA, reduction="none",
                                              temperature=temperature)), np.float64)
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_temperature_zero_in_the_compute_dtype_has_zero_gradients() -> None:
    """The limit is flat: zero (finite) gradients for every student input, torch and JAX,
    also where the hidden states hold inf."""
    torch = pytest.importorskip("torch")
    h, w, tl = _empty_row_case()
    tl[1] = tl[0]
    h = h.astype(np.float32)
    h[4, 0] = INF
    th, tw, tb = (torch.tensor(a, requires_grad=True)
                  for a in (h, w.astype(np.float32), np.zeros(V, np.float32)))
    out = F(th, tw, torch.tensor(tl, dtype=torch.float32), student_bias=tb, divergence="js",
            temperature=1e-320)
    out.backward()
    for g in (th.grad, tw.grad, tb.grad):
        assert g is not None and bool((g == 0).all())
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    grads = jax.grad(lambda a, b: F(a, b, jnp.asarray(tl, jnp.float32), divergence="kl",
                                    temperature=1e-40), argnums=(0, 1))(
        jnp.asarray(h), jnp.asarray(w, jnp.float32))
    for g in grads:
        assert bool((g == 0).all())
