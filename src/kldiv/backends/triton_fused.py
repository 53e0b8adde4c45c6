"""Triton kernel for one chunk of :func:`kldiv.fused_linear_divergence` (CUDA route).

The matrix products run on cuBLAS (:mod:`kldiv.backends.torch_fused_chunks`); this kernel does all
the rest of a chunk in one launch, one program per token row, without any ``(rows, V)``
temporary: it reads the student's logits (float32, written by the matrix product) and the
teacher's (any float dtype and row stride: a slice of the caller's logits is read where it
lies), adds the biases, shifts each row by its maximum and divides by the temperature (the
shift first: a tiny temperature cannot overflow ``x / T``) and

1. finds both rows' log-sum-exp online over vocabulary blocks (a running max and a running
   sum rescaled as the max grows, per lane, then combined);
2. sums the divergence's terms (``0 log 0 = 0``) and, for the reverse KL and the
   Jensen-Shannon divergence, the row constant of their gradient;
3. overwrites the student's logits with ``d loss / d logits`` times the row's weight (the
   caller's per-token scale divided by the temperature), ready for the gradient products.

Forward KL's gradient ``q - p`` needs no row constant, so it is written during step 2.
Runs on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter), which is how it is
tested without a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._fused_linear_math import Plan

__all__ = ["chunk", "slab_grad"]

_DIV_CODES = {"kl": 0, "reverse_kl": 1, "js": 2}


@triton.jit
def _load_row(ptr, bias_ptr, cols, msk, HAS_BIAS: tl.constexpr):
    # the logits as given (plus the bias), before the shift and the temperature
    x = tl.load(ptr + cols, mask=msk, other=float("-inf")).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=msk, other=0.0).to(tl.float32)
    return x


@triton.jit
def _online_lse(ptr, bias_ptr, n_cols, temperature, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """``(shift, lse, mass)``: the row's finite maximum (0 for an all -inf row) and the
    log-sum-exp of ``(x - shift) / temperature``: the shift comes before the division, so
    a tiny temperature cannot overflow ``x / T`` (no ``inf - inf``). A row of all -inf (no
    mass) gets ``lse = 0``, so that its log-probabilities are -inf, not NaN; ``mass`` is 1,
    or 0 for such a row."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offs
        x = _load_row(ptr, bias_ptr, cols, cols < n_cols, HAS_BIAS)
        new_m = tl.maximum(m, x)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: nothing to add
        d = d * tl.exp((m - shift) / temperature) + tl.exp((x - shift) / temperature)
        m = new_m
    big = tl.max(m, axis=0)
    big = tl.where(big == float("-inf"), 0.0, big)
    total = tl.sum(d * tl.exp((m - big) / temperature), axis=0)
    return big, tl.where(total == 0.0, 0.0, tl.log(total)), tl.where(total == 0.0, 0.0, 1.0)


@triton.jit
def _log_m(lp, lq, log_beta, log_1mb):
    """``logaddexp(log beta + lp, log(1 - beta) + lq)``, -inf where both are -inf (also the
    family kernels' mixture, :mod:`kldiv.backends.triton_family`)."""
    a = lp + log_beta
    b = lq + log_1mb
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def _log_probs(s_row, t_row, sb_ptr, tb_ptr, c0, n_cols, m_s, m_t, lse_s, lse_t, temperature,
               HAS_SB: tl.constexpr, HAS_TB: tl.constexpr, BLOCK: tl.constexpr):
    # one vocabulary block of both rows: (log q, log p, column mask, columns)
    cols = c0 + tl.arange(0, BLOCK)
    msk = cols < n_cols
    lq = (_load_row(s_row, sb_ptr, cols, msk, HAS_SB) - m_s) / temperature - lse_s
    lp = (_load_row(t_row, tb_ptr, cols, msk, HAS_TB) - m_t) / temperature - lse_t
    return lq, lp, msk, cols


