"""PyTorch fast path of the divergence family: log-softmax fused with the divergence.

The eager formula (``log_softmax`` of each side, then ``F.kl_div``) materialises several
full-size tensors and autograd keeps them for the backward pass. Here one
``autograd.Function`` works a block of rows at a time (about :data:`BLOCK_ELEMENTS` elements,
so that a block's temporaries stay in cache on CPU): per block, torch's fused
``log_softmax`` (one pass for the log-sum-exp, one for the output) and one pass of terms;
only per-row values are kept (the divergence, the mass of P, the two halves of the JSD). The
backward pass recomputes each block's (log-)probabilities from the saved inputs and writes
the gradient straight into its output: the only full-size tensor is the gradient itself.
The closed forms, with ``lp``/``lq`` the log-probabilities, ``p``/``q`` the
probabilities, ``T`` the temperature and ``g`` the incoming per-row gradient:

- ``kl`` = ``sum p (lp - lq)``: w.r.t. ``lq``: ``-p``; w.r.t. ``lp``: ``p (lp - lq + 1)``.
- ``js`` with ``lm = log(beta p + (1 - beta) q)``: w.r.t. ``lp``: ``beta p (lp - lm)``;
  w.r.t. ``lq``: ``(1 - beta) q (lq - lm)`` (the ``+1`` terms cancel through ``M``).
- ``reverse_kl`` is ``kl`` with the sides swapped.
- a logits side ``x`` (``l = log_softmax(x / T)``) takes ``(G - softmax * sum(G)) / T``
  of its log-space gradient ``G``; for the forward KL that is ``(q - p) / T`` for the
  student and ``p ((lp - lq) - KL) / T`` for the teacher, and for the JSD
  ``beta p ((lp - lm) - KL(P||M)) / T`` and ``(1 - beta) q ((lq - lm) - KL(Q||M)) / T``.

Entries with probability 0 (``-inf``) contribute 0 to the value and to every gradient. A
block with a row of all ``-inf`` logits (or NaN) is computed, forward and backward, by the
generic formula instead, which defines such rows (the zero measure; NaN propagates). A
``"probs"`` side is brought to ``log(clamp(x, 1e-7, 1))`` with ordinary torch ops first (its
gradient is autograd's). The same code runs on CUDA with larger blocks (kernel launches cost
more there than cache misses). Tracing (``torch.compile``, ``torch.func``, TorchScript),
forward-mode AD (inputs with a tangent), the legacy vmap, tensor subclasses, other dtypes and
empty inputs return ``NotImplemented``: the generic kernel runs.

On CUDA, when Triton is installed, both sides logits or both log-probabilities (same class
axis) run the Triton kernels of :mod:`kldiv.backends.triton_family` instead of the blocks
(one program per row: online log-sum-exp, then the terms; the same closed forms backward);
everything else (``"probs"``, mixed pairs, a broadcast class axis, other devices) keeps the
blocks.

On CPU, an input of at least :data:`COMPILE_MIN_ELEMENTS` elements (``2**22``) runs the
compiled kernels of :mod:`kldiv.backends.torch_family_compiled` instead of the blocks: the
same closed forms in ordinary torch ops, compiled by ``torch.compile(dynamic=True,
fullgraph=True)`` (inductor) the first time each is needed in the process (seconds, once per
op, pair of spaces and set of gradients; another shape, temperature or ``beta`` reuses it).
Inductor fuses each into one vectorised loop per row: the forward pass keeps per-row
statistics only (the divergences, P's mass, each logits side's row maximum and log-sum),
the backward pass writes the gradient and nothing else; about the speed of ``torch.compile``
of the eager formula, with one input's worth of memory. Rows whose statistics come out non-finite (all ``-inf``
logits, a NaN, an infinite KL) are recomputed, forward and backward, by the generic formula.
``KLDIV_NO_COMPILE=1``, :func:`kldiv.use_generic` and a switched-off ``torch.compile``
(``TORCHDYNAMO_DISABLE=1``, the ``"force_eager"`` stance) keep the blocks; so does a failure
to compile, which warns once (``RuntimeWarning``, with the reason) and is remembered for the
rest of the process. Nothing is compiled while ``torch.compile`` traces the caller (the
generic formula is traced, as below).

Autograd contracts, as on the Keras KL's fast path (:mod:`kldiv.backends.torch_`):

- The gradient uses the inputs' values at call time: an input over memory torch does not own
  (a NumPy teacher converted without a copy, ``torch.from_numpy`` of a reused buffer) is
  copied before autograd saves it (``torch_._private``).
- A second derivative (``create_graph=True``), a batched backward
  (``autograd.grad(..., is_grads_batched=True)``, ``jacobian(vectorize=True)``) and forward AD
  over the backward are computed by autograd through the generic formula, whose ordinary
  torch ops have derivatives and batching rules (the blocked closed forms' ``out=`` ops do
  not).
"""

