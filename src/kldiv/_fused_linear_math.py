"""Per-chunk math of the large-vocabulary path (:func:`kldiv.fused_linear_divergence`).

One chunk is ``rows`` tokens by the whole vocabulary: the student's logits ``s`` and the
teacher's ``t`` (both already divided by the temperature), in float32 or float64. For each
row this module gives the divergence between ``P = softmax(t)`` (teacher) and
``Q = softmax(s)`` (student) and, when asked, its gradient with respect to ``s``:

- ``"kl"``: ``KL(P || Q) = sum p (log p - log q)``; ``d/ds = q - p``.
- ``"reverse_kl"``: ``KL(Q || P) = sum q (log q - log p)``; ``d/ds = q (d - L)`` with
  ``d = log q - log p`` and ``L`` the row's loss.
- ``"js"``: ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``
  (``log m`` by ``logaddexp``); ``d/ds = q (g - sum q g)`` with
  ``g = (1 - beta) (log q - log m)``.

``0 log 0 = 0``: an entry whose probability is exactly 0 (a ``-inf`` logit) contributes 0 to
the loss and to the gradient. The log-sum-exp of each row is the stable max-shifted one
(the Triton kernel computes the same online over vocabulary blocks); ``exp(s - max)`` serves
both the normaliser and ``q``, so each side costs one exponential pass.

Written once against the array API standard (NumPy, CuPy, JAX, array-api-strict, ...); the
torch route has an in-place twin in :mod:`kldiv.backends.torch_fused`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ._libraries import device_library
from ._temperature import limit_logits, temperature_flat, temperature_limit, uniform_logits

__all__ = [
    "DIVERGENCES",
    "Plan",
    "auto_chunk_size",
    "available_memory",
    "chunk_terms",
    "divergence_rows",
    "divide_by_temperature",
    "log_softmax_parts",
]

DIVERGENCES = ("kl", "reverse_kl", "js")


@dataclass(frozen=True)
class Plan:
    """What one call computes, resolved and validated: the backends read nothing else."""

    divergence: str
    beta: float
    temperature: float
    chunk_size: int
    auto_chunk: bool = False
    """Whether ``chunk_size`` was chosen automatically (a backend whose chunks hold fewer
    buffers than :data:`CHUNK_BUFFERS` counts may choose again, by the same rule)."""

# full-size (rows, V) buffers that one chunk holds at its peak, per divergence: the two
# logits, the two probabilities and the divergence's own temporaries (torch's in-place route;
# the array-API route allocates a few more, freed as it goes)
CHUNK_BUFFERS = {"kl": 5, "reverse_kl": 5, "js": 7}

CPU_CHUNK_BYTES = 256 * 2**20
"""Cap on one chunk's temporaries on CPU: 256 rows at V=32768. Smaller chunks are slower:
the ``(rows, H) @ (H, V)`` products lose speed below a few hundred rows, and each chunk
rewrites the whole ``V x H`` weight gradient. Measured (N=1024, H=256, V=32768, float32,
forward and backward, CPU seconds of the process; the materialised formula: 1.5 s for KL,
2.6 s for JS): forward KL 1.84 s at 128 rows, 1.37 s at 256, 1.21 s at 512; JS 1.95 s,
1.42 s, 1.54 s. (Earlier code, fresh buffers per chunk: 11.1 s at 16 rows, 5.6 at 32, 3.5 at
64.) At 256 rows the peak stays far below a tenth of the formula's from N=4096 on."""

GPU_CHUNK_BYTES = 1024 * 2**20
"""Cap on one chunk's temporaries on a GPU, where larger matrix products pay off more."""


def log_softmax_parts(xp: ModuleType, x: Any) -> tuple[Any, Any]:
    """``(softmax(x), log_softmax(x))`` over the last axis, with one ``exp`` pass.

    A row of all ``-inf`` has no mass: probabilities 0 and log-probabilities ``-inf`` (as
    :func:`kldiv._spaces.log_softmax` gives), not NaN."""
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))  # an all -inf row: a finite shift
    e = xp.exp(x - m)
    z = xp.sum(e, axis=-1, keepdims=True)
    z = xp.where(z == 0, xp.ones_like(z), z)  # the all -inf row: e = 0, log z = 0
    return e / z, x - (m + xp.log(z))


