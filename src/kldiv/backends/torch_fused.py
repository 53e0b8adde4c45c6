"""PyTorch route of :func:`kldiv.fused_linear_divergence`: chunked, with gradients.

The tokens are walked ``chunk_size`` rows at a time. For each chunk the student's logits
``h_c @ W.T (+ b)`` and the teacher's (a slice of its logits, or its own matrix product) are
formed in float32 (float64 for float64 inputs), the divergence and its gradient with respect
to the logits are computed in buffers allocated once per call (:func:`chunk_terms_`, the
in-place twin of :func:`kldiv._fused_linear_math.chunk_terms`), and the gradient is pushed through the two
matrix products at once: ``dh_c = G @ W``, ``dW += G.T @ h_c``, ``db += G.sum(0)``. No more
than one chunk of ``(rows, V)`` buffers exists at any time.

Gradients are computed in the forward pass (the approach of Liger-Kernel's fused linear
losses) when the result is reduced: the reduction's per-token weights are known then, so the
backward only multiplies the stored gradients by the incoming scalar. Recomputing the chunks
in the backward instead was measured slower on CPU at the same memory (the
``kldiv-recompute`` rows of ``benchmarks/fused_linear.py``; the figures are in
``docs/large-vocabulary.md``), so it is used only where it must be: for
``reduction="none"``, whose backward brings per-token weights that the weight gradient cannot
take afterwards. ``GRAD_MODE = "recompute"`` forces it everywhere.

On CUDA the per-chunk softmax, divergence and gradient run in one Triton kernel
(:mod:`kldiv.backends.triton_fused`: online log-sum-exp over vocabulary blocks) beside
cuBLAS's matrix products; half-precision operands are multiplied in their own dtype with
float32 accumulation and float32 output. On CPU, half-precision inputs are converted to float32
once (the weight: one ``V x H`` float32 copy).

The whole route is opaque to ``torch.compile``: :func:`run` is wrapped in
``torch.compiler.disable``, so a compiled model calls it eagerly across one graph break.

Autograd contracts:

- The gradient uses the inputs' values at call time. What ``_Recompute`` saves (the inputs)
  is either a tensor that autograd versions or a private copy where its memory is not
  torch's own (:func:`kldiv._namespace.call_time_values`); ``_ForwardGrads`` saves only the
  gradients it computed, so it copies nothing.
- ``torch.func`` transforms, forward-mode AD, TorchScript tracing and the legacy vmap:
  :func:`differentiable`, the chunked formula in ordinary torch operations, instead of the
  ``autograd.Function`` (the rule of :mod:`kldiv.backends.torch_`, whose checks are reused).
- A batched incoming gradient (``is_grads_batched=True``, ``jacobian(vectorize=True)``) or
  one with a forward-mode tangent: scaled stored gradients (reduced results) or
  :func:`linear_backward` (per-token results).
- ``create_graph=True`` is refused with a clear ``RuntimeError``: the backward is
  hand-written, its gradients would silently have no graph. So is (for reduced results) a
  second backward through the same result with ``retain_graph=True``.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch

from .._fused_linear_math import Plan, divergence_rows
from .._namespace import call_time_values
from .torch_ import _batched, _has_tangent, _tracing, optional_module

__all__ = ["GRAD_MODE", "chunk_terms_", "differentiable", "linear_backward", "run"]

GRAD_MODE = "forward"
"""``"forward"``: gradients computed in the forward pass (reduced results); ``"recompute"``:
the backward recomputes every chunk."""

FORCE_ROUTE: str | None = None
"""Tests only: ``"triton"`` runs the Triton kernel on any device (CPU under
``TRITON_INTERPRET=1``), ``"torch"`` the in-place torch ops on any device."""

_HALF = (torch.float16, torch.bfloat16)
def _triton_module() -> ModuleType | None:
    """:mod:`kldiv.backends.triton_fused`, or ``None`` when Triton cannot be imported."""
    return optional_module("triton_fused")


# ------------------------------------------------------------------------------ chunk math
SPARE_BUFFERS = {"kl": 2, "reverse_kl": 2, "js": 4}
"""``(rows, V)`` buffers :func:`chunk_terms_` needs beside the two logits."""


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
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row loss and ``d loss / d s`` of one chunk; every buffer is overwritten.

    Same definitions as :func:`kldiv._fused_linear_math.chunk_terms`; ``s`` and ``t`` are
    the (temperature-divided) student and teacher logits, private buffers of the caller;
    ``spare`` holds ``SPARE_BUFFERS[divergence]`` more of their shape (allocated when
    ``None``), ``mask`` a boolean one. The gradient is returned in one of these buffers.
    """
    if spare is None:
        spare = [torch.empty_like(s) for _ in range(SPARE_BUFFERS[divergence])]
    if mask is None:
        mask = torch.empty(s.shape, dtype=torch.bool, device=s.device)
    lq, lp = spare[0], spare[1]
    torch.log_softmax(s, -1, out=lq)  # one fused kernel (max, sum of exp, shift) per side
    torch.log_softmax(t, -1, out=lp)
    q = torch.exp(lq, out=s)
    grad = None
    if divergence == "kl":
        p = torch.exp(lp, out=t)
        d = torch.sub(lp, lq, out=lq).mul_(p)  # p (log p - log q), with 0 log 0 = 0:
        d.masked_fill_(torch.eq(p, 0, out=mask), 0.0)
        loss = d.sum(-1)
        if need_grad:
            grad = q.sub_(p)
    elif divergence == "reverse_kl":
        d = lq.sub_(lp)  # log q - log p
        torch.eq(q, 0, out=mask)
        terms = torch.mul(q, d, out=lp).masked_fill_(mask, 0.0)
        loss = terms.sum(-1)
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
        if need_grad:
            g = a.mul_(1 - beta)
            grad = g.sub_(q.mul_(g.sum(-1, keepdim=True)))
    return loss, grad