from __future__ import annotations

import math
import os
import warnings
from types import ModuleType
from typing import Any

import torch

from .._kernel import EPSILON
from .._libraries.torch_traced import array_api
from .._switch import generic_forced
from .._temperature import temperature_flat, temperature_limit
from . import torch_family_blocks as _blocks
from .torch_ import _batched, _has_tangent, _private, _tracing, float_tensors, optional_module
from .torch_family_blocks import BLOCK_ELEMENTS

__all__ = ["BLOCK_ELEMENTS", "COMPILE_MIN_ELEMENTS", "array_api", "js", "kl", "reverse_kl"]

COMPILE_MIN_ELEMENTS = 1 << 22
"""Smallest CPU input (elements of the broadcast shape) the compiled kernels run: below it
the blocks run (compiling costs seconds, once per process and kernel)."""
_COMPILE_FAILURE: str | None = None
"""Why compiling failed in this process (the blocks run from then on), or ``None``."""

_INF = math.inf
_TRITON_DEVICES = ("cuda",)
"""Device types the Triton kernels run on (the interpreted tests add ``"cpu"``)."""
_triton: ModuleType | bool | None = False  # False: not tried yet; None: not available


def _triton_module() -> ModuleType | None:
    """:mod:`kldiv.backends.triton_family`, or ``None`` when Triton cannot be imported."""
    global _triton
    if _triton is False:  # tests may set ``_triton`` to force or refuse the module
        _triton = optional_module("triton_family")
    return _triton if isinstance(_triton, ModuleType) else None


def _triton_for(x: torch.Tensor, y: torch.Tensor, spaces: tuple[str, str]) -> Any:
    """The Triton module when it takes these sides, else ``None``: a Triton device, both
    sides logits or both log-probabilities, one class axis (none broadcast)."""
    if (x.device.type not in _TRITON_DEVICES or spaces[0] != spaces[1]
            or spaces[0] not in ("logits", "log_probs") or x.shape[-1:] != y.shape[-1:]):
        return None
    return _triton_module()


def _run_forward(plan: _blocks.Plan, a: torch.Tensor, b: torch.Tensor) -> tuple[Any, Any]:
    """``(value, rows)``: the Triton kernels', the compiled kernels' or the blocks' forward
    pass."""
    if plan.triton is not None:
        out: tuple[Any, Any] = plan.triton.forward(plan.op, a, b, plan.kinds, plan.temperature,
                                                   plan.beta)
        return out
    if plan.compiled is not None:
        try:
            stats, bad, value = plan.compiled.forward(plan.op, a, b, _logits(plan),
                                                      plan.temperature, plan.beta)
        except Exception as exc:  # compiling (or the compiled code) failed: the blocks
            _compile_failed(exc)
            plan.compiled = None
        else:
            return _compiled_forward(plan, a, b, stats, bad, value)
    value, r1, r2, generic_blocks = _blocks.forward(plan, a, b)
    return value, (r1, r2, generic_blocks)


# ------------------------------------------------------------------ the compiled kernels
def _compile_switched_off() -> bool:
    return os.environ.get("KLDIV_NO_COMPILE", "").strip().lower() in {"1", "true", "yes", "on"}


def _compiled_module(device: torch.device, numel: int) -> ModuleType | None:
    """:mod:`kldiv.backends.torch_family_compiled` when it runs a call of ``numel`` elements
    on ``device``: CPU, at least :data:`COMPILE_MIN_ELEMENTS`, compiling has not failed in
    this process, not switched off (``KLDIV_NO_COMPILE``, :func:`kldiv.use_generic`; nor
    torch.compile itself: ``TORCHDYNAMO_DISABLE``, the ``"force_eager"`` stance). The caller
    has checked that no tracing (``torch.compile``, ``torch.func``) is under way."""
    if (device.type != "cpu" or numel < COMPILE_MIN_ELEMENTS or _COMPILE_FAILURE is not None
            or _compile_switched_off() or generic_forced()):
        return None
    module = optional_module("torch_family_compiled")
    return module if module is not None and module.compiler_on() else None


