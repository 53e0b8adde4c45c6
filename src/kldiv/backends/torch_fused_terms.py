"""In-place torch math of one chunk of :func:`kldiv.fused_linear_divergence` (CPU route).

Two passes use it (:mod:`kldiv.backends.torch_fused_chunks`,
:mod:`kldiv.backends.torch_fused_slabs`):

- :func:`chunk_terms_`: a chunk of whole rows (``rows x V``): the per-row divergence and its
  gradient with respect to the student's logits, and (for the weight gradient by vocabulary
  slabs) each row's statistics: both log-sum-exps and the gradient's row constant;
- :func:`slab_grad_`: a tile of some rows by a slab of the vocabulary: the same gradient,
  entry by entry, from those statistics.

The Triton kernels of :mod:`kldiv.backends.triton_fused` compute the same on CUDA. Same
definitions as :func:`kldiv._fused_linear_math.chunk_terms`: ``s`` and ``t`` are the
(temperature-divided) student and teacher logits, ``0 log 0 = 0``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SPARE_BUFFERS", "STATS", "Workspace", "chunk_terms_", "slab_grad_"]

SPARE_BUFFERS = {"kl": 2, "reverse_kl": 2, "js": 4}
"""``(rows, V)`` buffers :func:`chunk_terms_` needs beside the two logits."""

STATS = 5
"""Statistics per row for the slab pass: the student's and the teacher's log-sum-exp, the
gradient's row constant (for KL the factor of ``q``: 1, or 0 where the teacher's row has no
mass, all ``-inf``; the row's loss for the reverse KL; ``sum g`` for JS), and
the student's and the teacher's shift before the division by a temperature below 1 (0 for
other temperatures): the log-sum-exps are those of ``(x - shift) / T``."""


class Workspace:
    """The chunk's ``(rows, V)`` buffers, allocated once per call and reused by every chunk:
    fresh multi-MiB allocations per chunk cost page faults (glibc returns such blocks to the
    system), and the count of live buffers stays fixed."""

    def __init__(self, rows: int, v: int, n_float: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.floats = [torch.empty((rows, v), dtype=dtype, device=device)
                       for _ in range(n_float)]
        self.mask = torch.empty((rows, v), dtype=torch.bool, device=device)

    def take(self, rows: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [b[:rows] for b in self.floats], self.mask[:rows]


def chunk_terms_(s: torch.Tensor, t: torch.Tensor, divergence: str, beta: float,
                 need_grad: bool, spare: list[torch.Tensor] | None = None,
                 mask: torch.Tensor | None = None, stats: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss and ``d loss / d s`` of one chunk; every buffer is overwritten.

    ``s`` and ``t`` are private buffers of the caller; ``spare`` holds
    ``SPARE_BUFFERS[divergence]`` more of their shape (allocated when ``None``), ``mask`` a
    boolean one. The gradient is returned in one of these buffers. ``stats`` (``rows x
    STATS``), if given, receives each row's statistics for :func:`slab_grad_`.
    """
    if spare is None:
        spare = [torch.empty_like(s) for _ in range(SPARE_BUFFERS[divergence])]
    if mask is None:
        mask = torch.empty(s.shape, dtype=torch.bool, device=s.device)
    if stats is not None:
        stats[:, 0] = torch.logsumexp(s, -1)
        stats[:, 1] = torch.logsumexp(t, -1)
        # a row of no mass (all -inf): log-sum-exp 0, so that the slab pass's log-probabilities
        # are -inf there too, not NaN
        stats[:, :2].masked_fill_(torch.isneginf(stats[:, :2]), 0.0)
    lq, lp = spare[0], spare[1]
    _log_softmax(s, lq)
    empty_t = _log_softmax(t, lp)
    q = torch.exp(lq, out=s)
    grad = None
    row_const: torch.Tensor | float = 0.0
    if divergence == "kl":
        p = torch.exp(lp, out=t)
        d = torch.sub(lp, lq, out=lq)
        infinite = _infinite_rows(d, mask)
        d.mul_(p)  # p (log p - log q), with 0 log 0 = 0:
        d.masked_fill_(torch.eq(p, 0, out=mask), 0.0)
        loss = _inf_where(d.sum(-1), infinite)
        if need_grad:  # q sum(p) - p: sum(p) is 0 for a teacher row of no mass
            grad = q.sub_(p)
            if empty_t is not None:
                grad[empty_t] = 0.0
        # the slab pass's factor of q: 1, or 0 for a teacher row of no mass
        row_const = 1.0 if empty_t is None else (~empty_t).to(s.dtype)
    elif divergence == "reverse_kl":
        d = lq.sub_(lp)  # log q - log p
        infinite = _infinite_rows(d, mask)
        torch.eq(q, 0, out=mask)
        terms = torch.mul(q, d, out=lp).masked_fill_(mask, 0.0)
        loss = _inf_where(terms.sum(-1), infinite)
        row_const = loss
        if need_grad:
            grad = d.sub_(loss.unsqueeze(-1)).mul_(q).masked_fill_(mask, 0.0)
    else:
        p = torch.exp(lp, out=t)
        lm, a = spare[2], spare[3]
        torch.add(lp, math.log(beta), out=lm)
        torch.add(lq, math.log1p(-beta), out=a)
        torch.logaddexp(lm, a, out=lm)  # log m
        torch.sub(lq, lm, out=a)  # log q - log m
        lp.sub_(lm).mul_(p).masked_fill_(torch.eq(p, 0, out=mask), 0.0)
        loss = lp.sum(-1).mul_(beta)
        a.mul_(q).masked_fill_(torch.eq(q, 0, out=mask), 0.0)  # q (log q - log m)
        loss.add_(a.sum(-1), alpha=1 - beta)
        if need_grad or stats is not None:
            g = a.mul_(1 - beta)
            row_const = g.sum(-1)
            if need_grad:
                grad = g.sub_(q.mul_(row_const.unsqueeze(-1)))
    if stats is not None:
        stats[:, 2] = row_const
    return loss, grad