@triton.jit
def _fl_chunk(s_ptr, t_ptr, sb_ptr, tb_ptr, loss_ptr, scale_ptr, stats_ptr, n_cols, s_stride,
              t_stride, temperature, beta, log_beta, log_1mb,
              DIV: tl.constexpr, HAS_SB: tl.constexpr, HAS_TB: tl.constexpr,
              NEED_GRAD: tl.constexpr, STATS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    m_s, lse_s, _ = _online_lse(s_row, sb_ptr, n_cols, temperature, HAS_SB, BLOCK)
    m_t, lse_t, mass_t = _online_lse(t_row, tb_ptr, n_cols, temperature, HAS_TB, BLOCK)
    gscale = 0.0
    if NEED_GRAD:
        gscale = tl.load(scale_ptr + row).to(tl.float32) / temperature
    acc = tl.zeros([BLOCK], tl.float32)
    acc_g = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, n_cols, BLOCK):
        lq, lp, msk, cols = _log_probs(s_row, t_row, sb_ptr, tb_ptr, c0, n_cols, m_s, m_t,
                                       lse_s, lse_t, temperature, HAS_SB, HAS_TB, BLOCK)
        q = tl.exp(lq)
        p = tl.exp(lp)
        if DIV == 0:
            # p == 0: 0, or +inf where lq is -inf and lp is not (an underflowed p > 0)
            acc += tl.where(p == 0.0, tl.where(lp - lq == float("inf"), float("inf"), 0.0),
                            p * (lp - lq))
            if NEED_GRAD:  # q sum(p) - p: sum(p) is 0 for a teacher row of no mass
                tl.store(s_row + cols, (q * mass_t - p) * gscale, mask=msk)
        elif DIV == 1:
            acc += tl.where(q == 0.0, tl.where(lq - lp == float("inf"), float("inf"), 0.0),
                            q * (lq - lp))
        else:
            lm = _log_m(lp, lq, log_beta, log_1mb)
            acc += beta * tl.where(p == 0.0, 0.0, p * (lp - lm))
            gq = tl.where(q == 0.0, 0.0, q * (lq - lm))
            acc += (1.0 - beta) * gq
            acc_g += (1.0 - beta) * gq
    loss = tl.sum(acc, axis=0)
    tl.store(loss_ptr + row, loss)
    row_const = loss
    if DIV == 0:  # the factor of q in the slab pass's q sum(p) - p
        row_const = mass_t
    elif DIV == 2:
        row_const = tl.sum(acc_g, axis=0)
    if STATS:  # for the weight gradient by vocabulary slabs (slab_grad)
        tl.store(stats_ptr + row * 5, lse_s)
        tl.store(stats_ptr + row * 5 + 1, lse_t)
        tl.store(stats_ptr + row * 5 + 2, row_const)
        tl.store(stats_ptr + row * 5 + 3, m_s)
        tl.store(stats_ptr + row * 5 + 4, m_t)
    if NEED_GRAD and DIV != 0:
        for c0 in range(0, n_cols, BLOCK):
            lq, lp, msk, cols = _log_probs(s_row, t_row, sb_ptr, tb_ptr, c0, n_cols, m_s, m_t,
                                           lse_s, lse_t, temperature, HAS_SB, HAS_TB, BLOCK)
            q = tl.exp(lq)
            if DIV == 1:
                g = tl.where(q == 0.0, 0.0, q * (lq - lp - row_const))
            else:
                lm = _log_m(lp, lq, log_beta, log_1mb)
                g = tl.where(q == 0.0, 0.0, (1.0 - beta) * q * (lq - lm)) - q * row_const
            tl.store(s_row + cols, g * gscale, mask=msk)


