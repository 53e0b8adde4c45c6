"""kldiv.fused_linear_divergence / FusedLinearDivergence (issue 13): the divergence from hidden
states, chunked, against the plain formula in float64 (values and gradients) on torch, the
forward-only libraries, the loss class and the docs. The oracle: ``fused_linear_oracle.py``;
the CUDA routes' choices, autograd's modes, JAX, validation and Triton: the
``test_fused_linear_*.py`` beside this file.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from conftest import Backend
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
    _np_inputs,
    _teacher,
    plain,
    reduce,
)
from kldiv import FusedLinearDivergence, _fused_linear, fused_linear_divergence


@pytest.mark.parametrize("div,form,bias,temp,chunk", CASES)
def test_torch_values_and_gradients(torch: Any, div: str, form: str, bias: bool, temp: float,
                                    chunk: int | None) -> None:
    import array_api_compat

    d = _data(1)
    tt = torch.tensor
    h, w, b = (tt(d[k], requires_grad=True) for k in ("h", "w", "b"))
    teacher = _teacher(d, form, tt)
    sw = tt(d["sw"])
    out = _call(h, w, b if bias else None, teacher, divergence=div, beta=BETA, temperature=temp,
                sample_weight=sw, chunk_size=chunk)
    xp = array_api_compat.array_namespace(h)
    ref = reduce(xp, plain(xp, h, w, b if bias else None, teacher, div, BETA, temp), sw,
                 "mean_with_sample_weight")
    _close(out.detach(), ref.detach())
    assert out.dtype == torch.float64 and out.shape == ()
    wrt = (h, w, b) if bias else (h, w)
    got = torch.autograd.grad(out, wrt)
    want = torch.autograd.grad(ref, wrt)
    for g, e in zip(got, want, strict=True):
        _close(g, e)
    if not bias:
        assert b.grad is None


@pytest.mark.parametrize("reduction", ["none", "sum", "sum_over_batch_size", "auto", "mean",
                                       "mean_with_sample_weight", "batchmean"])
@pytest.mark.parametrize("weight", ["none", "tokens", "rows", "scalar"])
def test_torch_reductions_and_weights(torch: Any, reduction: str, weight: str) -> None:
    """Every reduction, with per-token, per-row (Keras 2's rank rule: a (B,) weight scales
    each row of a (B, T) loss) and scalar weights; 'none' gives per-token values."""
    import array_api_compat

    d = _data(2)
    h, w = torch.tensor(d["h"], requires_grad=True), torch.tensor(d["w"], requires_grad=True)
    teacher = _teacher(d, "logits", torch.tensor)
    sw = {"none": None, "tokens": torch.tensor(d["sw"]), "rows": torch.tensor([0.3, 1.5]),
          "scalar": 2.0}[weight]
    out = _call(h, w, None, teacher, divergence="js", beta=BETA, sample_weight=sw,
                reduction=reduction, chunk_size=3)
    xp = array_api_compat.array_namespace(h)
    wref = None if sw is None else (torch.tensor(sw) if weight == "scalar" else
                                    sw[:, None] if weight == "rows" else sw)
    ref = reduce(xp, plain(xp, h, w, None, teacher, "js", BETA, 1.0), wref, reduction)
    assert tuple(out.shape) == (TOKENS if reduction == "none" else ())
    _close(out.detach(), ref.detach())
    cot = torch.rand(out.shape, dtype=out.dtype)
    for g, e in zip(torch.autograd.grad(out, (h, w), cot), torch.autograd.grad(ref, (h, w), cot),
                    strict=True):
        _close(g, e)


def test_torch_all_masked_is_zero_with_zero_gradients(torch: Any) -> None:
    d = _data(3)
    h, w, b = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w", "b"))
    out = _call(h, w, b, _teacher(d, "hidden", torch.tensor), sample_weight=torch.zeros(TOKENS))
    assert float(out.detach()) == 0.0
    for g in torch.autograd.grad(out, (h, w, b)):
        assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("masked,divs", [("both", DIVS), ("teacher", ["kl", "js"]),
                                         ("student", ["reverse_kl", "js"])])
def test_torch_minus_inf_logits(torch: Any, masked: str, divs: list[str]) -> None:
    """-inf logits (a masked vocabulary) on either side, where the divergence is finite:
    values as the oracle's, gradients finite and equal to the oracle's."""
    import array_api_compat

    d = _data(4, masked=masked)
    for div in divs:
        for form in ("logits", "hidden"):
            h, w, b = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w", "b"))
            teacher = _teacher(d, form, torch.tensor)
            out = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=1.3,
                        chunk_size=4)
            xp = array_api_compat.array_namespace(h)
            ref = plain(xp, h, w, b, teacher, div, BETA, 1.3).mean()
            assert math.isfinite(float(out.detach()))
            _close(out.detach(), ref.detach())
            for g, e in zip(torch.autograd.grad(out, (h, w, b)),
                            torch.autograd.grad(ref, (h, w, b)), strict=True):
                assert torch.isfinite(g).all()
                _close(g, e)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_half_precision_in_float32(torch: Any, dtype: str) -> None:
    """Half inputs: computed in float32, returned (value and gradients) in the input dtype."""
    import array_api_compat

    half = getattr(torch, dtype)
    d = _data(5)
    h, w = (torch.tensor(d[k]).to(half).requires_grad_() for k in ("h", "w"))
    tl = torch.tensor(d["tl"]).to(half)
    for reduction in ("mean_with_sample_weight", "none"):
        out = fused_linear_divergence(h, w, tl, divergence="js", beta=BETA, chunk_size=3,
                                      reduction=reduction)
        assert out.dtype == half
        h64, w64 = (x.detach().double().requires_grad_() for x in (h, w))
        xp = array_api_compat.array_namespace(h64)
        ref = plain(xp, h64, w64, None, {"logits": tl.double()}, "js", BETA, 1.0)
        ref = ref.mean() if reduction != "none" else ref
        # float32 arithmetic on half inputs: only the final rounding to half is lost
        tol = {"float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
        np.testing.assert_allclose(out.detach().double().numpy(), ref.detach().numpy(),
                                   rtol=tol, atol=1e-5)
        cot = torch.ones(out.shape, dtype=out.dtype)
        gh, gw = torch.autograd.grad(out, (h, w), cot)
        eh, ew = torch.autograd.grad(ref, (h64, w64), cot.double())
        assert gh.dtype == half and gw.dtype == half
        for g, e in ((gh, eh), (gw, ew)):
            np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=4 * tol, atol=4 * tol *
                                       float(e.abs().max()))


def test_torch_half_operands_route(torch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's half-precision route (half operands kept half in the matrix products, no
    workspace), run on CPU: the same values and gradients as the float32 route."""
    from kldiv.backends import torch_fused_chunks

    d = _data(17)
    bf = torch.bfloat16
    results = []
    half_products = []
    real_mm = torch_fused_chunks._mm

    def spy(a: Any, b: Any, cd: Any) -> Any:
        half_products.append(bf in (a.dtype, b.dtype))
        return real_mm(a, b, cd)

    monkeypatch.setattr(torch_fused_chunks, "_mm", spy)
    for keep_half in (False, True):
        if keep_half:
            monkeypatch.setattr(torch_fused_chunks, "_operand",
                                lambda x, cd: x if x is None or x.dtype in (bf, cd) else x.to(cd))
            half_products.clear()
        h, w = (torch.tensor(d[k]).to(bf).requires_grad_() for k in ("h", "w"))
        th, tw = (torch.tensor(d[k]).to(bf) for k in ("th", "tw"))
        out = fused_linear_divergence(h, w, teacher_hidden=th, teacher_weight=tw,
                                      divergence="js", beta=BETA, chunk_size=3)
        results.append((out, *torch.autograd.grad(out, (h, w))))
    assert half_products and all(half_products)  # every product took half operands
    for a, e in zip(*results, strict=True):
        assert a.dtype == bf
        np.testing.assert_allclose(a.detach().double().numpy(), e.detach().double().numpy(),
                                   rtol=2e-2, atol=1e-3)


