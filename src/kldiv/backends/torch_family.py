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

from .._divergence import MEMBERS, js_parts, kl_terms
from .._kernel import EPSILON
from .._libraries.torch_traced import array_api
from .._spaces import to_log_space
from .._switch import generic_forced
from .torch_ import _batched, _has_tangent, _private, _tracing, float_tensors, optional_module

__all__ = ["BLOCK_ELEMENTS", "COMPILE_MIN_ELEMENTS", "array_api", "js", "kl", "reverse_kl"]

BLOCK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 24}
"""Elements of one block of rows, per device type (others use the CUDA size)."""
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


# ------------------------------------------------------------------------------ block math
def _log(x: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """A block in log space: ``log_softmax(x / T)`` (torch's fused kernel) for logits, ``x``
    itself for log-probabilities. A row of all ``-inf`` logits gives NaN here: such blocks
    take the generic route (see :func:`_forward`)."""
    if kind == "log_probs":
        return x
    return torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)


def _prob(x: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    if kind == "log_probs":
        return torch.exp(x)
    return torch.softmax(x / temperature if temperature != 1.0 else x, dim=-1)


class _Plan:
    """One call's constants: the op, the sides' kinds, the temperature, ``beta``, the Triton
    module when it runs the call, and the compiled kernels' module when they run it."""

    __slots__ = ("beta", "compiled", "kinds", "op", "temperature", "triton")

    def __init__(self, op: str, kinds: tuple[str, str], temperature: float, beta: float,
                 triton: Any = None, compiled: Any = None) -> None:
        self.op, self.kinds, self.temperature, self.beta = op, kinds, temperature, beta
        self.triton, self.compiled = triton, compiled


def _run_forward(plan: _Plan, a: torch.Tensor, b: torch.Tensor) -> tuple[Any, Any]:
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
    value, r1, r2, generic_blocks = _forward(plan, a, b)
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
        """The blocks' ``rows`` (:func:`_backward`): the generic rows' blocks generic."""
        step = _step(a)
        idx = [] if self.generic is None else self.generic.tolist()
        return self.stats[0], self.stats[1], {(i // step) * step for i in idx}


def _logits(plan: _Plan) -> tuple[bool, bool]:
    return plan.kinds[0] == "logits", plan.kinds[1] == "logits"


def _compiled_forward(plan: _Plan, a: torch.Tensor, b: torch.Tensor, stats: tuple[Any, ...],
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
        _generic_block(plan, a[generic], b[generic], s1, s2)
        r1.index_copy_(0, generic, s1)
        if r2 is not None:
            r2.index_copy_(0, generic, s2)
        if value is not None:
            assert s2 is not None
            value.index_copy_(0, generic, torch.add(s1 * plan.beta, s2, alpha=1.0 - plan.beta))
    return r1 if value is None else value, _CompiledRows(stats, generic)


def _compiled_backward(plan: _Plan, a: torch.Tensor, b: torch.Tensor, rows: _CompiledRows,
                       grad: torch.Tensor, need_a: bool, need_b: bool) -> tuple[Any, Any]:
    """The compiled backward pass (the blocks' if compiling fails), the generic rows by
    autograd through the generic formula."""
    try:
        ga, gb = plan.compiled.backward(plan.op, a, b, rows.stats, grad, _logits(plan),
                                        plan.temperature, plan.beta, need_a, need_b)
    except Exception as exc:
        _compile_failed(exc)
        return _backward(plan, a, b, rows.blocks(a), grad, need_a, need_b)
    idx = rows.generic
    if idx is not None:
        sa = torch.empty_like(a[idx]) if need_a else None
        sb = torch.empty_like(b[idx]) if need_b else None
        _generic_block_grad(plan, a[idx], b[idx], grad[idx], sa, sb)
        if ga is not None:
            ga.index_copy_(0, idx, sa)
        if gb is not None:
            gb.index_copy_(0, idx, sb)
    return ga, gb


def _step(a: torch.Tensor) -> int:
    c = a.shape[-1]
    return max(1, BLOCK_ELEMENTS.get(a.device.type, BLOCK_ELEMENTS["cuda"]) // max(c, 1))


def _forward(plan: _Plan, a: torch.Tensor, b: torch.Tensor) -> tuple[Any, ...]:
    """Per-row value and what the backward pass needs: ``(value, r1, r2, generic_blocks)``.

    ``r1, r2`` are ``(KL, mass of P or None)`` for ``kl`` and ``(KL(P||M), KL(Q||M))`` for
    ``js``. A block whose rows come out NaN (a row of all ``-inf`` logits, or NaN inputs) is
    recomputed with the generic formula, which defines those rows exactly; its start is
    listed in ``generic_blocks`` so that the backward pass does the same.
    """
    n, _ = a.shape
    T = plan.temperature
    r1 = torch.empty(n, dtype=a.dtype, device=a.device)
    r2 = torch.empty_like(r1) if plan.op == "js" or plan.kinds[0] == "log_probs" else None
    generic_blocks: set[int] = set()
    step = _step(a)
    if plan.op == "js":
        log_b, log_1mb = math.log(plan.beta), math.log1p(-plan.beta)
    for r0 in range(0, n, step):
        s = slice(r0, min(n, r0 + step))
        la = _log(a[s], plan.kinds[0], T)
        lb = _log(b[s], plan.kinds[1], T)
        pa = torch.exp(la)
        if plan.op == "kl":
            d = la - lb
            # pa == 0: a -inf entry (0) or an underflow (0; +inf against lb = -inf)
            t = torch.where(pa == 0.0, torch.where(d == _INF, d, 0.0), pa * d)
            torch.sum(t, dim=-1, out=r1[s])
            if r2 is not None:
                torch.sum(pa, dim=-1, out=r2[s])
        else:
            assert r2 is not None
            lm = torch.logaddexp(la + log_b, lb + log_1mb)
            torch.sum((pa * (la - lm)).masked_fill_(pa == 0.0, 0.0), dim=-1, out=r1[s])
            pb = torch.exp(lb)
            torch.sum((pb * (lb - lm)).masked_fill_(pb == 0.0, 0.0), dim=-1, out=r2[s])
        # NaN rows, and logits rows whose log-softmax is NaN (all -inf, or a NaN logit: NaN
        # reaches every entry through the row maximum, so the first column tells)
        checks = [r1[s]] if r2 is None else [r1[s], r2[s]]
        checks += [x[:, 0] for x, kind in ((la, plan.kinds[0]), (lb, plan.kinds[1]))
                   if kind == "logits"]
        if bool(torch.isnan(torch.stack(checks)).any()):
            generic_blocks.add(r0)
            _generic_block(plan, a[s], b[s], r1[s], None if r2 is None else r2[s])
    if plan.op == "kl":
        value = r1
    else:
        assert r2 is not None
        value = torch.add(r1 * plan.beta, r2, alpha=1.0 - plan.beta)
    return value, r1, r2, generic_blocks


def _generic_block(plan: _Plan, a: torch.Tensor, b: torch.Tensor, r1: torch.Tensor,
                   r2: torch.Tensor | None) -> None:
    """The rows of one block by the generic formula, written into ``r1`` (and ``r2``)."""
    lp = to_log_space(array_api, a, plan.kinds[0], plan.temperature)
    lq = to_log_space(array_api, b, plan.kinds[1], plan.temperature)
    if plan.op == "kl":
        r1.copy_(kl_terms(array_api, lp, lq))
        if r2 is not None:
            r2.copy_(torch.sum(torch.exp(lp), dim=-1))
    else:
        assert r2 is not None
        kl_pm, kl_qm = js_parts(array_api, lp, lq, plan.beta)
        r1.copy_(kl_pm)
        r2.copy_(kl_qm)


def _backward(plan: _Plan, a: torch.Tensor, b: torch.Tensor, rows: tuple[Any, ...],
              grad: torch.Tensor, need_a: bool, need_b: bool) -> tuple[Any, Any]:
    """The closed-form gradients (module docstring), one block of rows at a time."""
    r1, r2, generic_blocks = rows
    n, _ = a.shape
    T = plan.temperature
    ga = torch.empty_like(a, memory_format=torch.contiguous_format) if need_a else None
    gb = torch.empty_like(b, memory_format=torch.contiguous_format) if need_b else None
    logits_a, logits_b = (k == "logits" for k in plan.kinds)
    beta = plan.beta
    if plan.op == "js":
        log_b, log_1mb = math.log(beta), math.log1p(-beta)
    step = _step(a)
    for r0 in range(0, n, step):
        s = slice(r0, min(n, r0 + step))
        g = grad[s].unsqueeze(-1)
        if r0 in generic_blocks:
            _generic_block_grad(plan, a[s], b[s], grad[s], None if ga is None else ga[s],
                                None if gb is None else gb[s])
            continue
        if plan.op == "kl":
            kl_ = r1[s].unsqueeze(-1)
            mass = 1.0 if r2 is None else r2[s].unsqueeze(-1)  # P from logits sums to 1
            if ga is not None:
                la = _log(a[s], plan.kinds[0], T)
                lb = _log(b[s], plan.kinds[1], T)
                pa = torch.exp(la)
                # G = p (lp - lq + 1), sum(G) = KL + mass: (G - p sum G) = p (lp - lq + 1 - KL - mass)
                shift = (1.0 - kl_ - mass) if logits_a else 1.0
                t = (pa * (la - lb + shift)).masked_fill_(pa == 0.0, 0.0)
                _finish(t, g, logits_a, T, out=ga[s])
            if gb is not None:
                pa = _prob(a[s], plan.kinds[0], T)
                # G = -p, sum(G) = -mass: (G - q sum G) = q mass - p
                if logits_b:
                    q = _prob(b[s], "logits", T)
                    t = (q if r2 is None else q.mul_(mass)).sub_(pa)
                else:
                    t = pa.neg_()
                _finish(t, g, logits_b, T, out=gb[s])
        else:
            assert r2 is not None
            la = _log(a[s], plan.kinds[0], T)
            lb = _log(b[s], plan.kinds[1], T)
            lm = torch.logaddexp(la + log_b, lb + log_1mb)
            if ga is not None:
                pa = torch.exp(la)
                shift = r1[s].unsqueeze(-1) if logits_a else 0.0
                t = (pa * (la - lm - shift)).masked_fill_(pa == 0.0, 0.0).mul_(beta)
                _finish(t, g, logits_a, T, out=ga[s])
            if gb is not None:
                pb = torch.exp(lb)
                shift = r2[s].unsqueeze(-1) if logits_b else 0.0
                t = (pb * (lb - lm - shift)).masked_fill_(pb == 0.0, 0.0).mul_(1.0 - beta)
                _finish(t, g, logits_b, T, out=gb[s])
    return ga, gb


def _finish(t: torch.Tensor, g: torch.Tensor, logits: bool, temperature: float,
            out: torch.Tensor) -> None:
    """``out = t * g`` (``/ T`` on a logits side)."""
    if logits and temperature != 1.0:
        g = g / temperature
    torch.mul(t, g, out=out)


def _generic_rows(plan: _Plan, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The generic formula with differentiable torch ops."""
    lp = to_log_space(array_api, a, plan.kinds[0], plan.temperature)
    lq = to_log_space(array_api, b, plan.kinds[1], plan.temperature)
    div = MEMBERS[plan.op]
    params = {"beta": plan.beta} if plan.op == "js" else {}
    out: torch.Tensor = div.generic(array_api, lp, lq, **params)
    return out


def _generic_block_grad(plan: _Plan, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor,
                        ga: torch.Tensor | None, gb: torch.Tensor | None) -> None:
    """One block's gradients by autograd through the generic formula (rows the closed forms
    do not cover: all ``-inf`` logits, NaN)."""
    with torch.enable_grad():
        x = a.detach().requires_grad_(ga is not None)
        y = b.detach().requires_grad_(gb is not None)
        wanted = [v for v in (x, y) if v.requires_grad]
        grads = iter(torch.autograd.grad(_generic_rows(plan, x, y), wanted, grad))
    if ga is not None:
        ga.copy_(next(grads))
    if gb is not None:
        gb.copy_(next(grads))


class _Fused(torch.autograd.Function):
    """Per-row divergence of two ``(rows, classes)`` tensors, fused forward and backward."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, plan: _Plan) -> torch.Tensor:
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
            ga, gb = _backward(ctx.plan, a, b, ctx.rows, grad, need_a, need_b)
        return ga, gb, None


def _generic_grads(plan: _Plan, a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor,
                   need_a: bool, need_b: bool) -> tuple[Any, Any]:
    """The gradients by autograd through the generic formula (differentiable when grad mode
    is on, i.e. ``create_graph=True``)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        x = a if create_graph else a.detach().requires_grad_(need_a)
        y = b if create_graph else b.detach().requires_grad_(need_b)
        wanted = [v for v, need in ((x, need_a), (y, need_b)) if need]
        grads = iter(torch.autograd.grad(_generic_rows(plan, x, y), wanted, grad,
                                         create_graph=create_graph))
    return (next(grads) if need_a else None, next(grads) if need_b else None)


def _accepts(y_true: Any, y_pred: Any) -> bool:
    if not float_tensors(y_true, y_pred):
        return False
    if y_pred.ndim == 0 and y_true.ndim == 0:
        return False
    return not _tracing()


def _run(op: str, y_true: Any, y_pred: Any, spaces: tuple[str, str], temperature: float,
         beta: float = 0.5) -> Any:
    if not _accepts(y_true, y_pred):
        return NotImplemented
    if _has_tangent(y_true, y_pred) or _batched(y_true, y_pred):
        # forward-mode AD and the legacy vmap: the blocked forward's ``out=`` ops have no
        # forward derivative nor batching rule; the generic formula has both
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
    plan = _Plan(op, (kinds[0], kinds[1]), temperature, beta, tri, compiled)
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