def chunk(s: torch.Tensor, t: torch.Tensor, s_bias: torch.Tensor | None,
          t_bias: torch.Tensor | None, scale: torch.Tensor | None, plan: Plan,
          need_grad: bool, stats: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row losses of one chunk; with ``need_grad``, ``s`` becomes the scaled gradient.

    ``s``: the student's float32 logits ``(rows, V)`` without bias, contiguous rows (it is
    overwritten). ``t``: the teacher's logits ``(rows, V)`` with unit column stride, any
    float dtype. ``scale``: per-row weights of the loss (``need_grad`` only). ``stats``: a
    contiguous ``(rows, 5)`` float32 tensor that receives each row's log-sum-exps, gradient
    row constant and both shifts (for :func:`slab_grad`), or ``None``.
    """
    rows, v = s.shape
    if t.stride(-1) != 1:
        t = t.contiguous()
    if s.stride(-1) != 1:
        raise ValueError("the student's chunk must have contiguous rows")
    loss = torch.empty(rows, dtype=torch.float32, device=s.device)
    if rows == 0:
        return loss
    if scale is not None:  # read as contiguous (a stride-0 view would repeat its first)
        scale = scale.contiguous()
    for bias in (s_bias, t_bias):
        if bias is not None and bias.stride(-1) != 1:
            raise ValueError("the biases must be contiguous")
    beta = plan.beta if plan.divergence == "js" else 0.5
    dummy = s  # an unused pointer argument still needs a tensor
    out_stats = stats
    if stats is not None and (stats.dtype != torch.float32 or not stats.is_contiguous()):
        out_stats = torch.empty((rows, 5), dtype=torch.float32, device=s.device)
    block = max(16, min(4096, triton.next_power_of_2(v)))
    _fl_chunk[(rows,)](
        s, t, s_bias if s_bias is not None else dummy, t_bias if t_bias is not None else dummy,
        loss, scale if scale is not None else dummy,
        out_stats if out_stats is not None else dummy, v, s.stride(0), t.stride(0),
        float(plan.temperature), float(beta), math.log(beta), math.log1p(-beta),
        DIV=_DIV_CODES[plan.divergence], HAS_SB=s_bias is not None, HAS_TB=t_bias is not None,
        NEED_GRAD=bool(need_grad and scale is not None), STATS=stats is not None, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    if stats is not None and out_stats is not None and out_stats is not stats:
        stats.copy_(out_stats)
    return loss


@triton.jit
def _fl_slab_grad(s_ptr, t_ptr, sb_ptr, tb_ptr, stats_ptr, scale_ptr, g_ptr, n_cols, s_stride,
                  t_stride, g_stride, temperature, beta, log_beta, log_1mb,
                  DIV: tl.constexpr, HAS_SB: tl.constexpr, HAS_TB: tl.constexpr,
                  BLOCK: tl.constexpr):
    # one row of a tile by one block of its vocabulary slab: d loss / d logits from the
    # row's statistics, times the row's weight, in the output's dtype
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK
    lse_s = tl.load(stats_ptr + row * 5)
    lse_t = tl.load(stats_ptr + row * 5 + 1)
    row_const = tl.load(stats_ptr + row * 5 + 2)
    m_s = tl.load(stats_ptr + row * 5 + 3)
    m_t = tl.load(stats_ptr + row * 5 + 4)
    gscale = tl.load(scale_ptr + row).to(tl.float32) / temperature
    lq, lp, msk, cols = _log_probs(s_ptr + row * s_stride, t_ptr + row * t_stride, sb_ptr,
                                   tb_ptr, c0, n_cols, m_s, m_t, lse_s, lse_t, temperature,
                                   HAS_SB, HAS_TB, BLOCK)
    q = tl.exp(lq)
    if DIV == 0:
        g = q * row_const - tl.exp(lp)
    elif DIV == 1:
        g = tl.where(q == 0.0, 0.0, q * (lq - lp - row_const))
    else:
        lm = _log_m(lp, lq, log_beta, log_1mb)
        g = tl.where(q == 0.0, 0.0, (1.0 - beta) * q * (lq - lm)) - q * row_const
    g = g * gscale
    tl.store(g_ptr + row * g_stride + cols, g.to(g_ptr.dtype.element_ty), mask=msk)


def slab_grad(s: torch.Tensor, t: torch.Tensor, s_bias: torch.Tensor | None,
              t_bias: torch.Tensor | None, stats: torch.Tensor, scale: torch.Tensor,
              plan: Plan, out: torch.Tensor) -> None:
    """``out[:] = d loss / d logits`` times ``scale / temperature`` per row, on a tile of
    rows by a vocabulary slab, from the rows' statistics (:func:`chunk`'s ``stats``).

    ``s``: the slab's student logits without bias (float32, unit column stride); ``t``: the
    teacher's (any float dtype, unit column stride); ``s_bias``/``t_bias``: the slab's
    biases; ``out``: ``(rows, slab)`` with unit column stride, any float dtype.
    """
    rows, v = s.shape
    if rows == 0 or v == 0:
        return
    if t.stride(-1) != 1:
        t = t.contiguous()
    if s.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the slab's logits and gradient must have unit column stride")
    stats = stats.to(torch.float32).contiguous()
    scale = scale.contiguous()
    for bias in (s_bias, t_bias):
        if bias is not None and bias.stride(-1) != 1:
            raise ValueError("the biases must be contiguous")
    beta = plan.beta if plan.divergence == "js" else 0.5
    dummy = s
    block = max(16, min(1024, triton.next_power_of_2(v)))
    _fl_slab_grad[(rows, triton.cdiv(v, block))](
        s, t, s_bias if s_bias is not None else dummy, t_bias if t_bias is not None else dummy,
        stats, scale, out, v, s.stride(0), t.stride(0), out.stride(0),
        float(plan.temperature), float(beta), math.log(beta), math.log1p(-beta),
        DIV=_DIV_CODES[plan.divergence], HAS_SB=s_bias is not None, HAS_TB=t_bias is not None,
        BLOCK=block, num_warps=4,
    )