# ------------------------------------------------------------------------------ chunk loop
def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) \
        else torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``cd``; half operands (CUDA) are multiplied in their dtype with ``cd``
    accumulation and output (``torch.mm(..., out_dtype=)``; where torch has no such kernel,
    the operands are converted to ``cd`` for the product, never the output rounded)."""
    if a.dtype == cd and b.dtype == cd:
        return a @ b
    lo = a.dtype if a.dtype != cd else b.dtype
    try:
        return torch.mm(a.to(lo), b.to(lo), out_dtype=cd)
    except (RuntimeError, TypeError, NotImplementedError):
        return a.to(cd) @ b.to(cd)


def _operand(x: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor | None:
    """``x`` as the matrix products take it: half stays half on CUDA (mixed-precision GEMM),
    everything else is converted to the compute dtype once."""
    if x is None or x.dtype == cd or (x.device.type == "cuda" and x.dtype in _HALF):
        return x
    return x.to(cd)


def _route(h: torch.Tensor) -> str:
    if FORCE_ROUTE is not None:
        return FORCE_ROUTE
    if h.device.type == "cuda" and h.dtype != torch.float64 and _triton_module() is not None:
        return "triton"
    return "torch"


class _Setup:
    """What every chunk of one call shares: the compute dtype, the route, the operands in
    the form the products take them, and (torch-ops route) the reused buffers."""

    def __init__(self, h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                 teacher: tuple[Any, ...], plan: Plan) -> None:
        self.cd = cd = _compute_dtype(h2, W)
        self.route = _route(h2) if cd != torch.float64 else "torch"
        self.plan, self.teacher = plan, teacher
        self.W = _operand(W, cd)
        self.b = None if b is None else b.to(cd)
        self.t_w = _operand(teacher[2], cd) if teacher[0] == "hidden" else None
        self.t_b = None if teacher[0] != "hidden" or teacher[3] is None else teacher[3].to(cd)
        self.ws = None
        if self.route == "torch" and self.W is not None and self.W.dtype == cd and (
                self.t_w is None or self.t_w.dtype == cd):
            self.ws = Workspace(min(plan.chunk_size, h2.shape[0]), W.shape[0],
                                2 + SPARE_BUFFERS[plan.divergence], cd, h2.device)

    def chunk(self, h2: torch.Tensor, i0: int, i1: int, sc: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(hc, loss, g)`` of rows ``i0:i1``: ``hc`` the rows as the products take them,
        ``g`` (``sc`` given) ``d loss / d logits`` times ``sc / temperature`` per row, in a
        buffer that the next chunk overwrites."""
        cd, teacher, temp = self.cd, self.teacher, self.plan.temperature
        W_ = self.W
        hc = _operand(h2[i0:i1], cd)
        assert hc is not None and W_ is not None
        bufs: list[torch.Tensor] = []
        mask: torch.Tensor | None = None
        if self.ws is not None:  # the torch-ops route: products written into the workspace
            bufs, mask = self.ws.take(i1 - i0)
            s, t = bufs[0], bufs[1]
            torch.mm(hc, W_.T, out=s)
            if teacher[0] == "logits":
                t.copy_(teacher[1][i0:i1])
            else:
                torch.mm(_operand(teacher[1][i0:i1], cd), self.t_w.T, out=t)  # type: ignore[arg-type, union-attr, unused-ignore]
        else:
            s = _mm(hc, W_.T, cd)
            if teacher[0] == "logits":
                t = teacher[1][i0:i1]
            else:
                t = _mm(_operand(teacher[1][i0:i1], cd), self.t_w.T, cd)  # type: ignore[arg-type, union-attr, unused-ignore]
        need_grad = sc is not None
        if self.route == "triton":
            tri = _triton_module()
            assert tri is not None
            loss = tri.chunk(s, t, self.b, self.t_b, sc, self.plan, need_grad)
            return hc, loss, s if need_grad else None
        if self.ws is None and teacher[0] == "logits":
            t = t.to(cd, copy=True)
        if self.b is not None:
            s.add_(self.b)
        if self.t_b is not None:
            t.add_(self.t_b)
        if temp != 1.0:
            s.div_(temp)
            t.div_(temp)
        loss, g = chunk_terms_(s, t, self.plan.divergence, self.plan.beta, need_grad,
                               bufs[2:] or None, mask)
        if g is not None:
            assert sc is not None
            g.mul_(sc.div(temp).unsqueeze(-1))
        return hc, loss, g


