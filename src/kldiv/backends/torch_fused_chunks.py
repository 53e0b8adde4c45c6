"""The chunk loop of the PyTorch fused linear divergence (:mod:`kldiv.backends.torch_fused`).

The tokens are walked ``chunk_size`` rows at a time. For each chunk the student's logits
``h_c @ W.T (+ b)`` and the teacher's (a slice of its logits, or its own matrix product) are
formed in float32 (float64 for float64 inputs), the divergence and its gradient with respect
to the logits are computed in buffers allocated once per call (:class:`Workspace`,
:func:`chunk_terms_`, the in-place twin of :func:`kldiv._fused_linear_math.chunk_terms`, in
:mod:`kldiv.backends.torch_fused_terms`), and the gradient is pushed through the two matrix
products at once: ``dh_c = G @ W``, ``dW += G.T @ h_c``, ``db += G.sum(0)`` (:func:`chunks`;
:func:`linear_backward` for a batched incoming gradient or one with a forward-mode tangent).
No more than one chunk of ``(rows, V)`` buffers exists at any time.

For half-precision weights kept half in the products (CUDA), a float32 ``dW`` accumulator
would be a second gradient twice the size of the result: there the weight gradient is
accumulated in the weight's own dtype over at most :data:`LOWP_MAX_CHUNKS` chunks
(``weight_grad`` ``"lowp"``), else formed by vocabulary slabs
(:mod:`kldiv.backends.torch_fused_slabs`, which runs this chunk pass and then its own): the
chunk pass keeps five statistics per token (``"slabs"``), and the slab pass forms each slab's
logits and gradient again from them.

On CUDA the per-chunk softmax, divergence and gradient run in one Triton kernel
(:mod:`kldiv.backends.triton_fused`: online log-sum-exp over vocabulary blocks) beside
cuBLAS's matrix products; half-precision operands are multiplied in their own dtype with
float32 accumulation and float32 output. On CPU, half-precision inputs are converted to float32
once (the weight: one ``V x H`` float32 copy).
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import torch

from .._fused_linear_math import (
    Plan,
    auto_chunk_size,
    available_memory,
)
from .torch_ import optional_module
from .torch_fused_terms import SPARE_BUFFERS, STATS, Workspace, chunk_terms_

__all__ = ["FORCE_ROUTE", "LOWP_MAX_CHUNKS", "SPARE_BUFFERS", "Setup", "Workspace", "addmm_",
           "chunk_pass", "chunk_terms_", "compute_dtype", "linear_backward", "mm_into"]

FORCE_ROUTE: str | None = None
"""Tests only: ``"triton"`` runs the Triton kernel on any device (CPU under
``TRITON_INTERPRET=1``), ``"torch"`` the in-place torch ops on any device."""

_HALF = (torch.float16, torch.bfloat16)


def _triton_module() -> ModuleType | None:
    """:mod:`kldiv.backends.triton_fused`, or ``None`` when Triton cannot be imported."""
    return optional_module("triton_fused")


# ------------------------------------------------------------------------------ chunk loop
def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) \
        else torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``cd``; half operands (CUDA) are multiplied in their dtype with ``cd``
    accumulation and output (``torch.mm(..., out_dtype=)``; where torch has no such kernel,
    the operands are converted to ``cd`` for the product, never the output rounded)."""
    if a.dtype == cd and b.dtype == cd:
        return a @ b
    a, b = _same_half(a, b, cd)
    if _mixed_gemm(a):
        try:
            return torch.mm(a, b, out_dtype=cd)
        except _NO_MIXED_KERNEL as exc:
            _no_mixed_kernel(a, exc)
    return a.to(cd) @ b.to(cd)


_MIXED_GEMM: dict[str, bool] = {}
"""Per device type: whether ``torch.mm``/``torch.addmm`` take ``out_dtype`` (half operands,
float32 output); learnt on first use (CPU builds have no such kernel)."""

_NO_MIXED_KERNEL = (RuntimeError, TypeError, NotImplementedError)
"""What torch raises where ``out_dtype`` has no kernel (``NotImplementedError`` for a
backend without ``aten::mm.dtype``, ``TypeError`` for a torch without the argument,
``RuntimeError`` for a device or dtype it does not support)."""


