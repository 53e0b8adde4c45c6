"""Temperatures at the edges of a dtype: the ``T -> 0`` and ``T -> inf`` limits.

A temperature below the compute dtype's smallest normal number is 0 in that dtype, one whose
reciprocal is below it is infinite there (or flushed to 0 by XLA): dividing logits by either
gives NaN. :func:`temperature_limit` and :func:`temperature_flat` recognise them, and
:func:`limit_logits` / :func:`uniform_logits` give the limits that every kernel (the
family's log-softmax in :mod:`kldiv._spaces`, the fused linear path, the fast paths)
computes instead.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

__all__ = ["limit_logits", "temperature_flat", "temperature_limit", "uniform_logits"]


_SMALLEST_NORMAL = {"float32": 1.1754943508222875e-38, "float64": 2.2250738585072014e-308}


def temperature_limit(temperature: float, dtype: Any) -> bool:
    """True where ``temperature`` is below ``dtype``'s smallest normal number.

    Such a temperature is 0 in the dtype (it rounds to 0, or it is subnormal and XLA and
    TensorFlow flush it to 0 on CPU), and ``(x - max(x)) / T`` would be ``0 / 0 = NaN`` at the
    row maximum. It stands for the ``T -> 0`` limit, which every kernel then computes
    directly (:func:`limit_logits`): all the mass on the row maximum, shared between ties.
    The compute dtypes are float32 and float64 (half precision is computed in float32).

    Examples
    --------
    >>> import numpy as np
    >>> temperature_limit(1e-40, np.float32), temperature_limit(1e-40, np.float64)
    (True, False)
    """
    if temperature >= _SMALLEST_NORMAL["float32"]:  # every usual temperature: one comparison
        return False
    key = "float64" if "64" in str(dtype) else "float32"
    return temperature < _SMALLEST_NORMAL[key]


_LARGEST_FLAT = {"float32": 2.0**126, "float64": 2.0**1022}  # 1 / the smallest normal number


def temperature_flat(temperature: float, dtype: Any) -> bool:
    """True where ``1 / temperature`` is below ``dtype``'s smallest normal number.

    Such a temperature is infinite in the dtype, or its reciprocal is flushed to 0 by XLA
    (which divides by a constant by multiplying with its reciprocal) and by TensorFlow: the
    division ``(x - max(x)) / T`` would give NaN at every ``-inf`` logit (``-inf * 0``,
    ``-inf / inf``). It stands for the ``T -> inf`` limit (:func:`uniform_logits`): the
    uniform distribution over the entries whose logit is not ``-inf``. That is the value of
    ``log_softmax(x / T)`` to the dtype's resolution for every logit gap below
    ``T * eps`` (``2**102``, about ``5e30``, in float32), since ``(x - max(x)) / T`` is then
    smaller than the dtype's spacing near ``log(C)``.

    Examples
    --------
    >>> import numpy as np
    >>> temperature_flat(1e39, np.float32), temperature_flat(1e39, np.float64)
    (True, False)
    """
    if temperature <= _LARGEST_FLAT["float32"]:  # every usual temperature: one comparison
        return False
    key = "float64" if "64" in str(dtype) else "float32"
    return temperature > _LARGEST_FLAT[key]


def uniform_logits(xp: ModuleType, z: Any) -> Any:
    """``lim_{T -> inf} z / T`` for max-shifted logits ``z``: 0, ``-inf`` kept (a masked
    entry stays masked), NaN kept. Constants where the limit is taken: a zero gradient (the
    true one is of order ``1 / T``, below the dtype's smallest normal number)."""
    return xp.where(z == -math.inf, -math.inf, xp.where(z == z, 0.0, z))


def limit_logits(xp: ModuleType, z: Any) -> Any:
    """``lim_{T -> 0} z / T`` for max-shifted logits ``z = x - max(x) <= 0``: 0 at the row
    maximum, ``-inf`` below it, NaN kept (a NaN logit, or ``+inf - +inf``).

    Constants where the limit is taken: its gradient is 0 (the limit is flat), never the
    ``0 * inf`` of a division by a temperature that is 0 in the dtype."""
    return xp.where(z == 0.0, 0.0, xp.where(z < 0.0, -math.inf, z))