def _compile_failed(exc: BaseException) -> None:
    """Remember that compiling failed (the blocks run from now on) and say so, once."""
    global _COMPILE_FAILURE
    if _COMPILE_FAILURE is not None:
        return
    _COMPILE_FAILURE = f"{type(exc).__name__}: {exc}".strip()[:500]
    warnings.warn(
        "kldiv: torch.compile of the divergence family's CPU kernels failed "
        f"({_COMPILE_FAILURE}); kldiv uses its eager blocks (slower) for the rest of this "
        "process. Set KLDIV_NO_COMPILE=1 to skip compiling.", RuntimeWarning, stacklevel=2)


class _CompiledRows:
    """What the compiled forward pass keeps for the backward pass: the statistics
    ``(r1, r2, max_a, logsum_a, max_b, logsum_b)`` and the indices of the rows the generic
    formula computed."""

    __slots__ = ("generic", "stats")

    def __init__(self, stats: tuple[Any, ...], generic: torch.Tensor | None) -> None:
        self.stats, self.generic = stats, generic

    def blocks(self, a: torch.Tensor) -> tuple[Any, Any, set[int]]:
        """The blocks' ``rows`` (:func:`_blocks.backward`): the generic rows' blocks generic."""
        step = _blocks.block_rows(a)
        idx = [] if self.generic is None else self.generic.tolist()
        return self.stats[0], self.stats[1], {(i // step) * step for i in idx}


def _logits(plan: _blocks.Plan) -> tuple[bool, bool]:
    return plan.kinds[0] == "logits", plan.kinds[1] == "logits"


def _compiled_forward(plan: _blocks.Plan, a: torch.Tensor, b: torch.Tensor, stats: tuple[Any, ...],
                      bad: torch.Tensor, value: Any) -> tuple[Any, Any]:
    """``(value, rows)`` from the compiled forward pass's statistics. Rows whose statistics
    are not finite (``bad`` counts them: a row of all ``-inf`` logits or with a NaN, an
    infinite KL, where the closed forms' gradient would mix ``-inf`` and NaN) are recomputed
    with the generic formula, which defines them, and remembered so that the backward pass
    does the same."""
    r1, r2 = stats[:2]
    generic = None
    if bad.item():
        rows = ~torch.isfinite(torch.stack([x for x in stats if x is not None])).all(dim=0)
        generic = torch.nonzero(rows).squeeze(1)
        s1 = torch.empty(generic.numel(), dtype=r1.dtype)
        s2 = None if r2 is None else torch.empty_like(s1)
        _blocks.generic_block(plan, a[generic], b[generic], s1, s2)
        r1.index_copy_(0, generic, s1)
        if r2 is not None:
            r2.index_copy_(0, generic, s2)
        if value is not None:
            assert s2 is not None
            value.index_copy_(0, generic, torch.add(s1 * plan.beta, s2, alpha=1.0 - plan.beta))
    return r1 if value is None else value, _CompiledRows(stats, generic)


def _compiled_backward(plan: _blocks.Plan, a: torch.Tensor, b: torch.Tensor, rows: _CompiledRows,
                       grad: torch.Tensor, need_a: bool, need_b: bool) -> tuple[Any, Any]:
    """The compiled backward pass (the blocks' if compiling fails), the generic rows by
    autograd through the generic formula."""
    try:
        ga, gb = plan.compiled.backward(plan.op, a, b, rows.stats, grad, _logits(plan),
                                        plan.temperature, plan.beta, need_a, need_b)
    except Exception as exc:
        _compile_failed(exc)
        return _blocks.backward(plan, a, b, rows.blocks(a), grad, need_a, need_b)
    idx = rows.generic
    if idx is not None:
        sa = torch.empty_like(a[idx]) if need_a else None
        sb = torch.empty_like(b[idx]) if need_b else None
        _blocks.generic_block_grad(plan, a[idx], b[idx], grad[idx], sa, sb)
        if ga is not None:
            ga.index_copy_(0, idx, sa)
        if gb is not None:
            gb.index_copy_(0, idx, sb)
    return ga, gb


class _Fused(torch.autograd.Function):
    """Per-row divergence of two ``(rows, classes)`` tensors, fused forward and backward."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, plan: _blocks.Plan) -> torch.Tensor:
        value, ctx.rows = _run_forward(plan, a, b)
        ctx.plan = plan
        ctx.save_for_backward(a, b)
        return value

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[:2]
        if (torch.is_grad_enabled()  # create_graph=True: a differentiable backward
                or _tracing() or _batched(grad) or _has_tangent(a, b, grad)):
            # also under vmap (``is_grads_batched``, ``jacobian(vectorize=True)``) and forward
            # AD over this backward, where the blocked closed forms' ``out=`` ops cannot run:
            # autograd through the generic formula, with ordinary (batchable) torch ops
            ga, gb = _generic_grads(ctx.plan, a, b, grad, need_a, need_b)
        elif ctx.plan.triton is not None:
            ga, gb = ctx.plan.triton.backward(a, b, ctx.rows, grad, need_a, need_b)
        elif isinstance(ctx.rows, _CompiledRows):
            ga, gb = _compiled_backward(ctx.plan, a, b, ctx.rows, grad, need_a, need_b)
        else:
            ga, gb = _blocks.backward(ctx.plan, a, b, ctx.rows, grad, need_a, need_b)
        return ga, gb, None


def _generic_grads(plan: _blocks.Plan, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor,
                   need_a: bool, need_b: bool) -> tuple[Any, Any]:
    """The gradients by autograd through the generic formula (differentiable when grad mode
    is on, i.e. ``create_graph=True``)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x = a if create_graph else a.detach().requires_grad_(need_a)
        y = b if create_graph else b.detach().requires_grad_(need_b)
        wanted = [v for v, need in ((x, need_a), (y, need_b)) if need]
        grads = iter(torch.autograd.grad(_blocks.generic_rows(plan, x, y), wanted, grad,
                                         create_graph=create_graph))
    return (next(grads) if need_a else None, next(grads) if need_b else None)


def _accepts(y_true: Any, y_pred: Any) -> bool:
    if not float_tensors(y_true, y_pred):
        return False
    if y_pred.ndim == 0 and y_true.ndim == 0:
        return False
    if y_pred.device.type == "meta" or y_true.device.type == "meta":
        return False  # shapes without data: the blocks read values (``.item()``)
    return not _tracing()


def _run(op: str, y_true: Any, y_pred: Any, spaces: tuple[str, str], temperature: float,
         beta: float = 0.5) -> Any:
    if not _accepts(y_true, y_pred):
        return NotImplemented
    if _has_tangent(y_true, y_pred) or _batched(y_true, y_pred):
        # forward-mode AD and the legacy vmap: the blocked forward's ``out=`` ops have no
        # forward derivative nor batching rule; the generic formula has both
        return NotImplemented
    if "logits" in spaces and (temperature_limit(temperature, y_pred.dtype)
                               or temperature_flat(temperature, y_pred.dtype)):
        # a temperature that is 0 (or whose reciprocal is 0) in the dtype: the generic
        # kernel's T -> 0 (T -> inf) limit, with a zero derivative, where the blocks, the
        # compiled code and Triton would divide by it (-inf / inf: NaN at masked entries)
        return NotImplemented
    shape = torch.broadcast_shapes(y_true.shape, y_pred.shape)
    if 0 in shape:
        return NotImplemented
    # autograd keeps what it saves by reference: over memory that torch does not own (a NumPy
    # teacher converted without a copy, torch.from_numpy of a reused loader buffer) the values
    # at call time are kept in a private copy (``_private``), as on the Keras KL's fast path
    grad = torch.is_grad_enabled() and (y_true.requires_grad or y_pred.requires_grad)
    tri = _triton_for(y_true, y_pred, spaces)
    kinds = []
    sides = []
    for x, space in ((y_true, spaces[0]), (y_pred, spaces[1])):
        if space == "probs":  # Keras' clip, then logs: autograd differentiates these two ops
            # (clamp saves its input when it needs a gradient; its result is torch's own)
            x = torch.log(torch.clamp(_private(x) if grad and x.requires_grad else x,
                                      EPSILON, 1.0))
            space = "log_probs"
        elif grad:  # saved by ``_Fused``
            x = _private(x)
        kinds.append(space)
        sides.append(x.expand(shape).reshape(-1, shape[-1]))
    compiled = None if tri is not None else _compiled_module(y_pred.device, math.prod(shape))
    plan = _blocks.Plan(op, (kinds[0], kinds[1]), temperature, beta, tri, compiled)
    a, b = sides
    if grad:
        out: torch.Tensor = _Fused.apply(a, b, plan)
    else:
        out = _run_forward(plan, a, b)[0]
    return out.reshape(shape[:-1])


def kl(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float) -> Any:
    """``KL(P || Q)`` per row (P from ``y_true``), differentiable, or ``NotImplemented``."""
    return _run("kl", y_true, y_pred, spaces, temperature)


def reverse_kl(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float) -> Any:
    """``KL(Q || P)`` per row: the forward KL with the sides swapped."""
    return _run("kl", y_pred, y_true, (spaces[1], spaces[0]), temperature)


def js(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float,
       beta: float) -> Any:
    """The generalized Jensen-Shannon divergence per row, or ``NotImplemented``."""
    return _run("js", y_true, y_pred, spaces, temperature, beta)