def _infinite_rows(d: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows with a log-ratio ``d`` of ``+inf``: a finite log-probability against one of
    ``-inf`` (a probability of exactly 0). Their KL is ``+inf`` also where the first
    probability underflows to 0 in the dtype, and ``0 * inf`` must not count as 0 there
    (:func:`kldiv._divergence.kl_terms`). ``mask`` is scratch."""
    return torch.eq(d, math.inf, out=mask).any(-1)


def _inf_where(loss: torch.Tensor, infinite: torch.Tensor) -> torch.Tensor:
    """``loss`` with ``+inf`` in the ``infinite`` rows (a NaN row stays NaN)."""
    return loss.masked_fill_(infinite & ~torch.isnan(loss), math.inf)


def _log_softmax(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """``out[:] = log_softmax(x)`` (one fused kernel: max, sum of exp, shift); a row of all
    ``-inf`` (no mass) gets ``-inf``, not NaN, as
    :func:`kldiv._fused_linear_math.log_softmax_parts` gives (a row with a NaN stays NaN).
    Returns the mask of such rows, ``None`` where there is none."""
    torch.log_softmax(x, -1, out=out)
    candidates = torch.isnan(out[:, 0])
    if not bool(candidates.any()):
        return None
    empty = candidates & torch.isneginf(x.amax(-1))
    out[empty] = -math.inf
    return empty


def slab_grad_(s: torch.Tensor, t: torch.Tensor, stats: torch.Tensor, divergence: str,
               beta: float) -> torch.Tensor:
    """``d loss / d s`` on a tile of rows by a vocabulary slab, from the rows' statistics
    (:func:`chunk_terms_`); ``s`` and ``t`` are private buffers, overwritten. Entry by entry
    the same as :func:`chunk_terms_`'s gradient."""
    lq = s.sub_(stats[:, 0:1])
    lp = t.sub_(stats[:, 1:2])
    q = torch.exp(lq)
    row_const = stats[:, 2:3]
    if divergence == "kl":  # row_const: 1, or 0 for a teacher row of no mass
        return q.mul_(row_const).sub_(lp.exp_())
    if divergence == "reverse_kl":
        g = lq.sub_(lp).sub_(row_const).mul_(q)
    else:
        lm = torch.logaddexp(lp.add_(math.log(beta)), torch.add(lq, math.log1p(-beta)))
        g = lq.sub_(lm).mul_(q).mul_(1 - beta)
    g.masked_fill_(q == 0, 0.0)
    if divergence == "js":
        g.sub_(q.mul_(row_const))
    return g
