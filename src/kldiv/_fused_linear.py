"""The divergence from hidden states, without materialising the ``(tokens, V)`` logits.

:func:`fused_linear_divergence` and its loss class :class:`FusedLinearDivergence`. This module
validates, resolves the chunk size and the reduction's per-token weights, and dispatches:
to the library's own route where the libraries table lists one (op ``fused_linear`` among its
fast-path modules: :mod:`kldiv.backends.torch_fused` and :mod:`kldiv.backends.jax_fused`,
with gradients), and every other array-API library (NumPy, CuPy, ...) through the
forward-only loop below. The input checks are
:mod:`kldiv._fused_linear_checks`, the per-chunk math :mod:`kldiv._fused_linear_math`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from ._convert import call_time_values
from ._dispatch import library_op
from ._fused_linear_checks import BATCHMEAN, check_arrays, check_shapes, validate_options
from ._fused_linear_math import (
    CHUNK_BUFFERS,
    Plan,
    auto_chunk_size,
    available_memory,
    chunk_terms,
    divide_by_temperature,
    on_accelerator,
)
from ._namespace import get_device, is_dask
from ._reduction import Reduction, apply_sample_weight
from ._temperature import temperature_flat, temperature_limit

__all__ = ["FusedLinearDivergence", "fused_linear_divergence"]

# ------------------------------------------------------------------------------- reductions
def _weights(xp: ModuleType, h: Any, tokens: tuple[int, ...], sample_weight: Any,
             dtype: Any, peer: Any) -> tuple[Any, Any]:
    """``(w, w_flat)``: the sample weight as the loss classes apply it (Keras 2 rank rules)
    to the per-token loss, and broadcast to one value per token (flat).

    ``w`` multiplies the per-token losses (``reduction="none"``) or becomes the reduction's
    per-token factors, which autograd may keep for the backward pass of ``peer`` (a student
    input that needs a gradient): a weight over memory torch does not own (a NumPy array
    converted without a copy, ``torch.from_numpy``) is copied, so that refilling its buffer
    before ``backward()`` cannot change the gradient
    (:func:`kldiv._convert.call_time_values`).
    """
    if sample_weight is None:
        return None, None
    dummy = xp.zeros(tokens, dtype=dtype, device=get_device(h))
    _, w = apply_sample_weight(xp, dummy, sample_weight)
    w = call_time_values(w, peer)
    w_flat = xp.reshape(xp.broadcast_to(w, tokens), (-1,))
    return w, w_flat


def _scale(xp: ModuleType, reduction: str, tokens: tuple[int, ...], w_flat: Any, n: int,
           dtype: Any, device: Any) -> Any:
    """Per-token factors ``c`` with ``result = sum(loss * c)`` (``None`` for "none")."""
    if reduction == Reduction.NONE:
        return None
    base = w_flat if w_flat is not None else xp.ones((n,), dtype=dtype, device=device)
    if reduction == Reduction.SUM:
        return base
    if reduction == Reduction.MEAN_WITH_SAMPLE_WEIGHT and w_flat is not None:
        denom = xp.sum(w_flat)
        zero = denom == 0  # all masked: 0, with zero gradients
        return xp.where(zero, xp.zeros_like(base), base / xp.where(zero, xp.ones_like(denom), denom))
    if reduction == BATCHMEAN:
        return base / (tokens[0] if tokens and tokens[0] else 1)
    return base / max(n, 1)


def _without_empty_blocks(x: Any) -> Any:
    """A Dask array without blocks of size 0 (chunks such as ``((3, 0, 7), ...)``, what
    ``x[mask]`` then ``compute_chunk_sizes()`` gives): Dask's own ``max`` fails on such a
    block, and its matrix products and concatenations mismatch blocks with a neighbour's
    empty one at ``compute()``. An axis of length 0 becomes one block; nothing else
    changes (other arrays are returned as they are)."""
    if not is_dask(x) or not any(0 in c and len(c) > 1 for c in x.chunks):
        return x
    return x.rechunk(tuple(tuple(n for n in c if n) or (0,) for c in x.chunks))


# -------------------------------------------------------------------------------- backends
def _generic_forward(xp: ModuleType, h2: Any, w: Any, b: Any, teacher: dict[str, Any],
                     plan: Plan, cd: Any) -> Any:
    """Per-token losses through the array-API chunk math (NumPy, CuPy, ...): forward only."""
    n = h2.shape[0]
    w_t = xp.astype(w, cd, copy=False).T
    b_ = None if b is None else xp.astype(b, cd, copy=False)
    if "logits" not in teacher:
        tw_t = xp.astype(teacher["weight"], cd, copy=False).T
        tb_ = None if teacher.get("bias") is None else xp.astype(teacher["bias"], cd, copy=False)
    losses = []
    for i0 in range(0, n, plan.chunk_size):
        i1 = min(n, i0 + plan.chunk_size)
        s = xp.matmul(xp.astype(h2[i0:i1, ...], cd, copy=False), w_t)
        if b_ is not None:
            s = s + b_
        if "logits" in teacher:
            t = xp.astype(teacher["logits"][i0:i1, ...], cd, copy=False)
        else:
            t = xp.matmul(xp.astype(teacher["hidden"][i0:i1, ...], cd, copy=False), tw_t)
            if tb_ is not None:
                t = t + tb_
        s = divide_by_temperature(xp, s, plan.temperature)
        t = divide_by_temperature(xp, t, plan.temperature)
        losses.append(chunk_terms(xp, s, t, plan.divergence, plan.beta, False)[0])
        del s, t
    if not losses:
        return xp.zeros((0,), dtype=cd, device=get_device(h2))
    return xp.concat(losses) if len(losses) > 1 else losses[0]


def _constant(lib: str, x: Any) -> Any:
    """``x`` cut off from differentiation (sample weights are constants): the library
    route's ``stop_gradient`` (none where there is no route: no gradients either)."""
    stop = library_op(lib, "stop_gradient")
    return x if stop is None else stop(x)


