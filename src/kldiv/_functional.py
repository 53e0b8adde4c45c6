"""The functional API: ``kl_divergence`` and its aliases ``kld``, ``KLD`` and
``kullback_leibler_divergence`` (one function object, as in Keras).

The function is defined with the rest of the divergence family in :mod:`kldiv._family`.

Examples
--------
>>> import kldiv
>>> kldiv.kld is kldiv.KLD is kldiv.kullback_leibler_divergence is kldiv.kl_divergence
True
>>> kldiv.losses.kl_divergence is kldiv.metrics.kl_divergence is kldiv.kl_divergence
True
>>> kldiv.KLD([.4, .9, .2], [.5, .8, .12])
np.float32(0.11891246)
"""

from __future__ import annotations

from ._family import kl_divergence
from ._keras.detect import graph_safe

__all__ = ["KLD", "kl_divergence", "kld", "kullback_leibler_divergence"]

graph_safe(kl_divergence)  # autograph calls it as it is inside a tf.function (graph-safe code)

kld = kl_divergence
KLD = kl_divergence
kullback_leibler_divergence = kl_divergence