def test_torch_gradient_modes_agree(torch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients computed in the forward pass and recomputed in the backward are the same."""
    from kldiv.backends import torch_fused

    d = _data(6)
    grads = {}
    for mode in ("forward", "recompute"):
        monkeypatch.setattr(torch_fused, "GRAD_MODE", mode)
        h, w, b = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w", "b"))
        out = _call(h, w, b, _teacher(d, "hidden", torch.tensor), divergence="reverse_kl",
                    sample_weight=torch.tensor(d["sw"]), chunk_size=4)
        grads[mode] = torch.autograd.grad(out, (h, w, b))
    for a, e in zip(grads["forward"], grads["recompute"], strict=True):
        _close(a, e, 1e-12)


def test_torch_backward_twice_and_scaled(torch: Any) -> None:
    """A unit incoming gradient takes the stored gradients as they are; a second backward
    through the same result (``retain_graph=True``) accumulates the same gradients again,
    also after ``zero_grad(set_to_none=False)`` changed ``.grad`` in place; other incoming
    gradients scale them, any number of times; torch's ``gradcheck`` passes."""
    d = _data(16)
    h = torch.tensor(d["h"], requires_grad=True)
    w = torch.tensor(d["w"], requires_grad=True)

    def loss() -> Any:
        return fused_linear_divergence(h, w, torch.tensor(d["tl"]), chunk_size=3)

    out = loss()
    out.backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    out.backward(retain_graph=True)
    _close(h.grad, 2 * first[0], 1e-12)
    _close(w.grad, 2 * first[1], 1e-12)
    h.grad.zero_()
    w.grad.zero_()
    out.backward()
    _close(h.grad, first[0], 1e-12)
    _close(w.grad, first[1], 1e-12)
    with pytest.raises(RuntimeError, match="second time"):  # torch's own, graph released
        out.backward()
    out = loss()
    for _ in range(2):
        gh, gw = torch.autograd.grad(3.5 * out, (h, w), retain_graph=True)
        _close(gh, 3.5 * first[0], 1e-12)
        _close(gw, 3.5 * first[1], 1e-12)
    gh, gw = torch.autograd.grad(out, (h, w), retain_graph=True)
    gh.mul_(0)  # a returned gradient changed in place: the stored ones are intact
    gh, gw = torch.autograd.grad(out, (h, w))
    _close(gh, first[0], 1e-12)
    _close(gw, first[1], 1e-12)


def test_torch_unit_gradient_handed_over_without_copy(torch: Any) -> None:
    """``loss.backward()`` (graph released) takes the stored gradients as ``.grad`` without
    a copy: the weight gradient of a large vocabulary is not duplicated."""
    d = _data(3)
    h = torch.tensor(d["h"], requires_grad=True)
    w = torch.tensor(d["w"], requires_grad=True)
    out = fused_linear_divergence(h, w, torch.tensor(d["tl"]), chunk_size=3)
    stored = out.grad_fn.saved_tensors[1].data_ptr()
    out.backward()
    assert w.grad.data_ptr() == stored


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "js"])
@pytest.mark.parametrize("reduction", ["sum", "mean_with_sample_weight", "batchmean", "none"])
def test_torch_gradcheck(torch: Any, divergence: str, reduction: str) -> None:
    """torch's own ``gradcheck`` (it differentiates the same result several times)."""
    d = _data(5)
    h, w, b = (torch.tensor(d[k], requires_grad=True) for k in ("h", "w", "b"))
    sw = torch.tensor(d["sw"])

    def f(h: Any, w: Any, b: Any) -> Any:
        out = fused_linear_divergence(h, w, torch.tensor(d["tl"]), student_bias=b,
                                      divergence=divergence, temperature=1.7,
                                      sample_weight=sw, reduction=reduction, chunk_size=2)
        return out.sum() if reduction == "none" else out

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_torch_teacher_is_constant(torch: Any) -> None:
    d = _data(7)
    h, w = torch.tensor(d["h"], requires_grad=True), torch.tensor(d["w"], requires_grad=True)
    tl = torch.tensor(d["tl"], requires_grad=True)
    th, tw = (torch.tensor(d[k], requires_grad=True) for k in ("th", "tw"))
    for reduction in ("mean_with_sample_weight", "none"):
        fused_linear_divergence(h, w, tl, reduction=reduction).sum().backward()
        fused_linear_divergence(h, w, teacher_hidden=th, teacher_weight=tw,
                                reduction=reduction).sum().backward()
    assert tl.grad is None and th.grad is None and tw.grad is None
    assert h.grad is not None and w.grad is not None