def _zero_link(xp: ModuleType, *arrays: Any) -> Any:
    """0, depending on ``arrays`` (``None`` skipped) with a zero gradient (finite even where
    an array holds ``inf`` or NaN): what ties a value computed on constants to the inputs
    that autograd asks gradients of."""
    link = None
    for x in arrays:
        if x is not None:
            z = xp.sum(xp.where(xp.isfinite(x), x, xp.zeros_like(x))) * 0.0
            link = z if link is None else link + z
    return link


def _compute_dtype(xp: ModuleType, *arrays: Any) -> Any:
    """float32, or float64 where an input is float64, or an input's own dtype where it is
    wider still (NumPy's ``longdouble``: never computed in less than double precision)."""
    wide = [x.dtype for x in arrays if x is not None and x.dtype != xp.float64
            and getattr(x.dtype, "itemsize", 0) > 8]
    if wide:
        return max(wide, key=lambda dt: dt.itemsize)
    return xp.float64 if any(x is not None and x.dtype == xp.float64 for x in arrays) \
        else xp.float32


def fused_linear_divergence(
    student_hidden: Any,
    student_weight: Any,
    teacher_logits: Any = None,
    *,
    teacher_hidden: Any = None,
    teacher_weight: Any = None,
    student_bias: Any = None,
    teacher_bias: Any = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    sample_weight: Any = None,
    reduction: str | None = "mean_with_sample_weight",
    chunk_size: int | None = None,
) -> Any:
    """A divergence between teacher and student token distributions, from hidden states.

    The student's logits are ``student_hidden @ student_weight.T (+ student_bias)``; they are
    formed ``chunk_size`` tokens at a time and never all at once, nor are their
    log-probabilities or their gradient, so memory grows with ``chunk_size x V`` and
    ``V x H``, not with the number of tokens. Both sides' logits are divided by
    ``temperature`` and log-softmaxed (stably, in float32 or wider; below 1 the rows are
    shifted by their maximum before the division, so a tiny temperature cannot overflow),
    then

    - ``"kl"``: ``KL(teacher || student) = sum p (log p - log q)``;
    - ``"reverse_kl"``: ``KL(student || teacher) = sum q (log q - log p)``;
    - ``"js"``: ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``,
      ``P`` the teacher's distribution (Liger's and TRL's ``beta`` mean the same).

    ``-inf`` logits are allowed (``0 log 0 = 0``). The result is not multiplied by
    ``temperature**2`` (multiply it yourself for Hinton's scaling).

    Parameters
    ----------
    student_hidden : array, shape (..., H)
        The student's last hidden states; the leading axes are the tokens.
    student_weight : array, shape (V, H)
        The student's output projection (``lm_head.weight``).
    teacher_logits : array, shape (..., V), optional
        The teacher's logits. Or give ``teacher_hidden`` and ``teacher_weight`` instead.
    teacher_hidden : array, shape (..., H_t), optional
    teacher_weight : array, shape (V, H_t), optional
    student_bias, teacher_bias : array, shape (V,), optional
    divergence : {"kl", "reverse_kl", "js"}, default "kl"
    beta : float, default 0.5
        The Jensen-Shannon weight, in the open interval (0, 1) (``"js"`` only).
    temperature : float, default 1.0
        Divides both sides' logits; must be > 0. One that is 0 in the compute dtype is the
        ``T -> 0`` limit (the argmax), one whose reciprocal is (from ``2**126`` in float32)
        the ``T -> inf`` limit (uniform over the entries that are not ``-inf``): both flat,
        with zero gradients.
    sample_weight : array, optional
        Per-token weights or a mask, e.g. ``labels != -100``, with the loss classes' rank
        rules; constant (no gradient flows to it).
    reduction : str or None, default "mean_with_sample_weight"
        ``"mean_with_sample_weight"``: ``sum(loss * w) / sum(w)`` (the mean over unmasked
        tokens; 0, with zero gradients, when all are masked); ``"sum"``; ``"auto"`` /
        ``"sum_over_batch_size"`` / ``"mean"``: ``sum(loss * w)`` over the number of tokens;
        ``"batchmean"``: ``sum(loss * w)`` over the size of the first token axis; ``"none"``
        (or ``None``): ``loss * w`` per token, of shape ``student_hidden.shape[:-1]``.
    chunk_size : int, optional
        Tokens per chunk. By default the largest power of two whose chunk temporaries (five
        to seven ``(chunk_size, V)`` float32 buffers) fit in ``min(free memory / 16, cap)``,
        ``cap`` 256 MiB on CPU, 1 GiB on a GPU; torch on CUDA with Triton counts its three
        buffers against a 512 MiB cap where it forms the weight gradient by vocabulary slabs
        (half-precision weights), 2 GiB where it accumulates it over chunks (larger chunks
        make that accumulation cheaper); see ``docs/large-vocabulary.md``.

    Returns
    -------
    array
        In ``student_hidden``'s library, device and dtype (float16/bfloat16 inputs are
        computed in float32 and the result rounded back).

    Notes
    -----
    Gradients (torch autograd, ``jax.grad``/``jit``) flow to ``student_hidden``,
    ``student_weight`` and ``student_bias``; the teacher's side is a constant (detached).
    NumPy, CuPy and other array-API libraries compute the value only. Under
    ``torch.compile`` the call is a graph break (it runs eagerly). ``torch.func``
    transforms and forward-mode AD run a differentiable chunked formula instead of the
    fused route; ``create_graph=True`` through the fused route is a ``RuntimeError``; JAX
    forward mode (``jax.jvp``) is refused by JAX (see ``docs/large-vocabulary.md``). The
    gradient uses the inputs' values at call time: inputs kept for the backward pass over
    memory torch did not allocate (NumPy, ``torch.from_numpy``) are copied.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> rng = np.random.default_rng(0)
    >>> hidden = rng.standard_normal((2, 3, 8)).astype(np.float32)   # (batch, time, H)
    >>> weight = rng.standard_normal((50, 8)).astype(np.float32)     # (V, H)
    >>> teacher = rng.standard_normal((2, 3, 50)).astype(np.float32)
    >>> loss = kldiv.fused_linear_divergence(hidden, weight, teacher, chunk_size=4)
    >>> loss.shape, loss.dtype
    ((), dtype('float32'))
    >>> kldiv.fused_linear_divergence(hidden, weight, teacher, reduction="none").shape
    (2, 3)
    """
    divergence, beta, temperature, reduction, chunk_size = validate_options(
        divergence, beta, temperature, reduction, chunk_size)
    h, w, b = student_hidden, student_weight, student_bias
    tl, th, tw, tb = teacher_logits, teacher_hidden, teacher_weight, teacher_bias
    xp, lib = check_arrays({"student_hidden": h, "student_weight": w, "student_bias": b,
                       "teacher_logits": tl, "teacher_hidden": th, "teacher_weight": tw,
                       "teacher_bias": tb})
    if h is None or w is None:
        raise TypeError("student_hidden and student_weight are required arrays.")
    check_shapes(h, w, b, tl, th, tw, tb)
    h, w, b, tl, th, tw, tb, sample_weight = (
        _without_empty_blocks(x) for x in (h, w, b, tl, th, tw, tb, sample_weight))
    tokens = tuple(int(d) for d in h.shape[:-1])
    n, v, hid = math.prod(tokens), int(w.shape[0]), int(h.shape[-1])
    cd = _compute_dtype(xp, h, w)
    device = get_device(h)
    auto = chunk_size is None
    if chunk_size is None:
        on_gpu = on_accelerator(device)
        itemsize = 4 if cd == xp.float32 else 8 if cd == xp.float64 else 16
        chunk_size = auto_chunk_size(n, v, itemsize=itemsize, buffers=CHUNK_BUFFERS[divergence],
                                     on_gpu=on_gpu, available=available_memory(device))
    plan = Plan(divergence, beta, temperature, max(1, min(chunk_size, max(n, 1))), auto)
    peer = next((x for x in (h, w, b) if getattr(x, "requires_grad", False)), h)
    w_shaped, w_flat = _weights(xp, h, tokens, sample_weight, cd, peer)
    scale = _scale(xp, reduction, tokens, w_flat, n, cd, device)
    h2 = xp.reshape(h, (n, hid))
    if tl is not None:
        teacher: dict[str, Any] = {"logits": xp.reshape(tl, (n, v))}
    else:
        teacher = {"hidden": xp.reshape(th, (n, int(th.shape[-1]))), "weight": tw, "bias": tb}
    route = library_op(lib, "fused_linear")  # the library's own, with gradients
    # T is 0 in the compute dtype, or 1 / T is: the T -> 0 or T -> inf limit, flat in the inputs
    limit = temperature_limit(temperature, cd) or temperature_flat(temperature, cd)
    if route is not None and not limit:
        out = route(h2, w, b, teacher, plan, scale)
    else:
        args = (h2, w, b, teacher)
        if route is not None:  # the limit is flat: computed on constants, zero gradients
            args = (_constant(lib, h2), _constant(lib, w), None if b is None else _constant(lib, b),
                    {k: None if x is None else _constant(lib, x) for k, x in teacher.items()})
        # NumPy: the masked terms of -inf logits (0 * inf, -inf - -inf, documented input)
        # are replaced, not warned about; a half result beyond its range is inf
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            out = _generic_forward(xp, *args, plan, cd)
            if scale is not None:
                out = xp.sum(out * scale)
        if route is not None:
            out = out + _zero_link(xp, h2, w, b)
    if reduction == Reduction.NONE:
        out = xp.reshape(out, tokens)
        if w_shaped is not None:
            out = out * _constant(lib, w_shaped)
    if out.dtype == h.dtype:
        return out
    return _astype_quietly(xp, out, h.dtype)


