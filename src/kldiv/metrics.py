"""Keras-style metrics: the functional aliases (and, beside them, the stateful metric)."""

from __future__ import annotations

from ._functional import KLD, kl_divergence, kld, kullback_leibler_divergence

__all__ = ["KLD", "kl_divergence", "kld", "kullback_leibler_divergence"]
