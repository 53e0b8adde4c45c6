"""The weight gradient by vocabulary slabs, the second pass of the PyTorch fused linear
divergence (:mod:`kldiv.backends.torch_fused`).

For half-precision weights kept half in the products (CUDA), the chunk pass's float32 ``dW``
accumulator (:func:`kldiv.backends.torch_fused_chunks.chunk_pass`) would be a second weight
gradient, twice the size of the result. Here the chunk pass computes the losses, ``dh`` and
``db`` only, keeping five statistics per token (both log-sum-exps, the gradient's row
constant and, for a temperature below 1, both rows' shifts); this pass then walks the
vocabulary :data:`SLAB_COLUMNS` entries at a time, forms the slab's logits for all tokens
again, its gradient from the kept statistics, and writes ``dW[slab] = G[:, slab].T @ h``
with one product over all tokens into a slab-sized buffer (float32 accumulation, rounded
once to the weight's dtype). No ``V x H`` buffer exists but the result.

:func:`chunks` is the fused route's entry: the chunk pass, then this pass where
:data:`WEIGHT_GRAD` says so.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .._fused_linear_math import CPU_CHUNK_BYTES, GPU_CHUNK_BYTES, Plan, available_memory
from .torch_ import optional_module
from .torch_fused_chunks import Setup, addmm_, chunk_pass, mm_into
from .torch_fused_terms import slab_grad_

__all__ = ["SLAB_COLUMNS", "SLAB_TILE_BYTES", "WEIGHT_GRAD", "chunks", "weight_grad_mode"]

WEIGHT_GRAD = os.environ.get("KLDIV_FUSED_WEIGHT_GRAD", "auto")
"""How the weight gradient is formed: ``"chunks"`` accumulates ``G_c.T @ h_c`` over the token
chunks in the compute dtype (float32): cheapest where the weight is float32 itself; for a
half-precision weight that accumulator is a second, twice as large ``V x H`` gradient.
``"slabs"`` writes the gradient slab by slab of the vocabulary, each slab one product over
all tokens (float32 accumulation inside the GEMM, rounded once to the weight's dtype): no
accumulator, at the cost of forming the slab's logits again (:func:`_weight_grad_slabs`).
``"lowp"`` accumulates over the token chunks like ``"chunks"``, but in the weight's own
dtype where the products take a half-precision weight (CUDA): Liger-Kernel's accumulation,
the fastest and a half-size accumulator, at the cost of one rounding to that dtype per
chunk instead of one in all (elsewhere it is ``"chunks"``). ``"auto"`` (the default): where
the products take half-precision weights (CUDA), lowp when the call makes at most
:data:`~kldiv.backends.torch_fused_chunks.LOWP_MAX_CHUNKS` token chunks (Liger's shape:
8), else slabs; chunks elsewhere. Set from the ``KLDIV_FUSED_WEIGHT_GRAD`` environment
variable when this module is imported (set it before the first call); this attribute is read
at every call, and an unknown value is a ``ValueError`` at the first call that forms a
weight gradient."""

SLAB_COLUMNS = 4096
"""Vocabulary entries per slab of the slab pass."""

SLAB_TILE_BYTES: int | None = None
"""Budget of one tile of the slab pass (both logits and the gradient, ``rows x
SLAB_COLUMNS``); ``None``: the chunk caps of :mod:`kldiv._fused_linear_math` (256 MiB on
CPU, 1 GiB on a GPU: all 8192 tokens of a 4096-entry slab in one tile)."""


def weight_grad_mode() -> str:
    """:data:`WEIGHT_GRAD`, checked."""
    mode = WEIGHT_GRAD
    if mode not in ("auto", "chunks", "slabs", "lowp"):
        raise ValueError(f"KLDIV_FUSED_WEIGHT_GRAD must be 'auto', 'chunks', 'slabs' or "
                         f"'lowp', got {mode!r}.")
    return mode


def chunks(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
           teacher: tuple[Any, ...], plan: Plan, scale: torch.Tensor | None,
           need: tuple[bool, bool, bool]) -> tuple[Any, ...]:
    """``(loss, dh, dW, db)``: per-token losses and, where ``need``, the gradients of
    ``sum(loss * scale)`` (``scale`` per token) in the compute dtype (``dW`` in the weight
    operand's dtype when formed by slabs or by lowp, :data:`WEIGHT_GRAD`)."""
    wanted = scale is not None and need[1]
    loss, dh, dW, db, pending = chunk_pass(h2, W, b, teacher, plan, scale, need,
                                           weight_grad=weight_grad_mode() if wanted
                                           else "chunks")
    if pending is not None:
        setup, stats = pending
        assert scale is not None
        dW = _weight_grad_slabs(setup, h2, scale.contiguous(), stats)
    return loss, dh, dW, db


def _slab_tile(setup: Setup, h2: torch.Tensor, hc: torch.Tensor, th: torch.Tensor | None,
               i0: int, i1: int, v0: int, v1: int, sc: torch.Tensor, stats: torch.Tensor,
               out: torch.Tensor) -> None:
    """``out[:] = d loss / d logits`` of rows ``i0:i1`` and entries ``v0:v1``, times
    ``sc / temperature`` per row, from the rows' statistics."""
    s, t = setup.logits(h2, hc, i0, i1, v0, v1, th)
    b = None if setup.b is None else setup.b[v0:v1]
    t_b = None if setup.t_b is None else setup.t_b[v0:v1]
    if setup.route == "triton":
        tri = optional_module("triton_fused")
        assert tri is not None
        tri.slab_grad(s, t, b, t_b, stats, sc, setup.plan, out)
        return
    if setup.teacher[0] == "logits":
        t = t.to(setup.cd, copy=True)
    setup.shift(s, t, b, t_b, (stats[:, 3:4], stats[:, 4:5]))
    g = slab_grad_(s, t, stats, setup.plan.divergence, setup.plan.beta)
    out.copy_(g.mul_(sc.div(setup.plan.temperature).unsqueeze(-1)))


def _weight_grad_slabs(setup: Setup, h2: torch.Tensor, scale: torch.Tensor,
                       stats: torch.Tensor) -> torch.Tensor:
    """The weight gradient ``sum_tokens G.T @ h`` by vocabulary slabs, in the weight
    operand's dtype: each slab's rows of ``G`` are formed again from the statistics of the
    first pass (both logits products once more) and multiplied by the hidden states, one
    product over all tokens where a tile of all of them fits the budget (else accumulated
    over token tiles), into a slab-sized ``cd`` buffer (float32 output: rounded once to a
    half weight's dtype, whatever split the GEMM takes). No ``V x H`` buffer but the
    result."""
    W_, cd = setup.W, setup.cd
    assert W_ is not None
    v, hid = W_.shape
    n = h2.shape[0]
    dev = h2.device
    dW = torch.empty((v, hid), dtype=W_.dtype, device=dev)
    if n == 0:
        return dW.zero_()
    cols = max(1, min(v, SLAB_COLUMNS))
    budget = SLAB_TILE_BYTES or (GPU_CHUNK_BYTES if dev.type != "cpu" else CPU_CHUNK_BYTES)
    free = available_memory(dev)
    per_entry = 2 * cd.itemsize + W_.dtype.itemsize  # both logits tiles and the gradient tile
    if free is not None:  # the chunk pass adapted to free memory: so does this one
        budget = min(budget, max(cols * per_entry, free // 4))
    rows = max(1, min(n, budget // (cols * per_entry)))
    g_buf = torch.empty((rows, cols), dtype=W_.dtype, device=dev)
    # the result's own dtype with one tile: written directly, else through a cd slab
    acc = None if rows >= n and W_.dtype == cd else \
        torch.empty((cols, hid), dtype=cd, device=dev)
    teacher = setup.teacher
    hidden_teacher = teacher[0] == "hidden"
    whole: tuple[Any, ...] | None = None  # one tile: its operands converted once
    if rows >= n:
        whole = (setup.operand_rows(h2, 0, n),
                 setup.operand_rows(teacher[1], 0, n, setup.t_w) if hidden_teacher else None)
    for v0 in range(0, v, cols):
        v1 = min(v, v0 + cols)
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            hc, th = whole if whole is not None else (
                setup.operand_rows(h2, i0, i1),
                setup.operand_rows(teacher[1], i0, i1, setup.t_w) if hidden_teacher else None)
            g = g_buf[: i1 - i0, : v1 - v0]
            _slab_tile(setup, h2, hc, th, i0, i1, v0, v1, scale[i0:i1], stats[i0:i1], g)
            if acc is None:  # one product over all tokens, in the result's dtype
                mm_into(dW[v0:v1], g.T, hc)
            elif i0 == 0:
                mm_into(acc[: v1 - v0], g.T, hc)
            else:
                addmm_(acc[: v1 - v0], g.T, hc)
        if acc is not None:
            dW[v0:v1].copy_(acc[: v1 - v0])
    return dW
