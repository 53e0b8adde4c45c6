"""Input checks of :func:`kldiv.fused_linear_divergence`: options, arrays, shapes.

Every mistake is a ``TypeError`` or ``ValueError`` naming the argument, raised before any
chunk is computed.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any

import numpy as np

from ._convert import check_dense
from ._dispatch import library_op
from ._fused_linear_math import DIVERGENCES
from ._namespace import array_namespace, dtype_kind, get_device, is_array, namespace_name
from ._reduction import Reduction, validate_reduction
from ._spaces import _real, shape_str

__all__ = ["BATCHMEAN", "check_arrays", "check_shapes", "validate_options"]

BATCHMEAN = "batchmean"


def validate_options(divergence: Any, beta: Any, temperature: Any, reduction: Any,
                     chunk_size: Any) -> tuple[str, float, float, str, int | None]:
    """Canonical ``(divergence, beta, temperature, reduction, chunk_size)``, or a clear error."""
    if not isinstance(divergence, str) or divergence.lower() not in DIVERGENCES:
        raise ValueError(
            f"Invalid divergence {divergence!r}. Expected one of: "
            + ", ".join(repr(d) for d in DIVERGENCES) + "."
        )
    divergence = divergence.lower()
    beta = _real(beta, "beta")
    if divergence == "js" and not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta must be in the open interval (0, 1) for divergence='js', got {beta!r}: at 0 "
            "and 1 the generalized Jensen-Shannon divergence vanishes. For KL(teacher || "
            "student) (Liger's and TRL's beta=0) use divergence='kl'; for KL(student || "
            "teacher) (their beta=1) use divergence='reverse_kl'."
        )
    temperature = _real(temperature, "temperature")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if isinstance(reduction, str) and reduction == BATCHMEAN:  # exact, as every name
        reduction = BATCHMEAN
    else:
        try:
            reduction = validate_reduction(reduction)
        except ValueError:
            raise ValueError(
                f"Invalid reduction {reduction!r}. Expected one of: "
                + ", ".join(repr(r) for r in dict.fromkeys((*Reduction.all(), BATCHMEAN)))
                + " or None."
            ) from None
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(
                f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}."
            )
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        chunk_size = int(chunk_size)
    return divergence, beta, temperature, reduction, chunk_size


def check_arrays(named: dict[str, Any]) -> tuple[ModuleType, str]:
    """The common namespace of the given arrays; TypeError for non-arrays, mixed libraries,
    non-floating dtypes; ValueError for mixed devices."""
    xp = lib = device = first = None
    for what, x in named.items():
        if x is None:
            continue
        # Python and NumPy scalars are not arrays, whatever kldiv has seen before
        # (``is_array`` answers from a per-type cache that other calls fill, and NumPy's
        # float64 scalar is a Python float)
        if isinstance(x, (numbers.Number, np.generic)) or not is_array(x):
            raise TypeError(f"{what} must be an array (NumPy, torch, JAX, CuPy, ...), "
                            f"got {type(x).__name__}.")
        check_dense(x, what)  # a sparse tensor has no matrix products or slices here
        if isinstance(x, np.ma.MaskedArray):  # a mask cannot take part in a matrix product
            raise TypeError(
                f"{what} is a masked array: its mask cannot take part in the matrix products. "
                "Pass x.filled(...) (or np.asarray(x)), and give a token mask as "
                "sample_weight.")
        _check_sizes(x, what)
        x_xp = array_namespace(x)
        x_lib = namespace_name(x_xp)
        if xp is None:
            xp, lib, device, first = x_xp, x_lib, get_device(x), what
        elif x_lib != lib:
            raise TypeError(f"All arrays must come from one library: {first} is {lib}, "
                            f"{what} is {x_lib}.")
        elif device is not None and get_device(x) is not None and \
                str(get_device(x)) != str(device):  # a JAX tracer has no device
            raise ValueError(f"All arrays must be on one device: {first} is on {device}, "
                             f"{what} is on {get_device(x)}.")
        if dtype_kind(x.dtype) != "float":
            raise TypeError(f"{what} must have a floating dtype, got {x.dtype}.")
    assert xp is not None and lib is not None
    if library_op(lib, "fused_linear") is None:  # the generic route: value only
        missing = [f for f in _GENERIC_FUNCTIONS if not hasattr(xp, f)]
        if missing:  # e.g. TensorFlow tensors, which kldiv's loss functions take
            raise TypeError(
                f"fused_linear_divergence does not support {lib} arrays (their namespace "
                f"has no {missing[0]}). Pass NumPy, CuPy or other array-API arrays (value "
                "only), or torch or JAX arrays (with gradients).")
    return xp, lib


def _check_sizes(x: Any, what: str) -> None:
    """``ValueError`` for an axis of unknown size (a Dask array after boolean indexing: NaN):
    the chunks are planned from the token count and the shapes must match."""
    shape = tuple(x.shape)
    if any(d is None or (isinstance(d, float) and math.isnan(d)) for d in shape):
        hint = " Call x.compute_chunk_sizes() first." if hasattr(x, "compute_chunk_sizes") \
            else ""
        known = tuple(None if d is None or d != d else d for d in shape)
        raise ValueError(f"{what} has an unknown size (shape {shape_str(known)}): "
                         f"fused_linear_divergence needs known sizes.{hint}")


_GENERIC_FUNCTIONS = ("astype", "broadcast_to", "concat", "exp", "expand_dims", "finfo",
                      "full_like", "isfinite", "log", "logaddexp", "matmul", "max", "ones",
                      "ones_like", "reshape", "sum", "where", "zeros", "zeros_like")
"""What the forward-only loop (``kldiv._fused_linear._generic_forward``) and the reductions call."""


def check_shapes(h: Any, w: Any, b: Any, tl: Any, th: Any, tw: Any, tb: Any) -> None:
    if h.ndim < 1:
        raise ValueError("student_hidden must have at least one axis (..., H), got a 0-d array.")
    if w.ndim != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"student_weight must have shape (V, H) = (V, {h.shape[-1]}) to match "
                         f"student_hidden {shape_str(tuple(h.shape))}; got {shape_str(tuple(w.shape))}.")
    v, tokens = w.shape[0], tuple(h.shape[:-1])
    if v == 0:
        raise ValueError("student_weight has no rows (V = 0): the divergence between "
                         "distributions over an empty vocabulary is undefined.")
    if b is not None and tuple(b.shape) != (v,):
        raise ValueError(f"student_bias must have shape ({v},) (V of student_weight "
                         f"{shape_str(tuple(w.shape))}); got {shape_str(tuple(b.shape))}.")
    if (tl is None) == (th is None and tw is None):
        raise ValueError("Give the teacher either as teacher_logits or as teacher_hidden with "
                         "teacher_weight (and optionally teacher_bias), not both and not neither.")
    if tl is not None:
        if tb is not None:
            raise ValueError("teacher_bias goes with teacher_hidden/teacher_weight, not with "
                             "teacher_logits (add it to the logits).")
        if tuple(tl.shape) != (*tokens, v):
            raise ValueError(f"teacher_logits must have shape {shape_str((*tokens, v))} (the tokens "
                             f"of student_hidden {shape_str(tuple(h.shape))} by V of student_weight "
                             f"{shape_str(tuple(w.shape))}); got {shape_str(tuple(tl.shape))}.")
        return
    if th is None or tw is None:
        raise ValueError("teacher_hidden and teacher_weight go together: give both "
                         f"(got {'teacher_hidden' if th is not None else 'teacher_weight'} only).")
    if th.ndim < 1 or tuple(th.shape[:-1]) != tokens:
        raise ValueError(f"teacher_hidden must have shape {shape_str((*tokens, 'H_t'))} (the tokens "
                         f"of student_hidden {shape_str(tuple(h.shape))}); got "
                         f"{shape_str(tuple(th.shape))}.")
    if tw.ndim != 2 or tuple(tw.shape) != (v, th.shape[-1]):
        raise ValueError(f"teacher_weight must have shape {shape_str((v, th.shape[-1]))} (V of "
                         f"student_weight, H_t of teacher_hidden {shape_str(tuple(th.shape))}); "
                         f"got {shape_str(tuple(tw.shape))}.")
    if tb is not None and tuple(tb.shape) != (v,):
        raise ValueError(f"teacher_bias must have shape ({v},); got {shape_str(tuple(tb.shape))}.")