def test_torch_sample_weight_is_constant(torch: Any) -> None:
    d = _data(15)
    h = torch.tensor(d["h"], requires_grad=True)
    for reduction in ("mean_with_sample_weight", "none", "sum"):
        sw = torch.tensor(d["sw"], requires_grad=True)
        out = fused_linear_divergence(h, torch.tensor(d["w"]), torch.tensor(d["tl"]),
                                      sample_weight=sw, reduction=reduction)
        out.sum().backward()
        assert sw.grad is None and h.grad is not None


def test_torch_mixed_precision_products(torch: Any) -> None:
    """The half-operand matrix product (CUDA's route) accumulates and returns float32."""
    from kldiv.backends import torch_fused_chunks

    _mm = torch_fused_chunks._mm

    a, b = torch.randn(5, 300), torch.randn(300, 7)
    for lo in (torch.bfloat16, torch.float16):
        got = _mm(a.to(lo), b.to(lo), torch.float32)
        want = a.to(lo).double() @ b.to(lo).double()
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-3)
        got = _mm(a, b.to(lo), torch.float32)  # a float32 gradient against a half weight
        assert got.dtype == torch.float32
        # the float32 side may be rounded to half (CUDA) or not (the fallback): either way
        # the output is not
        want = a.double() @ b.to(lo).double()
        np.testing.assert_allclose(got.double().numpy(), want.numpy(),
                                   atol=2e-2 * float(want.abs().max()))


