"""Triton kernels for the PyTorch CUDA fast path (forward and fused backward).

Both kernels read the inputs through their strides (a broadcast input has stride 0), so no
input is ever copied; the forward pass writes one value per row, the backward pass writes the
gradients and nothing else. They run on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
NumPy interpreter), which is how they are tested on a machine without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["backward", "forward"]

EPSILON = 1e-7


@triton.jit
def _kld_fwd(t_ptr, p_ptr, out_ptr, n_cols, st_r, st_c, sp_r, sp_c,
             EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=out_ptr.dtype.element_ty)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offs
        m = cols < n_cols
        t = tl.load(t_ptr + row * st_r + cols * st_c, mask=m, other=1.0)
        p = tl.load(p_ptr + row * sp_r + cols * sp_c, mask=m, other=1.0)
        # clip to [EPS, 1] with NaN passing through (masked lanes give 1 * log(1) = 0)
        t = tl.where(t < EPS, EPS, tl.where(t > 1.0, 1.0, t))
        p = tl.where(p < EPS, EPS, tl.where(p > 1.0, 1.0, p))
        acc += t * tl.log(t / p)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


@triton.jit
def _kld_bwd(t_ptr, p_ptr, g_ptr, gt_ptr, gp_ptr, n_cols, st_r, st_c, sp_r, sp_c,
             NEED_T: tl.constexpr, NEED_P: tl.constexpr, EPS: tl.constexpr,
             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    t0 = tl.load(t_ptr + row * st_r + cols * st_c, mask=m, other=1.0)
    p0 = tl.load(p_ptr + row * sp_r + cols * sp_c, mask=m, other=1.0)
    g = tl.load(g_ptr + row)
    t = tl.where(t0 < EPS, EPS, tl.where(t0 > 1.0, 1.0, t0))
    p = tl.where(p0 < EPS, EPS, tl.where(p0 > 1.0, 1.0, p0))
    r = t / p
    zero = tl.zeros([BLOCK], dtype=gt_ptr.dtype.element_ty)
    if NEED_P:
        gp = tl.where((p0 >= EPS) & (p0 <= 1.0), -r * g, zero)
        tl.store(gp_ptr + row * n_cols + cols, gp, mask=m)
    if NEED_T:
        gt = tl.where((t0 >= EPS) & (t0 <= 1.0), (tl.log(r) + 1.0) * g, zero)
        tl.store(gt_ptr + row * n_cols + cols, gt, mask=m)


def _block(n_cols: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n_cols)))


def forward(t2: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Row sums of ``t * log(t / p)`` (clipped) of two ``(rows, cols)`` tensors (any strides)."""
    rows, cols = p2.shape
    out = torch.empty(rows, dtype=p2.dtype, device=p2.device)
    _kld_fwd[(rows,)](t2, p2, out, cols, t2.stride(0), t2.stride(1), p2.stride(0), p2.stride(1),
                      EPS=EPSILON, BLOCK=_block(cols, 1024))
    return out


def backward(t2: torch.Tensor, p2: torch.Tensor, g1: torch.Tensor, need_t: bool,
             need_p: bool) -> tuple[Any, Any]:
    """Full-size ``(rows, cols)`` gradients (``None`` where not needed); see ``torch_``."""
    rows, cols = p2.shape
    g1 = g1.contiguous()
    gt = torch.empty((rows, cols), dtype=p2.dtype, device=p2.device) if need_t else None
    gp = torch.empty((rows, cols), dtype=p2.dtype, device=p2.device) if need_p else None
    dummy = gt if gt is not None else gp
    block = _block(cols, 2048)
    grid = (rows, triton.cdiv(cols, block))
    _kld_bwd[grid](t2, p2, g1, gt if gt is not None else dummy, gp if gp is not None else dummy,
                   cols, t2.stride(0), t2.stride(1), p2.stride(0), p2.stride(1),
                   NEED_T=need_t, NEED_P=need_p, EPS=EPSILON, BLOCK=block)
    return gt, gp
