"""Triton kernels for the divergence family's PyTorch CUDA fast path (:mod:`.torch_family`).

One program per row, looping over the class axis in blocks, for ``kl`` (``reverse_kl`` is
``kl`` with the sides swapped) and the generalized ``js``. Each side is either
log-probabilities or logits (``log_softmax(x / T)``); the kernels read both inputs through
their strides (a broadcast row has stride 0), so no input is copied.

Forward, per row: for each logits side an online log-sum-exp of ``(x - max(x)) / T`` over the
blocks (a running maximum of the raw logits and a running sum rescaled as the maximum grows,
per lane, combined at the end; the shift comes before the division, so a tiny temperature
gives the one-hot limit instead of overflowing ``x / T``), then one pass summing the member's
terms. It saves per row, in the compute dtype, each side's (maximum, log-normaliser) and two
sums: ``(KL, mass of P)`` for ``kl`` and ``(KL(P||M),
KL(Q||M))`` for ``js``.

Backward, one program per (row, block of classes), with ``lp``/``lq`` the log-probabilities,
``p``/``q`` the probabilities, ``g`` the incoming per-row gradient and ``T`` the temperature.
A log-probabilities side's gradient is its log-space gradient ``G``; a logits side's is
``(G - softmax * sum(G)) / T`` (the log-softmax's vector-Jacobian product), where ``sum(G)``
is known from the forward pass:

- ``kl = sum p (lp - lq)``: ``G_q = -p`` (``sum = -mass``) and ``G_p = p (lp - lq + 1)``
  (``sum = KL + mass``), so from logits ``d/ds_q = (q mass - p) / T * g`` and
  ``d/ds_p = p ((lp - lq) + 1 - KL - mass) / T * g``, i.e. ``(q - p) / T`` and
  ``p ((lp - lq) - KL) / T`` for a normalised P.
- ``js`` with ``lm = log(beta p + (1 - beta) q)``: ``G_p = beta p (lp - lm)`` (the ``+1``
  of ``d/dlp [p (lp - lm)]`` cancels against ``d lm / d lp = beta p / m`` summed over the
  M terms), ``sum = beta KL(P||M)``; likewise ``G_q = (1 - beta) q (lq - lm)``. From logits:
  ``beta p ((lp - lm) - KL(P||M)) / T * g`` and ``(1 - beta) q ((lq - lm) - KL(Q||M)) / T * g``.

Entries with probability 0 (``-inf``; ``0 log 0 = 0``) contribute 0 to the value and to every
gradient. A row of all ``-inf`` logits is the zero measure, as in the generic
:func:`kldiv._spaces.log_softmax` (its log-normaliser is taken as 0): its mass is 0 and its
gradients are finite. Inputs of float16/bfloat16 are computed in float32, float64 in float64;
values and gradients are returned in the input dtype. The kernels run on CPU tensors under
``TRITON_INTERPRET=1`` (Triton's NumPy interpreter), which is how they are tested without a
GPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from .triton_fused import _log_m  # logaddexp(log beta + a, log(1 - beta) + b), -inf-safe

__all__ = ["OPS", "backward", "forward"]

OPS = {"kl": 0, "reverse_kl": 0, "js": 1}
"""The ops, by kernel code (``reverse_kl`` runs ``kl`` on the swapped sides)."""
_KINDS = ("log_probs", "logits")
_N_STATS = 6  # per row: shift_a, lse_a, shift_b, lse_b, r1, r2


@triton.jit
def _lse(row_ptr, s_c, n_cols, T, CT: tl.constexpr, BLOCK: tl.constexpr):
    """``(shift, lse)`` of one row, online over blocks: its maximum (0 for a row of all -inf)
    and ``log(sum(exp((x - shift) / T)))`` (0 for a row of all -inf). The shift comes before
    the division, as in :func:`kldiv._spaces.log_softmax`: a tiny temperature cannot overflow
    ``x / T`` (which gave ``inf - inf``, NaN, where the limit is the one-hot row)."""
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), CT)
    d = tl.zeros([BLOCK], CT)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offs
        x = tl.load(row_ptr + cols.to(tl.int64) * s_c, mask=cols < n_cols,
                    other=float("-inf")).to(CT)
        new_m = tl.maximum(m, x)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: adds 0
        d = d * tl.exp((m - shift) / T) + tl.exp((x - shift) / T)
        m = new_m
    big = tl.max(m, axis=0)
    big = tl.where(big == float("-inf"), 0.0, big)
    s = tl.sum(d * tl.exp((m - big) / T), axis=0)
    return big, tl.log(tl.where(s == 0.0, 1.0, s))


@triton.jit
def _side(row_ptr, s_c, cols, msk, shift, lse, T, LOGITS: tl.constexpr, CT: tl.constexpr):
    """One block of a row in log space (masked lanes: -inf, i.e. probability 0)."""
    x = tl.load(row_ptr + cols.to(tl.int64) * s_c, mask=msk, other=float("-inf")).to(CT)
    if LOGITS:
        x = (x - shift) / T - lse
    return x


@triton.jit
def _fwd(a_ptr, b_ptr, prm_ptr, out_ptr, st_ptr, n_cols, sa_r, sa_c, sb_r, sb_c,
         OP: tl.constexpr, LOGITS_A: tl.constexpr, LOGITS_B: tl.constexpr,
         CT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * sa_r
    b_row = b_ptr + row * sb_r
    T = tl.load(prm_ptr)
    beta = tl.load(prm_ptr + 1)
    if LOGITS_A:
        m_a, lse_a = _lse(a_row, sa_c, n_cols, T, CT, BLOCK)
    else:
        m_a = tl.load(prm_ptr + 4)  # 0 (unused)
        lse_a = m_a
    if LOGITS_B:
        m_b, lse_b = _lse(b_row, sb_c, n_cols, T, CT, BLOCK)
    else:
        m_b = tl.load(prm_ptr + 4)
        lse_b = m_b
    offs = tl.arange(0, BLOCK)
    acc1 = tl.zeros([BLOCK], CT)
    acc2 = tl.zeros([BLOCK], CT)
    for c0 in range(0, n_cols, BLOCK):
        cols = c0 + offs
        msk = cols < n_cols
        la = _side(a_row, sa_c, cols, msk, m_a, lse_a, T, LOGITS_A, CT)
        lb = _side(b_row, sb_c, cols, msk, m_b, lse_b, T, LOGITS_B, CT)
        pa = tl.exp(la)
        if OP == 0:
            d = la - lb
            # pa == 0: a -inf entry (0) or an underflow (0; +inf against lb = -inf, NaN
            # against a NaN: the probability is not 0 there)
            acc1 += tl.where(pa == 0.0, tl.where((d < float("inf")) | (la == -float("inf")),
                                                 0.0, d), pa * d)
            acc2 += pa
        else:
            lm = _log_m(la, lb, tl.load(prm_ptr + 2), tl.load(prm_ptr + 3))
            pb = tl.exp(lb)
            acc1 += tl.where(pa == 0.0, 0.0, pa * (la - lm))
            acc2 += tl.where(pb == 0.0, 0.0, pb * (lb - lm))
    r1 = tl.sum(acc1, axis=0)
    r2 = tl.sum(acc2, axis=0)
    if OP == 0:  # noqa: SIM108 (constexpr branches)
        value = r1
    else:
        value = beta * r1 + (1.0 - beta) * r2
    tl.store(out_ptr + row, value)
    st = st_ptr + row * 6
    tl.store(st, m_a)
    tl.store(st + 1, lse_a)
    tl.store(st + 2, m_b)
    tl.store(st + 3, lse_b)
    tl.store(st + 4, r1)
    tl.store(st + 5, r2)


@triton.jit
def _bwd(a_ptr, b_ptr, prm_ptr, st_ptr, g_ptr, ga_ptr, gb_ptr, n_cols, sa_r, sa_c, sb_r, sb_c,
         s_g, OP: tl.constexpr, LOGITS_A: tl.constexpr, LOGITS_B: tl.constexpr,
         NEED_A: tl.constexpr, NEED_B: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = cols < n_cols
    T = tl.load(prm_ptr)
    beta = tl.load(prm_ptr + 1)
    st = st_ptr + row * 6
    r1 = tl.load(st + 4)
    r2 = tl.load(st + 5)
    g = tl.load(g_ptr + row * s_g).to(CT)
    la = _side(a_ptr + row * sa_r, sa_c, cols, msk, tl.load(st), tl.load(st + 1), T, LOGITS_A,
               CT)
    lb = _side(b_ptr + row * sb_r, sb_c, cols, msk, tl.load(st + 2), tl.load(st + 3), T,
               LOGITS_B, CT)
    pa = tl.exp(la)
    out = row * n_cols + cols
    if OP == 0:
        if NEED_A:
            # G = p (lp - lq + 1); logits: G - p sum(G) = p (lp - lq + 1 - KL - mass)
            if LOGITS_A:
                ta = tl.where(pa == 0.0, 0.0, pa * (la - lb + (1.0 - r1 - r2))) * (g / T)
            else:
                ta = tl.where(pa == 0.0, 0.0, pa * (la - lb + 1.0)) * g
            tl.store(ga_ptr + out, ta, mask=msk)
        if NEED_B:
            # G = -p; logits: G - q sum(G) = q mass - p
            if LOGITS_B:  # noqa: SIM108 (constexpr branches)
                tb = (tl.exp(lb) * r2 - pa) * (g / T)
            else:
                tb = -pa * g
            tl.store(gb_ptr + out, tb, mask=msk)
    else:
        lm = _log_m(la, lb, tl.load(prm_ptr + 2), tl.load(prm_ptr + 3))
        if NEED_A:
            # G = beta p (lp - lm), sum(G) = beta KL(P||M)
            if LOGITS_A:
                ta = tl.where(pa == 0.0, 0.0, pa * (la - lm - r1)) * (beta * g / T)
            else:
                ta = tl.where(pa == 0.0, 0.0, pa * (la - lm)) * (beta * g)
            tl.store(ga_ptr + out, ta, mask=msk)
        if NEED_B:
            pb = tl.exp(lb)
            if LOGITS_B:
                tb = tl.where(pb == 0.0, 0.0, pb * (lb - lm - r2)) * ((1.0 - beta) * g / T)
            else:
                tb = tl.where(pb == 0.0, 0.0, pb * (lb - lm)) * ((1.0 - beta) * g)
            tl.store(gb_ptr + out, tb, mask=msk)


def _compute_dtype(dtype: torch.dtype) -> tuple[torch.dtype, Any]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _block(n_cols: int, cap: int, block: int | None) -> int:
    return block or max(16, min(cap, triton.next_power_of_2(n_cols)))


def _check(op: str, a: torch.Tensor, b: torch.Tensor, kinds: tuple[str, str]) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    if any(k not in _KINDS for k in kinds):
        raise ValueError(f"kinds must be {_KINDS[0]!r} or {_KINDS[1]!r}, got {kinds!r}")
    if a.ndim != 2 or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError("a and b must be (rows, classes) tensors of one shape, dtype, device")


def _params(dtype: torch.dtype, device: torch.device, temperature: float,
            beta: float) -> torch.Tensor:
    # in the compute dtype, so that float64 keeps the temperature and beta exactly (a Python
    # float argument of a Triton kernel is float32)
    lb, l1 = (math.log(beta), math.log1p(-beta)) if 0.0 < beta < 1.0 else (0.0, 0.0)
    return torch.tensor([temperature, beta, lb, l1, 0.0], dtype=dtype, device=device)


def forward(op: str, a: torch.Tensor, b: torch.Tensor, kinds: tuple[str, str],
            temperature: float = 1.0, beta: float = 0.5, *,
            block: int | None = None) -> tuple[torch.Tensor, Any]:
    """Per-row divergence of two ``(rows, classes)`` tensors (any strides) and the rows'
    state for :func:`backward`.

    ``op``: ``"kl"`` (``KL(A || B)``), ``"reverse_kl"`` (``KL(B || A)``) or ``"js"``
    (``beta KL(A || M) + (1 - beta) KL(B || M)``); ``kinds``: each side's space,
    ``"log_probs"`` or ``"logits"`` (``log_softmax(x / temperature)``). ``block``: the
    class-axis block (a power of two; default from the number of classes).
    """
    _check(op, a, b, kinds)
    swap = op == "reverse_kl"
    if swap:
        a, b, kinds = b, a, (kinds[1], kinds[0])
    rows, cols = a.shape
    ct, tct = _compute_dtype(a.dtype)
    prm = _params(ct, a.device, float(temperature), float(beta))
    out = torch.empty(rows, dtype=a.dtype, device=a.device)
    stats = torch.empty((rows, _N_STATS), dtype=ct, device=a.device)
    if rows and cols:
        bl = _block(cols, 4096, block)
        _fwd[(rows,)](a, b, prm, out, stats, cols, a.stride(0), a.stride(1), b.stride(0),
                      b.stride(1), OP=OPS[op], LOGITS_A=kinds[0] == "logits",
                      LOGITS_B=kinds[1] == "logits", CT=tct, BLOCK=bl,
                      num_warps=8 if bl >= 2048 else 4)
    elif rows:
        out.zero_()
        stats.zero_()
    return out, (op, kinds, prm, stats)


def backward(a: torch.Tensor, b: torch.Tensor, state: Any, grad: torch.Tensor, need_a: bool,
             need_b: bool, *, block: int | None = None) -> tuple[Any, Any]:
    """Contiguous ``(rows, classes)`` gradients w.r.t. ``a`` and ``b`` (``None`` where not
    needed) of ``sum(value * grad)``, from :func:`forward`'s ``state``."""
    op, kinds, prm, stats = state
    swap = op == "reverse_kl"
    if swap:
        a, b, need_a, need_b = b, a, need_b, need_a
    rows, cols = a.shape
    ga = torch.empty((rows, cols), dtype=a.dtype, device=a.device) if need_a else None
    gb = torch.empty((rows, cols), dtype=b.dtype, device=b.device) if need_b else None
    some = ga if ga is not None else gb
    if some is not None and rows and cols:
        grad = grad.reshape(rows)
        bl = _block(cols, 2048, block)
        _bwd[(rows, triton.cdiv(cols, bl))](
            a, b, prm, stats, grad, ga if ga is not None else some,
            gb if gb is not None else some, cols, a.stride(0), a.stride(1), b.stride(0),
            b.stride(1), grad.stride(0), OP=OPS[op], LOGITS_A=kinds[0] == "logits",
            LOGITS_B=kinds[1] == "logits", NEED_A=need_a, NEED_B=need_b,
            CT=_compute_dtype(a.dtype)[1], BLOCK=bl, num_warps=8 if bl >= 2048 else 4)
    return (gb, ga) if swap else (ga, gb)
