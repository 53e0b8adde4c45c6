"""PyTorch fast path: a fused forward and a fused backward in one ``autograd.Function``.

The eager formula ``sum(t * log(t / p), -1)`` allocates five full-size temporaries and saves
four of them for autograd. Here the forward pass saves only the two inputs and writes one
value per row; the backward pass recomputes ``t`` and ``p`` block by block and writes the two
gradients directly:

- ``d/dp = -t / p * w`` and ``d/dt = (log(t / p) + 1) * w`` inside the clip range
  ``[eps, 1]`` (closed), 0 outside it (and for NaN), the gradient of the generic ``clamp``.

Routes, by device:

- CPU: the tensors are viewed as NumPy arrays (no copy) and run through the blocked,
  multi-threaded NumPy kernels of :mod:`kldiv.backends.numpy_` (forward and backward).
- CUDA: Triton kernels (:mod:`kldiv.backends.triton_`) when Triton is installed.
- Small inputs (< ``MIN_ELEMENTS``), other devices, and CUDA without Triton: "native", the
  generic kernel with the ``torch`` module as its namespace (no array-api-compat wrappers).
- Other dtypes, tensor subclasses, ``torch.compile`` tracing, ``torch.func`` transforms,
  TorchScript tracing: ``NotImplemented``, so that the generic array-API formula is what
  gets traced or transformed.

A second derivative (``create_graph=True``) is computed with differentiable torch ops, so
double backward works too.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from .._kernel import kl_divergence_generic

__all__ = ["MIN_ELEMENTS", "fused", "kl_divergence"]

EPSILON = 1e-7
MIN_ELEMENTS = 4096
"""Smaller inputs take the native route: the formula's few small kernels are then cheaper."""

_FLOATS = (torch.float32, torch.float64)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_triton: ModuleType | bool | None = False  # False: not tried yet; None: not available


def _triton_module() -> ModuleType | None:
    """:mod:`kldiv.backends.triton_`, or ``None`` when Triton cannot be imported."""
    global _triton
    if _triton is False:
        try:
            from . import triton_
        except Exception:  # ImportError, or a broken Triton install
            _triton = None
        else:
            _triton = triton_
    return _triton if isinstance(_triton, ModuleType) else None


def _tracing() -> bool:
    """True under torch.compile/dynamo, torch.func transforms or TorchScript tracing."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return True
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.peek_interpreter_stack() is not None


def _as_rows(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``x`` broadcast to ``shape`` as ``(rows, cols)``: a strided view (stride 0 on broadcast
    axes) where one exists, else (e.g. ``(A, 1, C)`` against ``(A, B, C)``) one copy."""
    return x.expand(shape).reshape(-1, shape[-1])


