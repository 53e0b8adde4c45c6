"""The fused linear divergence's Triton route (kernel and host code) in Triton's interpreter on
CPU, against the float64 oracle (``fused_linear_oracle.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

# -------------------------------------------------------------------- Triton, interpreted
_TRITON_SCRIPT = r"""
import math, numpy as np, torch, triton
from kldiv.backends import torch_fused_chunks, torch_fused_slabs, triton_fused
from kldiv import fused_linear_divergence, _fused_linear_math
from fused_linear_oracle import _data, _teacher, _call, plain, reduce, BETA, DIVS
import array_api_compat
torch_fused_chunks.FORCE_ROUTE = "triton"
calls = []
real_chunk = triton_fused.chunk
def spy(*a, **k):
    calls.append(1)
    return real_chunk(*a, **k)
triton_fused.chunk = spy
slab_calls = []
real_slab = triton_fused.slab_grad
def slab_spy(*a, **k):
    slab_calls.append(1)
    return real_slab(*a, **k)
triton_fused.slab_grad = slab_spy
torch_fused_slabs.SLAB_COLUMNS = 8  # slabs that do not divide V
for mode, masked in (("chunks", ""), ("chunks", "both"), ("slabs", "both")):
    torch_fused_slabs.WEIGHT_GRAD = mode
    d = _data(20, masked=masked)
    for div in DIVS:
        for form in ("logits", "hidden"):
            for temp, chunk in ((1.0, 3), (1.9, 4)):
                # token tiles of 2 rows for the slab pass (float32: 12 bytes an entry)
                torch_fused_slabs.SLAB_TILE_BYTES = 2 * 8 * 12 if chunk == 4 else None
                f32 = lambda a: torch.tensor(a, dtype=torch.float32)
                h, w, b = (f32(d[k]).requires_grad_() for k in ("h", "w", "b"))
                teacher = _teacher(d, form, f32)
                sw = f32(d["sw"])
                out = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=temp,
                            sample_weight=sw, chunk_size=chunk)
                got = torch.autograd.grad(out, (h, w, b))
                d64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
                t64 = {k: None if v is None else v.double() for k, v in teacher.items()}
                xp = array_api_compat.array_namespace(d64[0])
                ref = reduce(xp, plain(xp, *d64, t64, div, BETA, temp), sw.double(),
                             "mean_with_sample_weight")
                want = torch.autograd.grad(ref, d64)
                assert abs(float(out) - float(ref)) < 1e-5 * (1 + abs(float(ref))), (div, form)
                for g, e in zip(got, want):
                    assert torch.isfinite(g).all(), (div, form, masked)
                    np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=1e-4,
                                               atol=1e-5)
                per = _call(h, w, b, teacher, divergence=div, beta=BETA, temperature=temp,
                            reduction="none", chunk_size=chunk)
                per_ref = plain(xp, *d64, t64, div, BETA, temp)
                np.testing.assert_allclose(per.detach().double().numpy(),
                                           per_ref.detach().numpy(), rtol=1e-5, atol=1e-6)
# a batched backward of per-token results (is_grads_batched): linear_backward on this route
d = _data(21)
f32 = lambda a: torch.tensor(a, dtype=torch.float32)
h, w = (f32(d[k]).requires_grad_() for k in ("h", "w"))
tl = f32(d["tl"])
per = _call(h, w, None, {"logits": tl}, divergence="js", beta=BETA, temperature=1.3,
            reduction="none", chunk_size=3)
cots = torch.rand((3, *per.shape))
got = torch.autograd.grad(per, (h, w), cots, is_grads_batched=True)
d64 = [x.detach().double().requires_grad_() for x in (h, w)]
xp = array_api_compat.array_namespace(d64[0])
ref = plain(xp, *d64, None, {"logits": tl.double()}, "js", BETA, 1.3)
want = torch.autograd.grad(ref, d64, cots.double(), is_grads_batched=True)
for g, e in zip(got, want):
    np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=1e-4, atol=1e-5)