def chunks(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
           teacher: tuple[Any, ...], plan: Plan, scale: torch.Tensor | None,
           need: tuple[bool, bool, bool]) -> tuple[Any, ...]:
    """``(loss, dh, dW, db)``: per-token losses and, where ``need``, the gradients of
    ``sum(loss * scale)`` (``scale`` per token) in the compute dtype."""
    setup = _Setup(h2, W, b, teacher, plan)
    cd, W_ = setup.cd, setup.W
    assert W_ is not None
    n, hid = h2.shape
    v = W.shape[0]
    dev = h2.device
    loss = torch.empty(n, dtype=cd, device=dev)
    need_grad = scale is not None and any(need)
    dh = torch.empty((n, hid), dtype=cd, device=dev) if need_grad and need[0] else None
    dW = torch.zeros((v, hid), dtype=cd, device=dev) if need_grad and need[1] else None
    db = torch.zeros(v, dtype=cd, device=dev) if need_grad and need[2] else None
    for i0 in range(0, n, plan.chunk_size):
        i1 = min(n, i0 + plan.chunk_size)
        hc, loss[i0:i1], g = setup.chunk(h2, i0, i1, scale[i0:i1] if need_grad else None)  # type: ignore[index]
        if g is not None:
            if dh is not None:
                if W_.dtype == cd:
                    torch.mm(g, W_, out=dh[i0:i1])
                else:
                    dh[i0:i1] = _mm(g, W_, cd)
            if dW is not None:
                if hc.dtype == cd:  # in place: no (V, H) temporary per chunk
                    dW.addmm_(g.T, hc)
                else:
                    dW.add_(_mm(g.T, hc, cd))
            if db is not None:
                db.add_(g.sum(0))
        del hc, g
    return loss, dh, dW, db


def linear_backward(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                    teacher: tuple[Any, ...], plan: Plan, grad: torch.Tensor,
                    need: tuple[bool, bool, bool]) -> tuple[Any, ...]:
    """``(dh, dW, db)`` of ``sum(loss * grad)`` for an incoming per-token gradient that is
    batched (``autograd.grad(..., is_grads_batched=True)``, ``jacobian(vectorize=True)``)
    or carries a forward-mode tangent: each chunk's ``d loss / d logits`` is computed as
    usual (it does not depend on ``grad``), and combined with ``grad`` by out-of-place ops,
    which torch batches and differentiates forward."""
    with torch.no_grad():
        setup = _Setup(h2, W, b, teacher, plan)
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


