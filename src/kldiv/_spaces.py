"""Input spaces of the divergence family: ``"probs"``, ``"log_probs"`` and ``"logits"``.

A divergence's kernels work on natural-log probabilities. This module validates the
``inputs=`` and ``temperature=`` arguments and brings one input from its space to log space,
written once against the array API standard:

- ``"probs"``: Keras' semantics, ``log(clip(x, 1e-7, 1))`` (no renormalisation; the clip's
  gradient is 1 inside the closed interval, 0 outside, as for ``kl_divergence``);
- ``"log_probs"``: the input itself (no clipping; ``-inf`` is a probability of exactly 0);
- ``"logits"``: ``log_softmax(x / temperature)`` over the last axis, max-shifted. ``-inf``
  logits give ``-inf`` log-probabilities (and a zero gradient). A row whose logits are all
  ``-inf`` holds no probability mass at all: it becomes a row of ``-inf`` (the zero measure),
  never NaN, and the divergence kernels treat it by the ``0 * log 0 = 0`` rule.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any

from ._kernel import clip_unit

__all__ = ["SPACES", "log_softmax", "parse_inputs", "to_log_space", "validate_temperature"]

SPACES = ("probs", "log_probs", "logits")


def parse_inputs(inputs: Any) -> tuple[str, str]:
    """``inputs=`` as ``(y_true's space, y_pred's space)``.

    A single name applies to both inputs; a pair (tuple or list of two names) gives them
    separately, e.g. ``("probs", "logits")`` for soft labels against logits.

    Raises
    ------
    TypeError
        If ``inputs`` is neither a string nor a pair of strings.
    ValueError
        If a name is not one of :data:`SPACES`.
    """
    if isinstance(inputs, str):
        pair: tuple[Any, ...] = (inputs, inputs)
    elif isinstance(inputs, (tuple, list)) and len(inputs) == 2:
        pair = tuple(inputs)
    else:
        raise TypeError(
            f"inputs must be one of {', '.join(map(repr, SPACES))} or a pair of them (y_true's "
            f"space, y_pred's space), e.g. ('probs', 'logits'); got {inputs!r}."
        )
    for name in pair:
        if not isinstance(name, str) or name not in SPACES:
            raise ValueError(
                f"inputs: unknown input space {name!r}; expected one of "
                f"{', '.join(map(repr, SPACES))} (or a pair of them)."
            )
    return pair[0], pair[1]


def _real(value: Any, what: str) -> float:
    """``value`` as a Python float: a real number (Python or NumPy scalar), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__} {value!r}.")
    return float(value)


def validate_temperature(temperature: Any, spaces: tuple[str, str]) -> float:
    """``temperature`` as a float, checked: finite, > 0, and only with ``"logits"``.

    Raises
    ------
    TypeError
        If ``temperature`` is not a real number.
    ValueError
        If it is not finite and > 0, or differs from 1 while neither input is logits.
    """
    t = _real(temperature, "temperature")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    if t != 1.0 and "logits" not in spaces:
        raise ValueError(
            f"temperature={temperature!r} only applies to logits (inputs='logits' or a pair "
            f"with 'logits'); got inputs {spaces!r}. Divide logits by the temperature, or "
            "pass inputs='logits'."
        )
    return t


def log_softmax(xp: ModuleType, x: Any, temperature: float = 1.0) -> Any:
    """``log_softmax(x / temperature)`` over the last axis, stable, in ``x``'s dtype.

    Max-shifted: ``z = x - max(x)``, ``z - log(sum(exp(z)))``. A row of all ``-inf`` gives all
    ``-inf`` (not NaN), with zero gradients: the ``where`` calls replace the undefined
    ``-inf - (-inf)`` and ``log(0)`` by safe values on both branches, so that no NaN reaches
    the backward pass either.
    """
    if temperature != 1.0:
        x = x / temperature
    if x.shape[-1] == 0:  # no classes: nothing to normalise
        return x
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(m == -math.inf, 0.0, m)
    z = x - m
    s = xp.sum(xp.exp(z), axis=-1, keepdims=True)
    lse = xp.log(xp.where(s == 0.0, 1.0, s))
    return z - lse


def to_log_space(xp: ModuleType, x: Any, space: str, temperature: float) -> Any:
    """``x`` (in ``space``) as natural-log probabilities, in namespace ``xp``."""
    if space == "log_probs":
        return x
    if space == "logits":
        return log_softmax(xp, x, temperature)
    return xp.log(clip_unit(xp, x))