def test_torch_chunk_size_bounds_every_chunk(torch: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No chunk of logits has more than chunk_size rows, forward and backward."""
    from kldiv.backends import torch_fused_chunks

    rows: list[int] = []
    real = torch_fused_chunks.chunk_terms_

    def spy(s: Any, *args: Any) -> Any:
        rows.append(s.shape[0])
        return real(s, *args)

    monkeypatch.setattr(torch_fused_chunks, "chunk_terms_", spy)
    d = _data(8, tokens=(3, 7))
    h = torch.tensor(d["h"], requires_grad=True)
    out = fused_linear_divergence(h, torch.tensor(d["w"]), torch.tensor(d["tl"]), chunk_size=4,
                                  reduction="none")
    out.sum().backward()
    assert rows == [4, 4, 4, 4, 4, 1] * 2  # 21 tokens: forward, then the backward's recompute


def test_torch_leading_axes_and_empty(torch: Any) -> None:
    d = _data(9, tokens=(2, 3, 2))
    h = torch.tensor(d["h"], requires_grad=True)
    out = fused_linear_divergence(h, torch.tensor(d["w"]), torch.tensor(d["tl"]),
                                  reduction="none", chunk_size=5)
    assert tuple(out.shape) == (2, 3, 2)
    empty = torch.zeros((0, 4, H), dtype=torch.float64, requires_grad=True)
    tl = torch.zeros((0, 4, V), dtype=torch.float64)
    w = torch.tensor(d["w"])
    assert fused_linear_divergence(empty, w, tl, reduction="none").shape == (0, 4)
    out = fused_linear_divergence(empty, w, tl)
    assert float(out.detach()) == 0.0
    out.backward()
    assert empty.grad is not None and empty.grad.shape == empty.shape


def test_torch_compile_graph_break(torch: Any) -> None:
    """Under torch.compile the call is one graph break: same values and gradients."""
    torch._dynamo.reset()
    d = _data(10)
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    tl = torch.tensor(d["tl"])

    def step(x: Any) -> Any:
        x = torch.tanh(x) * 2
        return fused_linear_divergence(x, head.weight, tl, student_bias=head.bias,
                                       divergence="js", chunk_size=3)

    x = torch.tensor(d["h"])
    eager = step(x)
    ge = torch.autograd.grad(eager, (head.weight, head.bias))
    compiled = torch.compile(step, backend="aot_eager")(x)
    gc = torch.autograd.grad(compiled, (head.weight, head.bias))
    _close(compiled.detach(), eager.detach(), 1e-12)
    for a, e in zip(gc, ge, strict=True):
        _close(a, e, 1e-12)
    torch._dynamo.reset()


# ---------------------------------------------------------------------- forward-only libraries
@pytest.mark.parametrize("member", [b.pytest_param() for b in (Backend.NUMPY, Backend.ARRAY_API_STRICT, Backend.CUPY)])
@pytest.mark.parametrize("div", DIVS)
def test_forward_only_libraries(member: Backend, div: str) -> None:
    b_ = member.handle()
    d = _data(13, masked="both")
    for form in ("logits", "hidden"):
        teacher = _teacher(d, form, lambda a: b_.asarray(a, "float64"))
        h, w, b = (b_.asarray(d[k], "float64") for k in ("h", "w", "b"))
        for reduction, chunk in (("none", 3), ("batchmean", 4), ("mean_with_sample_weight", None)):
            out = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=1.8,
                        sample_weight=b_.asarray(d["sw"], "float64"), reduction=reduction,
                        chunk_size=chunk)
            assert b_.is_native(out)
            ref = reduce(np, plain(np, d["h"], d["w"], d["b"], _teacher(d, form, np.asarray),
                                   div, BETA, 1.8), d["sw"], reduction)
            _close(b_.to_numpy(out), ref)
    out32 = _call(b_.asarray(d["h"], "float32"), b_.asarray(d["w"], "float32"), None,
                  {"logits": b_.asarray(d["tl"], "float32")}, chunk_size=3)
    assert out32.dtype == b_.dtype("float32")


def test_numpy_forward_memory_is_one_chunk() -> None:
    """NumPy's traced peak: one chunk's temporaries, no copy of the weight or the teacher's
    logits, nothing of size (tokens, V)."""
    import tracemalloc

    rng = np.random.default_rng(18)
    n, hid, v, chunk = 256, 256, 4096, 8
    h = rng.standard_normal((n, hid), dtype=np.float32)
    w = rng.standard_normal((v, hid), dtype=np.float32) / 16
    t = rng.standard_normal((n, v), dtype=np.float32)
    fused_linear_divergence(h, w, t, divergence="js", chunk_size=chunk)  # warm-up
    tracemalloc.start()
    fused_linear_divergence(h, w, t, divergence="js", chunk_size=chunk)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24 * chunk * v * 4 < w.nbytes, peak  # w: 4 MiB, t: 4 MiB


# ----------------------------------------------------------------------------- loss class
def test_loss_class_config_pickle_and_call() -> None:
    loss = FusedLinearDivergence("js", beta=0.25, temperature=2.0, reduction="batchmean",
                                 chunk_size=4, name="distill")
    cfg = loss.get_config()
    assert cfg == {"divergence": "js", "beta": 0.25, "temperature": 2.0,
                   "reduction": "batchmean", "chunk_size": 4, "name": "distill"}
    assert FusedLinearDivergence.from_config(cfg) == loss
    assert pickle.loads(pickle.dumps(loss)) == loss
    assert "FusedLinearDivergence(divergence='js'" in repr(loss)
    assert FusedLinearDivergence() != loss
    with pytest.raises(TypeError, match="Unknown FusedLinearDivergence config keys"):
        FusedLinearDivergence.from_config({**cfg, "fn": "x"})
    with pytest.raises(ValueError, match="open interval"):
        FusedLinearDivergence("js", beta=1.0)
    x = _np_inputs()
    _close(loss(x["h"], x["w"], x["tl"], sample_weight=np.ones(TOKENS)),
           fused_linear_divergence(x["h"], x["w"], x["tl"], divergence="js", beta=0.25,
                                   temperature=2.0, reduction="batchmean",
                                   sample_weight=np.ones(TOKENS)))
    _close(loss(x["h"], x["w"], teacher_hidden=x["th"], teacher_weight=x["tw"]),
           reduce(np, plain(np, x["h"], x["w"], None, {"hidden": x["th"], "weight": x["tw"]},
                            "js", 0.25, 2.0), None, "batchmean"))


# ------------------------------------------------------------------------------------ docs
def test_public_names() -> None:
    import kldiv

    assert kldiv.fused_linear_divergence is _fused_linear.fused_linear_divergence
    assert kldiv.FusedLinearDivergence is _fused_linear.FusedLinearDivergence
    assert {"fused_linear_divergence", "FusedLinearDivergence"} <= set(kldiv.__all__)


def test_docs_examples_run(torch: Any) -> None:
    """The python blocks of docs/large-vocabulary.md, in order, in one fresh process."""
    pytest.importorskip("jax")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "large-vocabulary.md")) as f:
        text = f.read()
    blocks = [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("python\n")]
    assert len(blocks) == 3
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.join(root, "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", "\n".join(blocks) + "\nprint('DOCS-OK')"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "DOCS-OK" in proc.stdout, proc.stderr[-3000:]