def divide_by_temperature(xp: ModuleType, x: Any, temperature: float) -> Any:
    """``x / temperature`` as the log-softmax sees it: for ``temperature < 1`` each row is
    first shifted by its maximum (a finite one; an all ``-inf`` row is left as it is), so
    that a tiny temperature cannot overflow ``x / T`` to ``inf`` (``inf - inf``: NaN) where
    the log-softmax of ``x / T`` is defined. The log-softmax is unchanged (it is
    shift-invariant), and so is every divergence and its gradient with respect to ``x``.
    Dividing by ``T >= 1`` cannot overflow: no shift there. A temperature below ``x``'s
    dtype's smallest normal number is 0 in the dtype: the ``T -> 0`` limit is taken instead
    (:func:`kldiv._temperature.limit_logits`: 0 at the row maximum, ``-inf`` below it). A
    temperature whose reciprocal is below that number is infinite in the dtype (or its
    reciprocal is flushed to 0 by XLA): the ``T -> inf`` limit is taken instead
    (:func:`kldiv._temperature.uniform_logits`: 0, ``-inf`` kept), not ``-inf / inf = NaN``; each
    row is shifted by its maximum first, so that a row holding ``+inf`` stays NaN, as it is
    at every other temperature."""
    if temperature == 1.0:
        return x
    if temperature < 1.0:
        m = xp.max(x, axis=-1, keepdims=True)
        x = x - xp.where(xp.isfinite(m), m, xp.zeros_like(m))
        if temperature_limit(temperature, x.dtype):
            return limit_logits(xp, x)
        # x <= 0 now: a finite x whose x / T is beyond the dtype's range is -inf there
        # (probability 0), set before the division, which so never overflows (no warning
        # from a library that divides later, in Dask's tasks, out of reach of NumPy's error
        # state); -inf entries are divided as they are (their derivative is unchanged)
        lowest = -temperature * float(xp.finfo(x.dtype).max)
        beyond = (x < lowest) & (x > -math.inf)
        return xp.where(beyond, xp.full_like(x, -math.inf), x) / temperature
    elif temperature_flat(temperature, x.dtype):
        m = xp.max(x, axis=-1, keepdims=True)
        return uniform_logits(xp, x - xp.where(m == -math.inf, xp.zeros_like(m), m))
    return x / temperature


def _log_ratio(xp: ModuleType, la: Any, lb: Any) -> Any:
    """``la - lb`` for log-probabilities, ``-inf`` where ``la`` is ``-inf``: never the
    undefined ``-inf - (-inf)`` (whose term :func:`_xlogy_terms` drops anyway). Nothing
    undefined is formed at all, so a library that evaluates later (Dask's tasks, out of
    reach of NumPy's error state) warns about nothing either."""
    return la - xp.where(la == -math.inf, xp.zeros_like(lb), lb)


def _xlogy_terms(xp: ModuleType, prob: Any, diff: Any) -> Any:
    """``prob * diff`` with ``0 * anything = 0`` (NaN in ``prob`` still propagates), except
    ``diff = +inf``: ``prob`` is then 0 only by underflow (its log is finite; a true 0 has a
    ``-inf`` log, so ``diff`` from :func:`_log_ratio` is ``-inf``), and the term is ``+inf``,
    as in the family functions (:func:`kldiv._divergence.kl_terms`). ``0 * inf`` is never
    formed (the product sees 0 where ``prob`` is 0)."""
    zero = prob == 0
    return xp.where(zero, _underflow_term(xp, diff),
                    prob * xp.where(zero, xp.zeros_like(diff), diff))


def _underflow_term(xp: ModuleType, diff: Any) -> Any:
    """The term of a probability that is 0 in the dtype: ``+inf`` against ``diff = +inf`` (the
    other side's probability is exactly 0), else 0; a constant (no derivative)."""
    zero = xp.zeros_like(diff)
    return xp.where(diff == math.inf, zero + math.inf, zero)


def chunk_terms(
    xp: ModuleType, s: Any, t: Any, divergence: str, beta: float, need_grad: bool
) -> tuple[Any, Any]:
    """Per-row divergence of a chunk, and ``d loss_row / d s`` (``None`` unless asked).

    Parameters
    ----------
    xp : module
        The array-API namespace of ``s`` and ``t``.
    s, t : array
        Student and teacher logits, ``(rows, V)``, already divided by the temperature.
    divergence : {"kl", "reverse_kl", "js"}
    beta : float
        The generalized Jensen-Shannon weight (``"js"`` only), in (0, 1).
    need_grad : bool
        Whether to return the gradient with respect to ``s``.

    Returns
    -------
    (loss, grad)
        ``loss`` of shape ``(rows,)``; ``grad`` of shape ``(rows, V)`` or ``None``.
    """
    q, lq = log_softmax_parts(xp, s)
    p, lp = log_softmax_parts(xp, t)
    grad = None
    if divergence == "kl":
        loss = xp.sum(_xlogy_terms(xp, p, _log_ratio(xp, lp, lq)), axis=-1)
        if need_grad:  # q sum(p) - p: sum(p) is 0 for a teacher row of no mass
            grad = xp.where(xp.sum(p, axis=-1, keepdims=True) > 0, q, xp.zeros_like(q)) - p
    elif divergence == "reverse_kl":
        d = _log_ratio(xp, lq, lp)
        loss = xp.sum(_xlogy_terms(xp, q, d), axis=-1)
        if need_grad:
            grad = _xlogy_terms(xp, q, d - xp.expand_dims(loss, axis=-1))
    else:
        lm = xp.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        a = _log_ratio(xp, lq, lm)
        loss = beta * xp.sum(_xlogy_terms(xp, p, _log_ratio(xp, lp, lm)), axis=-1) + (
            1 - beta) * xp.sum(_xlogy_terms(xp, q, a), axis=-1)
        if need_grad:
            g = _xlogy_terms(xp, q, (1 - beta) * a)
            grad = g - q * xp.sum(g, axis=-1, keepdims=True)
    return loss, grad