# the kernel alone: a strided teacher slice in bfloat16, no gradient
s = torch.randn(5, 300)
t = torch.randn(5, 600, dtype=torch.bfloat16)[:, ::2]
from kldiv import _fused_linear_math
loss = triton_fused.chunk(s.clone(), t, None, None, None, _fused_linear_math.Plan("js", 0.4, 1.0, 5), False)
xp = array_api_compat.array_namespace(s)
want = _fused_linear_math.chunk_terms(xp, s.double(), t.double(), "js", 0.4, False)[0]
np.testing.assert_allclose(loss.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
# per-token scales that are stride-0 views (the gradient of a sum; a scalar sample weight
# with reduction="sum") and a strided bias: the kernels read contiguous copies
for mode in ("chunks", "slabs"):
    torch_fused_slabs.WEIGHT_GRAD = mode
    d = _data(24)
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)
    h, w = (f32(d[k]).requires_grad_() for k in ("h", "w"))
    b = f32(np.stack([d["b"], d["b"]], -1))[:, 0].requires_grad_()  # stride 2
    tl = f32(d["tl"])
    d64 = [x.detach().double().requires_grad_() for x in (h, w, b)]
    xp = array_api_compat.array_namespace(d64[0])
    ref_per = plain(xp, *d64, {"logits": tl.double()}, "js", BETA, 1.0)
    for kind in ("none-sum", "sum-scalar"):
        if kind == "none-sum":
            out = _call(h, w, b, {"logits": tl}, divergence="js", beta=BETA,
                        reduction="none", chunk_size=3).sum()
            ref = ref_per.sum()
        else:
            out = _call(h, w, b, {"logits": tl}, divergence="js", beta=BETA,
                        reduction="sum", sample_weight=np.float32(0.5), chunk_size=3)
            ref = 0.5 * ref_per.sum()
        got = torch.autograd.grad(out, (h, w, b))
        want = torch.autograd.grad(ref, d64, retain_graph=True)
        assert abs(float(out) - float(ref)) < 1e-4 * (1 + abs(float(ref))), (mode, kind)
        for g, e in zip(got, want):
            np.testing.assert_allclose(g.double().numpy(), e.numpy(), rtol=1e-4, atol=1e-5)
# bfloat16 weights kept bfloat16 in the products (CUDA's half route): by slabs, the slab
# kernel stores a bfloat16 gradient; the same as by chunks to bfloat16 rounding
bf = torch.bfloat16
real_operand = torch_fused_chunks._operand
torch_fused_chunks._operand = lambda x, cd: x if x is None or x.dtype in (bf, cd) else x.to(cd)
d = _data(25)
h, w = (torch.tensor(d[k]).to(bf) for k in ("h", "w"))
th, tw = (torch.tensor(d[k]).to(bf) for k in ("th", "tw"))
n = 10
for div in DIVS:
    plan = _fused_linear_math.Plan(div, BETA, 1.3, 3)
    res = {}
    for mode in ("chunks", "slabs", "lowp"):
        torch_fused_slabs.WEIGHT_GRAD = mode
        _, dh, dW, _ = torch_fused_slabs.chunks(
            h.reshape(n, -1), w, None, ("hidden", th.reshape(n, -1), tw, None), plan,
            torch.rand(n, generator=torch.Generator().manual_seed(1)), (True, True, False))
        res[mode] = (dh.float(), dW)
    assert res["slabs"][1].dtype == bf and res["chunks"][1].dtype == torch.float32
    assert res["lowp"][1].dtype == bf
    for other in ("slabs", "lowp"):
        for a, e in zip(res[other], res["chunks"]):
            np.testing.assert_allclose(a.float().numpy(), e.float().numpy(), rtol=2e-2,
                                       atol=2e-2 * float(e.abs().max()))
torch_fused_chunks._operand = real_operand
assert len(calls) > 50, len(calls)  # the host code ran the kernel, not the torch ops
assert len(slab_calls) > 50, len(slab_calls)  # and the slab kernel for the weight gradient
print("TRITON-FUSED-OK")
"""


def test_triton_kernel_interpreted(torch: Any) -> None:
    """The Triton route (kernel and host code) on CPU tensors in Triton's interpreter: values
    and gradients of every divergence, both teacher forms, -inf logits, temperatures, chunk
    sizes that do not divide the tokens, the weight gradient by chunks and by vocabulary
    slabs (the slab kernel). A subprocess: TRITON_INTERPRET is read at import."""
    pytest.importorskip("triton")
    from test_triton_family import skip_if_triton_interpreter_defective

    skip_if_triton_interpreter_defective()  # Triton <= 3.6.0 with NumPy >= 2.4: see there
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "src"), os.path.join(root, "tests"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "TRITON-FUSED-OK" in proc.stdout, proc.stderr[-3000:]