# ---------------------------------------------------------------------------------- routes
def _np_forward(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor | None:
    from . import numpy_

    out = numpy_.forward(y_true.detach().numpy(), y_pred.detach().numpy())
    return None if out is None else torch.from_numpy(out)


def _np_backward(y_true: torch.Tensor, y_pred: torch.Tensor, grad: torch.Tensor,
                 need_t: bool, need_p: bool) -> tuple[Any, Any]:
    from . import numpy_

    gt, gp = numpy_.backward(y_true.detach().numpy(), y_pred.detach().numpy(),
                             grad.detach().numpy(), need_t, need_p)
    return (None if gt is None else torch.from_numpy(gt),
            None if gp is None else torch.from_numpy(gp))


def _triton_forward(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor | None:
    tri = _triton_module()
    shape = torch.broadcast_shapes(y_true.shape, y_pred.shape)
    if tri is None:
        return None
    t2, p2 = _as_rows(y_true.detach(), shape), _as_rows(y_pred.detach(), shape)
    return tri.forward(t2, p2).view(shape[:-1])


def _triton_backward(y_true: torch.Tensor, y_pred: torch.Tensor, grad: torch.Tensor,
                     need_t: bool, need_p: bool) -> tuple[Any, Any]:
    tri = _triton_module()
    assert tri is not None
    shape = torch.broadcast_shapes(y_true.shape, y_pred.shape)
    t2, p2 = _as_rows(y_true.detach(), shape), _as_rows(y_pred.detach(), shape)
    gt, gp = tri.backward(t2, p2, grad.detach().expand(shape[:-1]).reshape(-1), need_t, need_p)
    return (None if gt is None else gt.view(shape), None if gp is None else gp.view(shape))


_ROUTES = {
    "numpy": (_np_forward, _np_backward),
    "triton": (_triton_forward, _triton_backward),
}


def _torch_grads(y_true: torch.Tensor, y_pred: torch.Tensor, grad: torch.Tensor,
                 need_t: bool, need_p: bool) -> tuple[Any, Any]:
    """The same gradients with differentiable torch ops (for ``create_graph=True``)."""
    t = y_true.clamp(EPSILON, 1.0)
    p = y_pred.clamp(EPSILON, 1.0)
    r = t / p
    g = grad.unsqueeze(-1)
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    gt = torch.where(t == y_true, (torch.log(r) + 1.0) * g, zero) if need_t else None
    gp = torch.where(p == y_pred, -r * g, zero) if need_p else None
    return gt, gp


class _KLDivergence(torch.autograd.Function):
    """``sum(t * log(t / p), -1)`` with a fused forward and a fused backward."""

    @staticmethod
    def forward(ctx: Any, y_true: torch.Tensor, y_pred: torch.Tensor,
                route: str) -> torch.Tensor:
        out = _ROUTES[route][0](y_true, y_pred)
        assert out is not None  # routes are checked before ``apply``
        ctx.save_for_backward(y_true, y_pred)
        ctx.route = route
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        y_true, y_pred = ctx.saved_tensors
        need_t, need_p = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            gt, gp = _torch_grads(y_true, y_pred, grad, need_t, need_p)
        else:
            gt, gp = _ROUTES[ctx.route][1](y_true, y_pred, grad, need_t, need_p)
        if gt is not None and gt.shape != y_true.shape:
            gt = gt.sum_to_size(y_true.shape)
        if gp is not None and gp.shape != y_pred.shape:
            gp = gp.sum_to_size(y_pred.shape)
        return gt, gp, None


def _route(y_true: Any, y_pred: Any) -> str | None:
    """The route for these inputs, or ``None`` to decline."""
    if type(y_pred) not in _TENSOR_TYPES or type(y_true) not in _TENSOR_TYPES:
        return None
    dtype = y_pred.dtype
    if dtype not in _FLOATS or y_true.dtype != dtype:
        return None
    if y_pred.layout != torch.strided or y_true.layout != torch.strided:
        return None
    if y_pred.numel() == 0 or y_true.numel() == 0 or max(y_pred.ndim, y_true.ndim) == 0:
        return None
    device = y_pred.device
    if y_true.device != device:
        return None
    if max(y_pred.numel(), y_true.numel()) < MIN_ELEMENTS:
        return "native"
    if device.type == "cpu":
        return "numpy"
    if device.type == "cuda" and _triton_module() is not None:
        return "triton"
    return "native"


def fused(y_true: torch.Tensor, y_pred: torch.Tensor, route: str) -> torch.Tensor | None:
    """Run ``route`` (``"numpy"`` or ``"triton"``), through autograd when a gradient is needed.

    Returns ``None`` when the route cannot take these inputs.
    """
    if route == "triton" and _triton_module() is None:
        return None
    if torch.is_grad_enabled() and (y_true.requires_grad or y_pred.requires_grad):
        out: torch.Tensor = _KLDivergence.apply(y_true, y_pred, route)
        return out
    return _ROUTES[route][0](y_true, y_pred)


def kl_divergence(y_true: Any, y_pred: Any) -> Any:
    """Fused ``sum(t * log(t / p), axis=-1)`` on clipped torch tensors, or ``NotImplemented``.

    Parameters
    ----------
    y_true, y_pred : torch.Tensor
        Same floating dtype (float32 or float64) and device, broadcastable shapes.

    Returns
    -------
    torch.Tensor or NotImplemented
        The per-sample loss (differentiable with respect to both inputs), or
        ``NotImplemented`` when the generic array-API formula should run instead (tracing,
        ``torch.func`` transforms, tensor subclasses, other dtypes, empty inputs). Small
        inputs, devices other than CPU and CUDA, and CUDA without Triton run the generic
        kernel on torch's own functions.
    """
    route = _route(y_true, y_pred)
    if route is None or _tracing():
        return NotImplemented
    if route == "native":
        # Small inputs, or no fused kernel for this device: the generic kernel with torch's
        # own functions as the namespace (array-api-compat's wrappers cost more than the
        # few small kernels); torch.clamp's gradient is the generic one.
        return kl_divergence_generic(torch, y_true, y_pred)
    out = fused(y_true, y_pred, route)
    return NotImplemented if out is None else out