def differentiable(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                   teacher: dict[str, Any], plan: Plan) -> torch.Tensor:
    """Per-token losses with ordinary torch operations, chunk by chunk, for autograd to
    differentiate as it does any formula: under ``torch.func`` transforms (``grad``,
    ``vmap``, ``jacrev``, ``jvp``, ``hessian``), forward-mode AD, TorchScript tracing and
    the legacy vmap, where the fused route's hand-written gradients cannot take part.

    Forward-mode AD and ``vmap`` alone keep one chunk of logits at a time; a reverse-mode
    transform keeps every chunk's intermediates for its backward pass, as the plain formula
    does (memory grows with ``tokens x V``)."""
    import array_api_compat.torch as xp

    cd = _compute_dtype(h2, W)
    W_ = W.to(cd)
    b_ = None if b is None else b.to(cd)
    tl = teacher.get("logits")
    if tl is None:
        tw = teacher["weight"].detach().to(cd)
        tb = None if teacher.get("bias") is None else teacher["bias"].detach().to(cd)
    else:
        tl = tl.detach()
    n = h2.shape[0]
    parts = []
    for i0 in range(0, n, plan.chunk_size):
        i1 = min(n, i0 + plan.chunk_size)
        s = h2[i0:i1].to(cd) @ W_.T
        if b_ is not None:
            s = s + b_
        if tl is not None:
            t = tl[i0:i1].to(cd)
        else:
            t = teacher["hidden"][i0:i1].detach().to(cd) @ tw.T
            if tb is not None:
                t = t + tb
        if plan.temperature != 1.0:
            s, t = s / plan.temperature, t / plan.temperature
        parts.append(divergence_rows(xp, s, t, plan.divergence, plan.beta))
    if not parts:  # no tokens: (0,), still connected to the inputs
        return h2.sum(-1).to(cd) * 0
    return torch.cat(parts)


# ---------------------------------------------------------------------------------- autograd
_NO_CREATE_GRAPH = (
    "fused_linear_divergence: create_graph=True (a second derivative through autograd, e.g. "
    "torch.autograd.functional.hessian or a gradient penalty) is not supported: its "
    "backward pass is hand-written, not made of differentiable operations. Differentiate "
    "it once (create_graph=False), or for higher derivatives use torch.func "
    "(torch.func.grad, torch.func.hessian, torch.func.jacfwd), under which it runs a "
    "differentiable chunked formula.")


def _check_first_order() -> None:
    """The engine runs a backward pass with grad mode on exactly when ``create_graph=True``:
    refuse it rather than return gradients that silently have no graph."""
    if torch.is_grad_enabled():
        raise RuntimeError(_NO_CREATE_GRAPH)