def _no_mixed_kernel(a: torch.Tensor, exc: BaseException) -> None:
    """Remember that ``a``'s device has no mixed-precision GEMM (out of memory is no such
    sign: it is raised again)."""
    if isinstance(exc, torch.OutOfMemoryError):
        raise exc
    _MIXED_GEMM[a.device.type] = False


def _same_half(a: torch.Tensor, b: torch.Tensor, cd: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both operands in the half dtype of one of them (the mixed-precision GEMM's input)."""
    lo = a.dtype if a.dtype != cd else b.dtype
    return a.to(lo), b.to(lo)


def _mixed_gemm(a: torch.Tensor) -> bool:
    return a.dtype in _HALF and _MIXED_GEMM.get(a.device.type, True)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out[:] = a @ b`` in ``out``'s dtype, without a temporary where torch allows."""
    cd = out.dtype
    if a.dtype == cd and b.dtype == cd:
        torch.mm(a, b, out=out)
        return
    a, b = _same_half(a, b, cd)
    if _mixed_gemm(a):
        try:
            torch.mm(a, b, out_dtype=cd, out=out)
            return
        except _NO_MIXED_KERNEL as exc:
            _no_mixed_kernel(a, exc)
    out.copy_(a.to(cd) @ b.to(cd))


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` in ``acc``'s dtype, in place: half operands (CUDA) go to one
    mixed-precision ``addmm`` writing into ``acc``, so no ``acc``-sized product (the
    ``V x H`` weight gradient) is ever allocated beside it."""
    cd = acc.dtype
    if a.dtype == cd and b.dtype == cd:
        acc.addmm_(a, b)
        return
    a, b = _same_half(a, b, cd)
    if _mixed_gemm(a):
        try:
            torch.addmm(acc, a, b, out_dtype=cd, out=acc)
            return
        except _NO_MIXED_KERNEL as exc:
            _no_mixed_kernel(a, exc)
    acc.addmm_(a.to(cd), b.to(cd))


def _operand(x: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor | None:
    """``x`` as the matrix products take it: half stays half on CUDA (mixed-precision GEMM),
    everything else is converted to the compute dtype once."""
    if x is None or x.dtype == cd or (x.device.type == "cuda" and x.dtype in _HALF):
        return x
    return x.to(cd)


TRITON_CHUNK_BUFFERS = 3
"""``(rows, V)`` float32 buffers of one chunk on the Triton route: the two logits (the
student's becomes its gradient in place) and the gradient's half-precision copy for the
products, rounded up."""

TRITON_CHUNK_BYTES = 2 * 2**30
"""Cap on one chunk's buffers on the Triton route. Measured on an H200 (N=8192, H=4096,
V=128256, bfloat16, forward+backward): with 256-row chunks the weight gradient's in-place
accumulation (``K = rows``: a float32 ``V x H`` read and written per chunk) took half of the
whole call (51 of 101 ms); per chunk of 1024 rows it costs 2.2 ms against 1.6 ms for 256 rows
(``benchmarks/gpu_profile_fused.py``). This cap gives 1024 rows at that vocabulary."""


LOWP_MAX_CHUNKS = 16
"""``KLDIV_FUSED_WEIGHT_GRAD=auto`` with half-precision weights in the products (CUDA):
the weight gradient is accumulated in the weight's dtype (``"lowp"``, Liger-Kernel's way:
the fastest and least memory at Liger's shape) when the call makes at most this many token
chunks, else formed by vocabulary slabs (one rounding). Each chunk adds one rounding to
the weight's dtype: measured on CPU (bfloat16, JS, N=4096, H=128, V=8192), the relative
error of the gradient was 1.66e-3 for one rounding, 3.3e-3 over 8 chunks, 4.5e-3 over 16,
8.7e-3 over 64: it grows as the square root of the count, which this cap bounds. The count
follows the automatic chunk size, and so free memory: at Liger's shape (N=8192, V=128256)
1024-token chunks (8) need about 24 GiB free, 512 (16 chunks) about 12 GiB; with less, auto
takes slabs (least memory, about 1.6x the time)."""

SLAB_CHUNK_BYTES = 512 * 2**20
"""Cap on one chunk's buffers on the Triton route when the weight gradient is formed by
slabs: the first pass then has no per-chunk ``V x H`` accumulation to amortise."""


def _route(h: torch.Tensor) -> str:
    if FORCE_ROUTE is not None:
        return FORCE_ROUTE
    if h.device.type == "cuda" and h.dtype != torch.float64 and _triton_module() is not None:
        return "triton"
    return "torch"


class Setup:
    """What every chunk of one call shares: the compute dtype, the route, the operands in
    the form the products take them, and (torch-ops route) the reused buffers."""

    def __init__(self, h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                 teacher: tuple[Any, ...], plan: Plan, weight_grad: str | None = None
                 ) -> None:
        self.cd = cd = compute_dtype(h2, W)
        self.route = _route(h2) if cd != torch.float64 else "torch"
        self.W = _operand(W, cd)
        assert self.W is not None
        # how the weight gradient (``weight_grad`` given) is formed, resolved: "chunks",
        # "lowp" (accumulated in a half weight's dtype) or "slabs"; "auto" where the products
        # take a half-precision weight: lowp over at most LOWP_MAX_CHUNKS chunks, else slabs
        half = self.W.dtype != cd
        mode = weight_grad if weight_grad in ("slabs", "auto") or half else "chunks"
        triton_rows = self.route == "triton" and plan.auto_chunk

        def rows_for(slabs: bool) -> int:
            # this route's chunk holds fewer buffers than the generic count: choose again
            if not triton_rows:
                return plan.chunk_size
            return auto_chunk_size(h2.shape[0], W.shape[0], itemsize=4,
                                   buffers=TRITON_CHUNK_BUFFERS, on_gpu=True,
                                   available=available_memory(h2.device),
                                   cap=TRITON_CHUNK_BYTES if weight_grad and not slabs
                                   else SLAB_CHUNK_BYTES)

        rows = rows_for(mode == "slabs")
        if mode == "auto":
            few = -(-h2.shape[0] // rows) <= LOWP_MAX_CHUNKS
            mode = "lowp" if half and few else "slabs" if half else "chunks"
            if mode == "slabs":
                rows = rows_for(True)
        self.weight_grad: str | None = mode if weight_grad else None
        self.slabs = mode == "slabs"
        if triton_rows:
            plan = dataclasses.replace(plan, chunk_size=rows)
        self.plan, self.teacher = plan, teacher
        # the Triton kernels read biases (and per-token scales) as contiguous rows
        self.b = None if b is None else b.to(cd).contiguous()
        self.t_w = _operand(teacher[2], cd) if teacher[0] == "hidden" else None
        self.t_b = None if teacher[0] != "hidden" or teacher[3] is None else \
            teacher[3].to(cd).contiguous()
        self.ws = None
        if self.route == "torch" and self.W is not None and self.W.dtype == cd and (
                self.t_w is None or self.t_w.dtype == cd):
            self.ws = Workspace(min(plan.chunk_size, h2.shape[0]), W.shape[0],
                                2 + SPARE_BUFFERS[plan.divergence], cd, h2.device)

    def chunk(self, h2: torch.Tensor, i0: int, i1: int, sc: torch.Tensor | None,
              stats: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(hc, loss, g)`` of rows ``i0:i1``: ``hc`` the rows as the products take them,
        ``g`` (``sc`` given) ``d loss / d logits`` times ``sc / temperature`` per row, in a
        buffer that the next chunk overwrites. ``stats`` (``rows x STATS``), if given,
        receives the rows' statistics for the slab pass."""
        cd, teacher, temp = self.cd, self.teacher, self.plan.temperature
        W_ = self.W
        hc = self.operand_rows(h2, i0, i1)
        assert W_ is not None
        bufs: list[torch.Tensor] = []
        mask: torch.Tensor | None = None
        if self.ws is not None:  # the torch-ops route: products written into the workspace
            bufs, mask = self.ws.take(i1 - i0)
            s, t = bufs[0], bufs[1]
            torch.mm(hc, W_.T, out=s)
            if teacher[0] == "logits":
                t.copy_(teacher[1][i0:i1])
            else:
                torch.mm(self.operand_rows(teacher[1], i0, i1, self.t_w), self.t_w.T, out=t)  # type: ignore[union-attr, unused-ignore]
        else:
            s, t = self.logits(h2, hc, i0, i1, 0, W_.shape[0])
        need_grad = sc is not None
        if self.route == "triton":
            tri = _triton_module()
            assert tri is not None
            loss = tri.chunk(s, t, self.b, self.t_b, sc, self.plan, need_grad, stats)
            return hc, loss, s if need_grad else None
        if self.ws is None and teacher[0] == "logits":
            t = t.to(cd, copy=True)
        shifts = self.shift(s, t, self.b, self.t_b)
        if stats is not None:  # the slab pass shifts its tiles' rows by the same amounts
            stats[:, 3] = 0.0 if shifts is None else shifts[0].squeeze(-1)
            stats[:, 4] = 0.0 if shifts is None else shifts[1].squeeze(-1)
        loss, g = chunk_terms_(s, t, self.plan.divergence, self.plan.beta, need_grad,
                               bufs[2:] or None, mask, stats)
        if g is not None:
            assert sc is not None
            g.mul_(sc.div(temp).unsqueeze(-1))
        return hc, loss, g

    def logits(self, h2: torch.Tensor, hc: torch.Tensor, i0: int, i1: int, v0: int, v1: int,
                th: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides' logits of rows ``i0:i1`` and vocabulary entries ``v0:v1``, without
        biases: the student's a new ``cd`` tensor, the teacher's a slice of its logits (any
        dtype) or a new ``cd`` tensor (``th``: the teacher's rows as the product takes them,
        when the caller has them)."""
        cd, teacher, W_ = self.cd, self.teacher, self.W
        assert W_ is not None
        s = _mm(hc, W_[v0:v1].T, cd)
        if teacher[0] == "logits":
            return s, teacher[1][i0:i1, v0:v1]
        if th is None:
            th = self.operand_rows(teacher[1], i0, i1, self.t_w)
        return s, _mm(th, self.t_w[v0:v1].T, cd)  # type: ignore[index, union-attr, unused-ignore]

    def operand_rows(self, x: torch.Tensor, i0: int, i1: int,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``i0:i1`` of hidden states as the products with ``weight`` (default: the
        student's) take them: in the compute dtype, or on CUDA's half route in the weight's
        half dtype (converted here once, not by every product)."""
        weight = self.W if weight is None else weight
        xc = _operand(x[i0:i1], self.cd)
        assert xc is not None and weight is not None
        if weight.dtype in _HALF and xc.dtype != weight.dtype:
            xc = xc.to(weight.dtype)
        return xc

    def shift(self, s: torch.Tensor, t: torch.Tensor, b: torch.Tensor | None,
               t_b: torch.Tensor | None,
               shifts: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Biases added and the temperature divided out, in place (the torch-ops route).

        For a temperature below 1 each row is shifted first, by ``shifts`` (``(rows, 1)``
        each side) or by its finite maximum, so that ``x / T`` cannot overflow
        (:func:`kldiv._fused_linear_math.divide_by_temperature`); returns the shifts used
        (``None``: none)."""
        temp = self.plan.temperature
        if b is not None:
            s.add_(b)
        if t_b is not None:
            t.add_(t_b)
        if temp < 1.0:
            if shifts is None:
                shifts = (_row_max(s), _row_max(t))
            s.sub_(shifts[0])
            t.sub_(shifts[1])
        else:
            shifts = None
        if temp != 1.0:
            s.div_(temp)
            t.div_(temp)
        return shifts

def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Each row's maximum, ``(rows, 1)``; 0 where it is not finite (an all ``-inf`` row)."""
    m = x.amax(-1, keepdim=True)
    return m.masked_fill_(~torch.isfinite(m), 0.0)


def chunk_pass(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
               teacher: tuple[Any, ...], plan: Plan, scale: torch.Tensor | None,
               need: tuple[bool, bool, bool], weight_grad: str = "chunks"
               ) -> tuple[Any, ...]:
    """``(loss, dh, dW, db, slabs)``: per-token losses and, where ``need``, the gradients
    of ``sum(loss * scale)`` (``scale`` per token) in the compute dtype (``dW`` by
    ``"lowp"``: the weight's). ``weight_grad`` (``"chunks"``, ``"slabs"``, ``"lowp"`` or
    ``"auto"``) says how ``dW`` is formed: where by slabs, ``dW`` is ``None`` and ``slabs``
    is ``(setup, stats)``, what the slab pass (:mod:`kldiv.backends.torch_fused_slabs`)
    starts from; else ``slabs`` is ``None``."""
    need_grad = scale is not None and any(need)
    if scale is not None:  # e.g. the stride-0 gradient of a sum: kernels read rows of it
        scale = scale.contiguous()
    setup = Setup(h2, W, b, teacher, plan,
                  weight_grad=weight_grad if need_grad and need[1] else None)
    cd, W_, plan = setup.cd, setup.W, setup.plan
    assert W_ is not None
    n, hid = h2.shape
    v = W.shape[0]
    dev = h2.device
    loss = torch.empty(n, dtype=cd, device=dev)
    dh = torch.empty((n, hid), dtype=cd, device=dev) if need_grad and need[0] else None
    # "lowp": accumulated in the half weight's own dtype (one rounding per chunk)
    dW = torch.zeros((v, hid), dtype=W_.dtype if setup.weight_grad == "lowp" else cd,
                     device=dev) \
        if need_grad and need[1] and not setup.slabs else None
    db = torch.zeros(v, dtype=cd, device=dev) if need_grad and need[2] else None
    stats = torch.empty((n, STATS), dtype=cd, device=dev) if setup.slabs else None
    # the chunk pass's gradient: for dh, db and (not by slabs) dW
    chunk_grad = need_grad and (dh is not None or db is not None or dW is not None)
    for i0 in range(0, n, plan.chunk_size):
        i1 = min(n, i0 + plan.chunk_size)
        hc, loss[i0:i1], g = setup.chunk(h2, i0, i1, scale[i0:i1] if chunk_grad else None,  # type: ignore[index]
                                         None if stats is None else stats[i0:i1])
        if g is not None:
            # half operands (CUDA): the gradient rounded once to their dtype, for both products
            g_op = g if W_.dtype == cd or (dh is None and dW is None) else g.to(W_.dtype)
            if dh is not None:
                mm_into(dh[i0:i1], g_op, W_)
            if dW is not None:
                addmm_(dW, g_op.T, hc)
            if db is not None:
                db.add_(g.sum(0))
            del g_op
        del hc, g
    if stats is None:
        return loss, dh, dW, db, None
    setup.ws = None  # the first pass's buffers are free for the second
    return loss, dh, None, db, (setup, stats)


def linear_backward(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                    teacher: tuple[Any, ...], plan: Plan, grad: torch.Tensor,
                    need: tuple[bool, bool, bool]) -> tuple[Any, ...]:
    """``(dh, dW, db)`` of ``sum(loss * grad)`` for an incoming per-token gradient that is
    batched (``autograd.grad(..., is_grads_batched=True)``, ``jacobian(vectorize=True)``)
    or carries a forward-mode tangent: each chunk's ``d loss / d logits`` is computed as
    usual (it does not depend on ``grad``), and combined with ``grad`` by out-of-place ops,
    which torch batches and differentiates forward."""
    with torch.no_grad():
        setup = Setup(h2, W, b, teacher, plan)
    cd = setup.cd
    W_ = W.to(cd)
    n = h2.shape[0]
    ones = torch.ones(min(plan.chunk_size, max(n, 1)), dtype=cd, device=h2.device)
    dh_parts: list[torch.Tensor] = []
    dW: Any = 0
    db: Any = 0
    for i0 in range(0, n, plan.chunk_size):
        i1 = min(n, i0 + plan.chunk_size)
        with torch.no_grad():
            hc, _, g = setup.chunk(h2, i0, i1, ones[: i1 - i0])
        assert g is not None
        G = g * grad[i0:i1].to(cd).unsqueeze(-1)  # a new tensor: g's buffer is reused
        if need[0]:
            dh_parts.append(G @ W_)
        if need[1]:
            dW = dW + G.T @ hc.to(cd)
        if need[2]:
            db = db + G.sum(0)
    dh = (torch.cat(dh_parts) if dh_parts else grad.new_zeros(h2.shape, dtype=cd)) \
        if need[0] else None
    if need[1] and isinstance(dW, int):  # no tokens
        dW = grad.new_zeros(W.shape, dtype=cd)
    if need[2] and isinstance(db, int):
        db = grad.new_zeros((W.shape[0],), dtype=cd)
    return dh, dW if need[1] else None, db if need[2] else None
