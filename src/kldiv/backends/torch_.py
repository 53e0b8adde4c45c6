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

Autograd contracts:

- The gradient uses the inputs' values *at call time*. An input saved for backward is either
  a tensor that autograd versions (changing it in place before ``backward()`` raises torch's
  usual "modified by an inplace operation" error), or a private copy: tensors over memory
  torch does not own (a NumPy ``y_true`` converted without a copy, ``torch.from_numpy``,
  DLPack) can be rewritten behind the version counter's back (a reused loader buffer), so
  they are copied when a gradient will be needed.
- Forward-mode AD (``torch.autograd.forward_ad``): :meth:`_KLDivergence.jvp`.
- A second derivative (``create_graph=True``), batched backward
  (``autograd.grad(..., is_grads_batched=True)``, ``jacobian(..., vectorize=True)``) and
  forward-over-reverse run the backward with differentiable torch ops.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from .._kernel import kl_divergence_generic
from .._libraries import library

__all__ = ["MIN_ELEMENTS", "float_tensors", "fused", "keras_kl"]

EPSILON = 1e-7
MIN_ELEMENTS = 4096
"""Smaller inputs take the native route: the formula's few small kernels are then cheaper."""

_FLOATS = (torch.float32, torch.float64)
_TORCH = library("torch")  # torch's record in the libraries table (looked up once)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_triton: ModuleType | bool | None = False  # False: not tried yet; None: not available


_OPTIONAL: dict[str, ModuleType | None] = {}


def optional_module(name: str) -> ModuleType | None:
    """``kldiv.backends.<name>`` (a Triton kernel module), or ``None`` when it cannot be
    imported (no Triton, or a broken install); tried once per process."""
    if name not in _OPTIONAL:
        try:
            _OPTIONAL[name] = importlib.import_module(f"{__package__}.{name}")
        except Exception:
            _OPTIONAL[name] = None
    return _OPTIONAL[name]


def _triton_module() -> ModuleType | None:
    """:mod:`kldiv.backends.triton_`, or ``None`` when Triton cannot be imported."""
    global _triton
    if _triton is False:  # tests may set ``_triton`` to force or refuse the module
        _triton = optional_module("triton_")
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


_BATCHED_CHECKS = tuple(
    check for check in (getattr(getattr(torch._C, "_functorch", None), name, None)
                        for name in ("is_batchedtensor", "is_legacy_batchedtensor"))
    if check is not None)


def _batched(*xs: torch.Tensor) -> bool:
    """True when a tensor is batched by vmap (``torch.func.vmap``, or the legacy vmap that
    ``autograd.grad(..., is_grads_batched=True)`` runs the backward under)."""
    for x in xs:
        for check in _BATCHED_CHECKS:
            if check(x):
                return True
    return False


def _has_tangent(*xs: torch.Tensor) -> bool:
    """True when a tensor carries a forward-mode AD tangent (``torch.autograd.forward_ad``)."""
    fwad = torch.autograd.forward_ad
    if getattr(fwad, "_current_level", 0) < 0:  # no dual level entered: nothing to look up
        return False
    return any(fwad.unpack_dual(x).tangent is not None for x in xs)


