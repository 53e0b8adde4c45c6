"""PyTorch route of :func:`kldiv.fused_linear_divergence`: autograd around the chunk loop.

The chunk loop (:mod:`kldiv.backends.torch_fused_chunks`) walks the tokens ``chunk_size``
rows at a time, forms each chunk's logits, its divergence and its gradient with respect to
the logits, and pushes the gradient through the matrix products; no more than one chunk of
``(rows, V)`` buffers exists at any time; the weight gradient of half-precision weights is
accumulated in their dtype over the chunks when there are few of them, else formed afterwards
by vocabulary slabs (:mod:`kldiv.backends.torch_fused_slabs`, whose
:func:`~kldiv.backends.torch_fused_slabs.chunks` runs both passes). This module decides when
they run and how autograd sees them.

Gradients are computed in the forward pass (the approach of Liger-Kernel's fused linear
losses) when the result is reduced: the reduction's per-token weights are known then, so the
backward only multiplies the stored gradients by the incoming scalar. Recomputing the chunks
in the backward instead was measured slower on CPU at the same memory (the
``kldiv-recompute`` rows of ``benchmarks/fused_linear.py``; the figures are in
``docs/large-vocabulary.md``), so it is used only where it must be: for
``reduction="none"``, whose backward brings per-token weights that the weight gradient cannot
take afterwards. ``GRAD_MODE = "recompute"`` forces it everywhere.

The whole route is opaque to ``torch.compile``: :func:`run` is wrapped in
``torch.compiler.disable``, so a compiled model calls it eagerly across one graph break.

Autograd contracts:

- The gradient uses the inputs' values at call time. What ``_Recompute`` saves (the inputs)
  is either a tensor that autograd versions or a private copy where its memory is not
  torch's own (:func:`kldiv._convert.call_time_values`); ``_ForwardGrads`` saves only the
  gradients it computed, so it copies nothing.
- ``torch.func`` transforms, forward-mode AD, TorchScript tracing and the legacy vmap:
  :func:`differentiable`, the chunked formula in ordinary torch operations, instead of the
  ``autograd.Function`` (the rule of :mod:`kldiv.backends.torch_`, whose checks are reused).
- A batched incoming gradient (``is_grads_batched=True``, ``jacobian(vectorize=True)``) or
  one with a forward-mode tangent: scaled stored gradients (reduced results) or
  :func:`kldiv.backends.torch_fused_chunks.linear_backward` (per-token results).
- ``create_graph=True`` is refused with a clear ``RuntimeError``: the backward is
  hand-written, its gradients would silently have no graph. A second backward through the
  same result (``retain_graph=True``, ``torch.autograd.gradcheck``) works as for any torch
  operation.
"""

from __future__ import annotations

from typing import Any

import torch

from .._compat import compat_torch
from .._convert import call_time_values
from .._fused_linear_math import Plan, divergence_rows, divide_by_temperature
from .torch_ import _batched, _has_tangent, _tracing
from .torch_fused_chunks import compute_dtype, linear_backward
from .torch_fused_slabs import chunks

__all__ = ["GRAD_MODE", "differentiable", "fused_linear", "run", "stop_gradient"]

GRAD_MODE = "forward"
"""``"forward"``: gradients computed in the forward pass (reduced results); ``"recompute"``:
the backward recomputes every chunk."""


def differentiable(h2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                   teacher: dict[str, Any], plan: Plan) -> torch.Tensor:
    """Per-token losses with ordinary torch operations, chunk by chunk, for autograd to
    differentiate as it does any formula: under ``torch.func`` transforms (``grad``,
    ``vmap``, ``jacrev``, ``jvp``, ``hessian``), forward-mode AD, TorchScript tracing and
    the legacy vmap, where the fused route's hand-written gradients cannot take part.

    Forward-mode AD and ``vmap`` alone keep one chunk of logits at a time; a reverse-mode
    transform keeps every chunk's intermediates for its backward pass, as the plain formula
    does (memory grows with ``tokens x V``)."""
    xp = compat_torch()  # array-api-compat's torch namespace, through kldiv._compat

    cd = compute_dtype(h2, W)
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
        s = divide_by_temperature(xp, s, plan.temperature)
        t = divide_by_temperature(xp, t, plan.temperature)
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


def _graph_kept() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``): the stored
    gradients must then stay intact for a later backward. ``True`` (copy) where torch cannot
    tell."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if probe is None:
        return True
    try:
        return bool(probe())
    except RuntimeError:
        return True


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
        try:
            saved = ctx.saved_tensors
        except RuntimeError as exc:
            if "modified by an inplace operation" not in str(exc):
                raise  # e.g. torch's own "backward through the graph a second time"
            raise RuntimeError(
                "fused_linear_divergence: the gradients this result stored were changed in "
                "place after an earlier backward handed them out, so a further backward "
                "through the same result cannot be computed. Call "
                "fused_linear_divergence again for a new graph."
            ) from None
        if not _special(grad) and bool(grad == 1) and not _graph_kept():
            # ``loss.backward()`` brings exactly 1 and the graph is released after this
            # call: hand the stored gradients over as they are, autograd takes them as
            # ``.grad`` without a copy (Liger does the same). Where the graph is kept
            # (``retain_graph=True``, ``gradcheck``) they are copied below instead, since
            # ``.grad`` may change in place before the next backward through this result.
            return (*saved, None, None, None, None, None, None)
        # the result is a scalar: its gradients are the stored ones times ``grad``
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
            cd = compute_dtype(h2, W)
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
    (:func:`kldiv._convert.call_time_values`; ``clone`` passes gradients through)."""
    peer = next((x for x in (h2, W, b) if x is not None and x.requires_grad), h2)

    def own(x: Any) -> Any:
        return None if x is None else call_time_values(x, peer)

    return own(h2), own(W), own(b), tuple(own(x) for x in teacher), own(scale)


fused_linear = run
"""The fused linear divergence's torch route (the libraries table's op ``fused_linear``)."""


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut off from differentiation (sample weights are constants)."""
    return x.detach()