def _cast_block(block: Any, dtype: Any) -> Any:
    with np.errstate(over="ignore"):
        return block.astype(dtype)


def _astype_quietly(xp: ModuleType, out: Any, dtype: Any) -> Any:
    """``out`` in ``dtype``: ``inf`` beyond a half dtype's range (documented), without
    NumPy's overflow warning, also where Dask casts later, in its tasks (out of reach of an
    error state set here)."""
    if is_dask(out):
        return out.map_blocks(functools.partial(_cast_block, dtype=dtype), dtype=dtype)
    with np.errstate(over="ignore"):
        return xp.astype(out, dtype)


class FusedLinearDivergence:
    """Loss class of :func:`fused_linear_divergence`: options once, arrays per call.

    Parameters
    ----------
    divergence : {"kl", "reverse_kl", "js"}, default "kl"
    beta : float, default 0.5
    temperature : float, default 1.0
    reduction : str or None, default "mean_with_sample_weight"
    chunk_size : int, optional
    name : str, default "fused_linear_divergence"

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> rng = np.random.default_rng(0)
    >>> hidden = rng.standard_normal((6, 8)).astype(np.float32)
    >>> weight = rng.standard_normal((50, 8)).astype(np.float32)
    >>> teacher = rng.standard_normal((6, 50)).astype(np.float32)
    >>> loss_fn = kldiv.FusedLinearDivergence("js", beta=0.5, temperature=2.0)
    >>> float(loss_fn(hidden, weight, teacher, sample_weight=[1, 1, 1, 1, 0, 0])) > 0
    True
    >>> loss_fn.get_config()["divergence"]
    'js'
    """

    def __init__(self, divergence: str = "kl", *, beta: float = 0.5, temperature: float = 1.0,
                 reduction: str | None = "mean_with_sample_weight",
                 chunk_size: int | None = None, name: str = "fused_linear_divergence") -> None:
        (self.divergence, self.beta, self.temperature, self.reduction,
         self.chunk_size) = validate_options(divergence, beta, temperature, reduction, chunk_size)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")
        self.name = str(name)  # a plain str (np.str_ would show as np.str_('...') in configs)

    def __call__(self, student_hidden: Any, student_weight: Any, teacher_logits: Any = None, *,
                 teacher_hidden: Any = None, teacher_weight: Any = None,
                 student_bias: Any = None, teacher_bias: Any = None,
                 sample_weight: Any = None) -> Any:
        """The reduced (or per-token) divergence; see :func:`fused_linear_divergence`."""
        return fused_linear_divergence(
            student_hidden, student_weight, teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
            divergence=self.divergence, beta=self.beta, temperature=self.temperature,
            sample_weight=sample_weight, reduction=self.reduction, chunk_size=self.chunk_size)

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments."""
        return {"divergence": self.divergence, "beta": self.beta,
                "temperature": self.temperature, "reduction": self.reduction,
                "chunk_size": self.chunk_size, "name": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FusedLinearDivergence:
        """Rebuild from :meth:`get_config` output; unknown keys raise ``TypeError``."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict (get_config()'s output), got "
                            f"{type(config).__name__}.")
        config = dict(config)
        unknown = set(config) - {"divergence", "beta", "temperature", "reduction",
                                 "chunk_size", "name"}
        if unknown:
            raise TypeError(f"Unknown FusedLinearDivergence config keys: {sorted(unknown)}.")
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FusedLinearDivergence):
            return NotImplemented
        return self.get_config() == other.get_config()

    def __hash__(self) -> int:
        """Agrees with ``==`` (one class, equal configs); ``jax.jit(loss_fn)`` needs it."""
        return hash(type(self))