def _cast(g: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None or like is None else g.to(like.dtype)


def _teacher(tl: Any, th: Any, tw: Any, tb: Any) -> tuple[Any, ...]:
    return ("logits", tl.detach()) if tl is not None else \
        ("hidden", th.detach(), tw.detach(), None if tb is None else tb.detach())


def _special(grad: torch.Tensor) -> bool:
    """An incoming gradient that the in-place chunk loop cannot take: batched (legacy vmap
    of ``is_grads_batched``) or carrying a forward-mode tangent."""
    return _batched(grad) or _has_tangent(grad)


class _ForwardGrads(torch.autograd.Function):
    """``sum(loss * scale)``; the gradients are computed in the forward pass."""

    @staticmethod
    def forward(ctx: Any, h2: torch.Tensor, W: torch.Tensor, b: Any, tl: Any, th: Any,
                tw: Any, tb: Any, scale: torch.Tensor, plan: Plan) -> torch.Tensor:
        need = tuple(ctx.needs_input_grad[:3])
        loss, dh, dW, db = chunks(h2.detach(), W.detach(), None if b is None else b.detach(),
                                  _teacher(tl, th, tw, tb), plan, scale, need)
        ctx.save_for_backward(_cast(dh, h2), _cast(dW, W), _cast(db, b))
        return (loss * scale).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _check_first_order()
        if getattr(ctx, "handed_over", False):
            raise RuntimeError(
                "fused_linear_divergence: a second backward through the same result (e.g. "
                "retain_graph=True) is not supported: its stored gradients were handed over "
                "to the first one. Call fused_linear_divergence again for a new graph.")
        saved = ctx.saved_tensors
        if not _special(grad) and bool(grad == 1):
            # ``loss.backward()`` brings exactly 1: hand the stored gradients over as they are
            # (autograd takes them without a copy; Liger does the same). They may then
            # become ``.grad`` and change in place, so they are never used again.
            ctx.handed_over = True
            grads = list(saved)
        else:  # the result is a scalar: its gradients are the stored ones times ``grad``
            grads = [None if g is None else g * grad.to(g.dtype) for g in saved]
        return (*grads, None, None, None, None, None, None)


class _Recompute(torch.autograd.Function):
    """Per-token losses; the backward recomputes every chunk with the incoming weights.

    The inputs are saved as they are (autograd's version counter guards them) or as private
    copies where their memory is not torch's own (:func:`run`)."""

    @staticmethod
    def forward(ctx: Any, h2: torch.Tensor, W: torch.Tensor, b: Any, tl: Any, th: Any,
                tw: Any, tb: Any, plan: Plan) -> torch.Tensor:
        ctx.save_for_backward(h2, W, b, tl, th, tw, tb)
        ctx.plan = plan
        loss = chunks(h2.detach(), W.detach(), None if b is None else b.detach(),
                      _teacher(tl, th, tw, tb), plan, None, (False, False, False))[0]
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _check_first_order()
        h2, W, b, tl, th, tw, tb = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        h2, W = h2.detach(), W.detach()
        b = None if b is None else b.detach()
        teacher = _teacher(tl, th, tw, tb)
        if _special(grad):
            dh, dW, db = linear_backward(h2, W, b, teacher, ctx.plan, grad, need)
        else:
            cd = _compute_dtype(h2, W)
            _, dh, dW, db = chunks(h2, W, b, teacher, ctx.plan, grad.detach().to(cd), need)
        return (_cast(dh, h2), _cast(dW, W), _cast(db, b), None, None, None, None, None)


def _transformed(*xs: Any) -> bool:
    """True where autograd must see every operation: ``torch.func`` transforms, TorchScript
    tracing, forward-mode tangents, the legacy vmap (what ``kldiv.backends.torch_`` declines
    its fused path for)."""
    tensors = [x for x in xs if x is not None]
    return _tracing() or _batched(*tensors) or _has_tangent(*tensors)


@torch.compiler.disable
def run(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, teacher: dict[str, Any],
        plan: Plan, scale: torch.Tensor | None) -> torch.Tensor:
    """Per-token losses (``scale is None``) or ``sum(loss * scale)``, in the compute dtype.

    ``teacher`` holds ``logits`` (2-D) or ``hidden``/``weight``/``bias``; the teacher side
    gets no gradient. Differentiable with respect to ``h2``, ``W`` and ``b``.
    """
    args = (teacher.get("logits"), teacher.get("hidden"), teacher.get("weight"),
            teacher.get("bias"))
    scale = None if scale is None else scale.detach()  # sample weights are constants
    if _transformed(h2, W, b):
        # autograd keeps this formula's inputs too: the values at call time
        h2, W, b, (tl, th, tw, tb), scale = _call_time(h2, W, b, args, scale)
        per = differentiable(h2, W, b, {"logits": tl} if tl is not None else
                             {"hidden": th, "weight": tw, "bias": tb}, plan)
        return per if scale is None else (per * scale).sum()
    grad_wanted = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h2, W, b))
    if not grad_wanted:
        with torch.no_grad():
            loss = chunks(h2, W, b, _teacher(*args), plan, None, (False, False, False))[0]
        return loss if scale is None else (loss * scale).sum()
    if scale is not None and GRAD_MODE == "forward":
        # nothing but the gradients is kept for the backward pass: no copies needed
        out: torch.Tensor = _ForwardGrads.apply(h2, W, b, *args, scale, plan)
        return out
    # saved for the backward pass: the values at call time
    h2, W, b, args, scale = _call_time(h2, W, b, args, scale)
    per_token: torch.Tensor = _Recompute.apply(h2, W, b, *args, plan)
    return per_token if scale is None else (per_token * scale).sum()


def _call_time(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
               teacher: tuple[Any, ...], scale: torch.Tensor | None) -> tuple[Any, ...]:
    """The inputs, each a private copy where autograd will keep it for a later backward
    pass and its memory is not torch's own (``torch.from_numpy``, a NumPy array, DLPack):
    refilling such a buffer before ``backward()`` must not change the gradient
    (:func:`kldiv._namespace.call_time_values`; ``clone`` passes gradients through)."""
    peer = next((x for x in (h2, W, b) if x is not None and x.requires_grad), h2)

    def own(x: Any) -> Any:
        return None if x is None else call_time_values(x, peer)

    return own(h2), own(W), own(b), tuple(own(x) for x in teacher), own(scale)