def _xlogy_smooth(xp: ModuleType, prob: Any, diff: Any) -> Any:
    """``prob * diff`` with ``0 * anything = 0``, whose derivatives (of any order) are 0, not
    NaN, where ``prob`` is 0: ``diff`` (``-inf`` there) is masked before the product too
    (``+inf`` against ``diff = +inf``, as :func:`_xlogy_terms`)."""
    zero = prob == 0
    return xp.where(zero, _underflow_term(xp, diff),
                    prob * xp.where(zero, xp.zeros_like(diff), diff))


def divergence_rows(xp: ModuleType, s: Any, t: Any, divergence: str, beta: float) -> Any:
    """Per-row divergence of a chunk, written to be differentiated by the array library.

    The same values as :func:`chunk_terms` (same arguments), built from operations whose
    derivatives of every order stay finite where a probability is 0 (``-inf`` logits): the
    route of the torch backend when autograd must see every operation (``torch.func``
    transforms, forward-mode AD), where a hand-written gradient cannot take part.
    """
    q, lq = log_softmax_parts(xp, s)
    p, lp = log_softmax_parts(xp, t)
    if divergence == "kl":
        return xp.sum(_xlogy_smooth(xp, p, lp - lq), axis=-1)
    if divergence == "reverse_kl":
        return xp.sum(_xlogy_smooth(xp, q, lq - lp), axis=-1)
    both = (p == 0) & (q == 0)  # log m = -inf there: keep logaddexp's arguments finite
    zero = xp.zeros_like(lp)
    lm = xp.where(both, zero, xp.logaddexp(xp.where(both, zero, lp + math.log(beta)),
                                           xp.where(both, zero, lq + math.log1p(-beta))))
    return beta * xp.sum(_xlogy_smooth(xp, p, lp - lm), axis=-1) + (1 - beta) * xp.sum(
        _xlogy_smooth(xp, q, lq - lm), axis=-1)


def available_memory(device: Any = None) -> int | None:
    """Free memory in bytes on ``device`` (a torch/JAX GPU), or the host's available memory."""
    if device is not None:
        free = _gpu_free(device)
        if free is not None:
            return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def on_accelerator(device: Any) -> bool:
    """True for a GPU device (a torch CUDA device, a CuPy device, a JAX GPU/TPU), told by
    the device object's own attributes, as :func:`available_memory` reads them."""
    if getattr(device, "type", None) == "cuda":  # a torch device
        return True
    if hasattr(device, "mem_info") and hasattr(device, "compute_capability"):  # CuPy's
        return True
    return getattr(device, "platform", "cpu") != "cpu"  # a JAX device


def _gpu_free(device: Any) -> int | None:
    if getattr(device, "type", None) == "cuda":  # a torch device: its adapter asks
        lib = device_library(device)
        return None if lib is None else lib.free_memory(device)
    mem_info = getattr(device, "mem_info", None)  # a CuPy device: (free, total)
    if isinstance(mem_info, tuple):
        return int(mem_info[0])
    stats = getattr(device, "memory_stats", None)  # a JAX device
    if callable(stats) and getattr(device, "platform", "cpu") != "cpu":
        try:
            s = stats() or {}
            return int(s["bytes_limit"] - s["bytes_in_use"])
        except Exception:
            return None
    return None


def auto_chunk_size(
    n_rows: int, vocab: int, *, itemsize: int, buffers: float, on_gpu: bool,
    available: int | None, cap: int | None = None,
) -> int:
    """Rows per chunk when the caller gives none.

    The largest power of two (at least 1) whose ``buffers`` full-size ``(rows, vocab)``
    temporaries fit in ``min(available / 16, cap)``, with ``cap`` 256 MiB on CPU and 1 GiB on
    a GPU (``available``: the device's free memory; the cap alone when unknown), or all the
    rows when there are fewer. So peak memory grows with ``chunk_size x V``, never with the
    token count. ``cap`` replaces the device's default cap.
    """
    if cap is None:
        cap = GPU_CHUNK_BYTES if on_gpu else CPU_CHUNK_BYTES
    budget = cap if available is None else max(min(cap, available // 16), 1)
    rows = max(1, int(budget // max(1.0, buffers * vocab * itemsize)))
    rows = 1 << (rows.bit_length() - 1)
    return max(1, min(rows, max(1, n_rows)))
