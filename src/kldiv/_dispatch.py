"""The one dispatch: a member's options resolved once (:func:`resolve`), then
:func:`compute` on prepared inputs, for every member of the family and every library.

:func:`compute` runs, in ``y_pred``'s library and on its device (the library's device scope):

1. the fast path for ``(library, op)`` (:func:`fast_path`, from :mod:`kldiv._switch`): the
   function named ``op`` in the modules the libraries table lists for the library
   (``Library.fast_paths``, after one given to :func:`kldiv.backends.register`), unless
   switched off with :func:`use_generic` / ``KLDIV_GENERIC=1`` or while ``torch.compile``
   traces. A fast path may decline a call by returning ``NotImplemented``;
2. else the member's generic array-API kernel (:class:`kldiv._divergence.Divergence`), in the
   namespace the table names for the library (a shim, or torch's own functions while dynamo
   traces), on the inputs brought to the kernel's space.

The forward and reverse KL with ``inputs="probs"`` resolve to the Keras KL's record
(:data:`kldiv._divergence.KERAS_KL`, op ``"keras_kl"``; the reverse KL with the arguments
swapped), so that they run exactly the Keras KL's code and fast paths.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from . import _divergence
from ._cast import cast_quietly
from ._divergence import KERAS_KL, Divergence
from ._libraries import Library, library, load
from ._namespace import torch_compiling
from ._spaces import Prepared, parse_inputs, shape_str, to_log_space, validate_temperature
from ._switch import fast_path, fast_path_modules, generic_forced, library_op, use_generic

__all__ = ["Call", "compute", "fast_path", "fast_path_modules", "generic_forced", "library_op",
           "resolve", "resolve_traced", "use_generic"]


# ------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class Call:
    """One member with its options resolved and validated (nothing array-dependent).

    ``swap``: the member runs on ``(y_pred, y_true)`` (the reverse KL as the Keras KL).
    """

    divergence: Divergence
    spaces: tuple[str, str]
    temperature: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)  # read-only (see Divergence.params)
    swap: bool = False


_RESOLVED: dict[tuple[Any, ...], Call] = {}
_RESOLVED_MAX = 256


def _options_key(div: Divergence, inputs: Any, temperature: Any,
                 params: dict[str, Any]) -> tuple[Any, ...] | None:
    """A key for options of plain Python types (types included: ``True`` is not ``1.0``), or
    ``None`` for anything else (validated every time)."""
    # (no annotated assignment in these branches: autograph, should it ever convert this
    # function, cannot convert an annotated name assigned in a branch)
    spaces: Any
    if type(inputs) is str:
        spaces = inputs
    elif type(inputs) in (tuple, list) and all(type(x) is str for x in inputs):
        spaces = tuple(inputs)
    else:
        return None
    values = [temperature, *params.values()]
    if any(type(v) not in (float, int) for v in values):
        return None
    options = (("temperature", temperature), *sorted(params.items()))
    return (div.name, spaces, *((k, type(v), v) for k, v in options))


def resolve(divergence: Divergence | str, *, inputs: Any = "probs", temperature: Any = 1.0,
            **params: Any) -> Call:
    """Validate a member's options: ``ValueError``/``TypeError`` naming what is wrong.

    The forward and reverse KL on ``"probs"`` inputs resolve to the Keras KL
    (:data:`~kldiv._divergence.KERAS_KL`; reversed: arguments swapped). Valid options are
    remembered (a few hundred combinations at most), so that a loss class called once per
    step does not check them again each time.
    """
    return resolve_traced(_divergence.get(divergence), inputs, temperature, params, torch_compiling())


def resolve_traced(div: Divergence, inputs: Any, temperature: Any, params: dict[str, Any],
                   compiling: bool) -> Call:
    """:func:`resolve`, with ``compiling`` (:func:`torch_compiling`) asked by the caller."""
    # Neither read nor written while dynamo traces: a graph that read the cache is guarded on
    # its length (every eager call with new options afterwards would recompile it), options
    # may be symbolic floats there (``dynamic=True`` traces float defaults so), and a mutated
    # global dict breaks the graph. The checks below fold to constants in the trace.
    key = None if compiling else _options_key(div, inputs, temperature, params)
    call = _RESOLVED.get(key) if key is not None else None
    if call is None:
        spaces = parse_inputs(inputs)
        t = validate_temperature(temperature, spaces)
        bound = div.bind(**params)
        probs = spaces == ("probs", "probs")
        if div.space == "probs" and not probs:
            raise ValueError(f"{div.name} takes probabilities only (inputs='probs'), "
                             f"got inputs={inputs!r}.")
        if probs and div.keras_swap is not None:
            call = Call(KERAS_KL, spaces, t, bound, swap=div.keras_swap)
        else:
            call = Call(div, spaces, t, bound)
        if key is not None and len(_RESOLVED) < _RESOLVED_MAX:
            _RESOLVED[key] = call
    return call


# ------------------------------------------------------------------------------ compute
def _check_class_axes(call: Call, prep: Prepared, lib: Library) -> Any:
    """A logits input must hold the whole class axis: softmax over a broadcast axis of 1 is
    not the softmax of the broadcast logits.

    Where a class axis is unknown until run time (a ``tf.function`` traced with a
    ``(None, None)`` input signature, a Dask array of unknown chunk sizes), the check is added
    to the graph where the library allows it (:meth:`Library.assert_at_run_time`: it raises
    when the graph runs), else a logits input that may be broadcast is refused now. Returns
    that run-time condition (a 0-d boolean array; ``None`` without one): the result is NaN
    where it holds, never a wrong value, also where a compiler drops the assertion (XLA,
    ``tf.function(jit_compile=True)``)."""
    bad: Any = None
    shapes = (tuple(prep.y_true.shape), tuple(prep.y_pred.shape))
    classes = [s[-1] if s else 1 for s in shapes]
    known = [c is not None and c == c for c in classes]  # not None, not NaN (Dask)
    full = None
    for c, k in zip(classes, known, strict=True):
        if k and c != 1:  # not broadcast
            full = c
    names = ("y_true", "y_pred")
    for i, (what, space, shape, c) in enumerate(zip(names, call.spaces, shapes, classes, strict=True)):
        if space != "logits":
            continue
        if full is not None and known[i] and c == 1:
            raise ValueError(
                f"{what} holds logits of shape {shape_str(shape)}: its class (last) axis must "
                f"have the full size {full}, not broadcast against the other input "
                f"(y_true of shape {shape_str(shapes[0])}, y_pred of shape {shape_str(shapes[1])})."
            )
        other = 1 - i
        if (known[i] and c != 1) or (known[other] and classes[other] == 1):
            continue  # whole, or the other input's axis is 1: nothing is broadcast
        # one of the two class axes is unknown: decided only when the graph runs
        message = (f"{what} holds logits of shape {shape_str(shape)} whose class (last) axis "
                   f"has size 1 at run time, broadcast against {names[other]}'s (of shape "
                   f"{shape_str(shapes[other])}); give the logits with the full class axis.")
        mine, theirs = (lib.run_time_size(x, -1) if not k else cls
                        for x, k, cls in ((prep.y_true if i == 0 else prep.y_pred, known[i], c),
                                          (prep.y_pred if i == 0 else prep.y_true, known[other],
                                           classes[other])))
        if mine is not None and theirs is not None:
            broadcast = (mine == 1) & (theirs != 1)
            if lib.assert_at_run_time(broadcast, message):
                bad = broadcast if bad is None else bad | broadcast
                continue
        raise ValueError(
            f"{what} holds logits of shape {shape_str(shape)} against {names[other]} of shape "
            f"{shape_str(shapes[other])}: a class (last) axis of unknown size, which "
            f"{lib.name} cannot check at run time, may broadcast a class axis of 1; give "
            "inputs whose class axis size is known (Dask: compute_chunk_sizes())."
        )
    return bad


def compute(call: Call, prep: Prepared, *, cast: bool = True, compiling: bool | None = None) -> Any:
    """The per-row divergence of prepared inputs (see the module docstring).

    With ``cast=False`` the result stays in the compute dtype (float32 for float16/bfloat16
    inputs), for a reduction that must not overflow before the final cast. ``compiling``:
    :func:`torch_compiling`'s answer where the caller has it (asked here when ``None``).
    """
    if call.swap:
        prep = prep._replace(y_true=prep.y_pred, y_pred=prep.y_true)
    if compiling is None:  # asked once per call (~0.1 us each time)
        compiling = torch_compiling()
    lib = library(prep.xp, tracing=compiling)
    broadcast = None
    if not call.swap and "logits" in call.spaces:
        broadcast = _check_class_axes(call, prep, lib)
    scope = lib.device_scope(prep.device)
    if scope is None:
        return _compute(call, prep, cast, lib, compiling, broadcast)
    with scope:
        return _compute(call, prep, cast, lib, compiling, broadcast)


# NumPy would warn about the 0 * inf and -inf - (-inf) that the log-space kernels compute on
# purpose and then select away (other libraries do not read NumPy's error state)
_QUIET = functools.partial(np.errstate, invalid="ignore", divide="ignore", over="ignore")


def _kernel_namespace(lib: Library, xp: ModuleType, compiling: bool) -> ModuleType:
    if compiling and lib.compiled_namespace is not None:
        # dynamo traces the library's own functions (array-api-compat's wrappers hold Python
        # checks that break the graph: clip's isnan on symbolic bounds)
        return lib.compiled_namespace()
    if lib.kernel_namespace is not None:  # a shim with what the kernels call
        shim: ModuleType = load(lib.kernel_namespace).namespace
        return shim
    return xp


def _compute(call: Call, prep: Prepared, cast: bool, lib: Library, compiling: bool,
             broadcast: Any = None) -> Any:
    xp = prep.xp
    div = call.divergence
    fast = None if compiling else fast_path(lib.name, div.op)
    loss = NotImplemented
    if fast is not None:
        if div.space == "probs":
            loss = fast(prep.y_true, prep.y_pred, **call.params)
        else:
            loss = fast(prep.y_true, prep.y_pred, spaces=call.spaces,
                        temperature=call.temperature, **call.params)
    if loss is NotImplemented:
        kxp = _kernel_namespace(lib, xp, compiling)
        if div.space == "probs":
            loss = div.generic(kxp, prep.y_true, prep.y_pred, **call.params)
        else:
            with contextlib.nullcontext() if compiling else _QUIET():
                lp = to_log_space(kxp, prep.y_true, call.spaces[0], call.temperature)
                lq = to_log_space(kxp, prep.y_pred, call.spaces[1], call.temperature)
                loss = div.generic(kxp, lp, lq, **call.params)
    if broadcast is not None:  # a logits class axis broadcast at run time: NaN, not a value
        loss = _kernel_namespace(lib, xp, compiling).where(broadcast, float("nan"), loss)
    if cast and loss.dtype != prep.out_dtype:
        loss = cast_quietly(xp, loss, prep.out_dtype)  # beyond a half dtype's range: inf
    return loss