def _private(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a copy of it when its memory is not torch's own.

    Autograd's version counter sees every in-place change made through torch, so a tensor
    saved for backward that is changed afterwards raises torch's in-place error. Memory that
    torch did not allocate (NumPy arrays converted without a copy, ``torch.from_numpy``,
    DLPack capsules, ``torch.frombuffer``: the storages torch cannot resize) can be rewritten
    by its owner without torch knowing, so the values at call time are kept in a copy
    (``clone`` is differentiable: the gradient still reaches ``x``). An inference tensor
    (made under ``torch.inference_mode()``: a teacher's output) cannot be saved for backward
    at all; its clone, made here outside inference mode, can.
    """
    return x if x.untyped_storage().resizable() and not x.is_inference() else x.clone()


def _as_rows(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``x`` broadcast to ``shape`` as ``(rows, cols)``: a strided view (stride 0 on broadcast
    axes) where one exists, else (e.g. ``(A, 1, C)`` against ``(A, B, C)``) one copy."""
    return x.expand(shape).reshape(-1, shape[-1])


# ---------------------------------------------------------------------------------- routes
class _Capsule:
    """A DLPack capsule as the object that ``np.from_dlpack`` takes (CPU memory)."""

    __slots__ = ("capsule",)

    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __dlpack__(self, stream: Any = None, **kwargs: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


def _host(x: torch.Tensor) -> np.ndarray:
    """A read-only NumPy view of the CPU tensor ``x``, without copying.

    Through DLPack rather than ``Tensor.numpy()``: ``numpy()`` marks the tensor's storage as
    not resizable for good, which :func:`_private` reads as "memory torch does not own", so
    every later call with that tensor would copy it.
    """
    return np.from_dlpack(_Capsule(to_dlpack(x.detach())))


def _np_forward(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor | None:
    from . import numpy_

    out = numpy_.forward(_host(y_true), _host(y_pred))
    return None if out is None else torch.from_numpy(out)


def _np_backward(y_true: torch.Tensor, y_pred: torch.Tensor, grad: torch.Tensor,
                 need_t: bool, need_p: bool) -> tuple[Any, Any]:
    from . import numpy_

    gt, gp = numpy_.backward(_host(y_true), _host(y_pred), grad.detach().numpy(),
                             need_t, need_p)
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


def _times_partials(y_true: torch.Tensor, y_pred: torch.Tensor,
                    vt: Any, vp: Any) -> tuple[Any, Any]:
    """``vt * d loss/dt`` and ``vp * d loss/dp`` element-wise (broadcast shape; ``None``
    where ``vt``/``vp`` is ``None``), with differentiable torch ops.

    The partials are ``log(t / p) + 1`` and ``-t / p`` inside the clip range; outside it (and
    for NaN) the product is 0 whatever ``v`` is (even inf or NaN), as through ``clamp``.
    """
    t = y_true.clamp(EPSILON, 1.0)
    p = y_pred.clamp(EPSILON, 1.0)
    r = t / p
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    gt = None if vt is None else torch.where(t == y_true, (torch.log(r) + 1.0) * vt, zero)
    gp = None if vp is None else torch.where(p == y_pred, -r * vp, zero)
    return gt, gp


def _torch_grads(y_true: torch.Tensor, y_pred: torch.Tensor, grad: torch.Tensor,
                 need_t: bool, need_p: bool) -> tuple[Any, Any]:
    """The gradients with differentiable torch ops (double backward, batched backward,
    forward-over-reverse)."""
    g = grad.unsqueeze(-1)
    return _times_partials(y_true, y_pred, g if need_t else None, g if need_p else None)


class _KLDivergence(torch.autograd.Function):
    """``sum(t * log(t / p), -1)`` with a fused forward and a fused backward."""

    # The forward takes ``ctx`` (no ``setup_context``): with ``setup_context`` torch binds the
    # arguments with ``inspect.signature`` on every ``apply`` (tens of microseconds), and the
    # functorch transforms that need it never reach this class (see ``_tracing``).
    @staticmethod
    def forward(ctx: Any, y_true: torch.Tensor, y_pred: torch.Tensor,
                route: str) -> torch.Tensor:
        out = _ROUTES[route][0](y_true, y_pred)
        assert out is not None  # routes are checked before ``apply``
        ctx.save_for_backward(y_true, y_pred)
        ctx.save_for_forward(y_true, y_pred)
        ctx.route = route
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        y_true, y_pred = ctx.saved_tensors
        need_t, need_p = ctx.needs_input_grad[:2]
        if (torch.is_grad_enabled()  # create_graph=True: keep the backward differentiable
                or _tracing() or _batched(grad) or _has_tangent(y_true, y_pred, grad)):
            gt, gp = _torch_grads(y_true, y_pred, grad, need_t, need_p)
        else:
            gt, gp = _ROUTES[ctx.route][1](y_true, y_pred, grad, need_t, need_p)
        if gt is not None and gt.shape != y_true.shape:
            gt = gt.sum_to_size(y_true.shape)
        if gp is not None and gp.shape != y_pred.shape:
            gp = gp.sum_to_size(y_pred.shape)
        return gt, gp, None

    @staticmethod
    def jvp(ctx: Any, t_dot: Any, p_dot: Any, _route_dot: Any) -> torch.Tensor:
        """Forward-mode AD: ``sum(d loss/dt * t_dot + d loss/dp * p_dot, -1)``."""
        y_true, y_pred = ctx.saved_tensors
        dt, dp = _times_partials(y_true, y_pred, t_dot, p_dot)
        terms = dp if dt is None else dt if dp is None else dt + dp
        assert terms is not None  # jvp is only called for an input with a tangent
        return terms.sum(-1)


def float_tensors(y_true: Any, y_pred: Any) -> bool:
    """True for two plain dense tensors (no subclass) of one dtype, float32 or float64, on one
    device: what the fused kernels (here and in :mod:`kldiv.backends.torch_family`) take."""
    if type(y_pred) not in _TENSOR_TYPES or type(y_true) not in _TENSOR_TYPES:
        return False
    dtype = y_pred.dtype
    if dtype not in _FLOATS or y_true.dtype != dtype:
        return False
    if y_pred.layout != torch.strided or y_true.layout != torch.strided:
        return False
    return bool(y_true.device == y_pred.device)


def _route(y_true: Any, y_pred: Any) -> str | None:
    """The route for these inputs, or ``None`` to decline."""
    if not float_tensors(y_true, y_pred):
        return None
    if y_pred.numel() == 0 or y_true.numel() == 0 or max(y_pred.ndim, y_true.ndim) == 0:
        return None
    device = y_pred.device
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
        # saved for backward: the values at call time (see ``_private``)
        out: torch.Tensor = _KLDivergence.apply(_private(y_true), _private(y_pred), route)
        return out
    if _has_tangent(y_true, y_pred):  # forward-mode AD only: ``jvp`` runs right away
        out = _KLDivergence.apply(y_true, y_pred, route)
        return out
    return _ROUTES[route][0](y_true, y_pred)


def keras_kl(y_true: Any, y_pred: Any) -> Any:
    """The Keras KL's fast path (op ``"keras_kl"``): fused ``sum(t * log(t / p), axis=-1)`` on clipped torch tensors, or ``NotImplemented``.

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
    if route != "native" and _batched(y_true, y_pred):  # the legacy vmap (not torch.func)
        return NotImplemented
    if route == "native":
        # Small inputs, or no fused kernel for this device: the generic kernel with torch's
        # own functions as the namespace (array-api-compat's wrappers cost more than the
        # few small kernels); torch.clamp's gradient is the generic one.
        return kl_divergence_generic(torch, y_true, y_pred, lib=_TORCH)
    out = fused(y_true, y_pred, route)
    return NotImplemented if out is None else out
