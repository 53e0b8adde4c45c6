"""The divergence family: one :class:`Divergence` record per member, and its generic kernel.

A member's generic kernel takes two arrays of natural-log probabilities ``lp`` (from
``y_true``: the distribution P) and ``lq`` (from ``y_pred``: Q), already in one namespace,
device and floating dtype and broadcastable, and returns the per-row divergence summed over
the last axis. It is written once against the array API standard, so it runs on NumPy,
array-api-strict, PyTorch, JAX, Dask, CuPy and TensorFlow (through kldiv's namespace shim).

Zeros follow ``0 * log 0 = 0``: an entry with ``lp = -inf`` (a probability of exactly 0)
contributes 0 to the value and 0 to the gradient of both inputs. The kernels use the
"double where": the undefined operand (``-inf - (-inf)``, ``0 * inf``) is replaced by a safe
value *before* the arithmetic, and the result selected after, so that autograd (torch, JAX,
TensorFlow) never multiplies a zero cotangent by an infinite local derivative (the NaN
gradients of optax#1786 and pytorch#89558). ``lq = -inf`` where ``lp > -inf`` gives ``+inf``,
the mathematically right value.

The Keras KL (:data:`KERAS_KL`) is a member too, the only one whose kernel takes
probabilities: ``sum(t * log(t / p))`` on ``clip(x, 1e-7, 1)`` (:mod:`kldiv._kernel`), the
formula of ``tf.keras.losses.kl_divergence``. The forward and reverse KL on ``"probs"``
inputs are computed by it (the reverse one with its arguments swapped): see
:attr:`Divergence.keras_swap` and :func:`kldiv._dispatch.resolve`.

Members (``beta`` is the only parameter so far):

- ``keras_kl``: the Keras KL on probabilities (op ``"keras_kl"``);
- ``kl``: ``KL(P || Q) = sum p (lp - lq)``;
- ``reverse_kl``: ``KL(Q || P) = sum q (lq - lp)``;
- ``js``: ``beta KL(P || M) + (1 - beta) KL(Q || M)`` with ``M = beta P + (1 - beta) Q``,
  ``log M = logaddexp(log beta + lp, log1p(-beta) + lq)``; ``0 < beta < 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

from ._kernel import kl_divergence_generic
from ._namespace import native_namespace
from ._spaces import _real, short_repr

__all__ = ["JS", "KERAS_KL", "KL", "MEMBERS", "REVERSE_KL", "Divergence", "get", "js_parts",
           "js_terms", "kl_terms"]

_INF = math.inf


def kl_terms(xp: ModuleType, la: Any, lb: Any) -> Any:
    """``sum(exp(la) * (la - lb), axis=-1)`` with ``0 * log 0 = 0``: ``KL(A || B)`` from logs.

    ``la = -inf`` contributes 0 (to the gradient too); ``lb = -inf`` where ``la > -inf``
    gives ``+inf``, also when ``exp(la)`` underflows to 0 (``0 * inf`` would be NaN), and a
    NaN ``lb`` there gives NaN (the probability is not 0, only below the dtype's range).
    """
    zero = la == -_INF
    la = xp.where(zero, 0.0, la)  # safe: exp(la) * (la - lb) is finite or +inf, never NaN
    pa = xp.exp(la)
    d = la - lb
    # p == 0 only by underflow here (or on the masked entries, selected away below): the
    # term is then 0, except against lb = -inf where the divergence is infinite, and NaN
    # against a NaN (P is not 0 there: a NaN input is never dropped)
    term = xp.where(pa == 0.0, xp.where(d < _INF, 0.0, d), pa * d)
    return xp.sum(xp.where(zero, 0.0, term), axis=-1)


def js_parts(xp: ModuleType, lp: Any, lq: Any, beta: float) -> tuple[Any, Any]:
    """``(KL(P || M), KL(Q || M))`` per row, ``M = beta P + (1 - beta) Q``, from logs.

    ``log M`` is a ``logaddexp``, taken on safe operands only: where ``lp = -inf`` it is
    ``log1p(-beta) + lq`` (and symmetrically), so that no ``-inf`` reaches ``logaddexp``
    (whose derivative at ``-inf`` is NaN in torch and misplaced in JAX). ``M`` is positive
    wherever P or Q is, so both are finite whenever the inputs are.
    """
    log_b, log_1mb = math.log(beta), math.log1p(-beta)
    zp = lp == -_INF
    zq = lq == -_INF
    lp = xp.where(zp, 0.0, lp)
    lq = xp.where(zq, 0.0, lq)
    sp = lp + log_b
    sq = lq + log_1mb
    lm = xp.where(zp, sq, xp.where(zq, sp, xp.logaddexp(sp, sq)))
    kl_pm = xp.sum(xp.where(zp, 0.0, xp.exp(lp) * (lp - lm)), axis=-1)
    kl_qm = xp.sum(xp.where(zq, 0.0, xp.exp(lq) * (lq - lm)), axis=-1)
    return kl_pm, kl_qm


def js_terms(xp: ModuleType, lp: Any, lq: Any, beta: float) -> Any:
    """``beta KL(P || M) + (1 - beta) KL(Q || M)`` per row (:func:`js_parts`)."""
    kl_pm, kl_qm = js_parts(xp, lp, lq, beta)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def _forward_kl(xp: ModuleType, lp: Any, lq: Any) -> Any:
    return kl_terms(xp, lp, lq)


def _reverse_kl(xp: ModuleType, lp: Any, lq: Any) -> Any:
    return kl_terms(xp, lq, lp)


def _js(xp: ModuleType, lp: Any, lq: Any, *, beta: float) -> Any:
    return js_terms(xp, lp, lq, beta)


def _keras_kl(xp: ModuleType, y_true: Any, y_pred: Any) -> Any:
    # in the library's own module where it has one the kernel may use (NumPy: its functions
    # keep the inputs' memory layout and a subclass's semantics, see ``native_namespace``)
    return kl_divergence_generic(native_namespace(xp), y_true, y_pred)


def _validate_beta(beta: Any) -> float:
    b = _real(beta, "beta")
    if b == 0.0:
        raise ValueError(
            "beta=0: the generalized Jensen-Shannon divergence vanishes identically at beta=0 "
            "(M = Q). TRL's and Liger's beta=0 special case is the forward KL: use "
            "kldiv.kl_divergence(y_true, y_pred, inputs=...) instead."
        )
    if b == 1.0:
        raise ValueError(
            "beta=1: the generalized Jensen-Shannon divergence vanishes identically at beta=1 "
            "(M = P). TRL's and Liger's beta=1 special case is the reverse KL: use "
            "kldiv.reverse_kl_divergence(y_true, y_pred, inputs=...) instead."
        )
    if not 0.0 < b < 1.0:  # also NaN
        raise ValueError(
            f"beta must lie in the open interval (0, 1), got {short_repr(beta)}. For the limits use "
            "kldiv.kl_divergence (TRL's beta=0) or kldiv.reverse_kl_divergence (beta=1)."
        )
    return b


@dataclass(frozen=True)
class Divergence:
    """One member of the divergence family.

    Attributes
    ----------
    name : str
        The public function's name, e.g. ``"reverse_kl_divergence"``.
    op : str
        The name fast paths are looked up by, per library: ``"keras_kl"``, ``"kl"``,
        ``"reverse_kl"``, ``"js"`` (a backend module's function of that name).
    kernel : callable
        ``kernel(xp, a, b, **params)``: the generic per-row divergence. ``a``/``b`` are
        log-probabilities ``lp`` (``y_true``'s P) and ``lq`` (``y_pred``'s Q), or for a member
        with ``space="probs"`` the (unclipped) probabilities themselves.
    space : {"log_probs", "probs"}
        What :attr:`kernel` and the fast paths take. ``"log_probs"``: any input space, brought
        to log space first; fast paths are called ``fast(y_true, y_pred, spaces=...,
        temperature=..., **params)``. ``"probs"``: probabilities only (the Keras KL); fast
        paths are called ``fast(y_true, y_pred, **params)``.
    keras_swap : bool or None
        For the forward (``False``) and reverse (``True``, arguments swapped) KL: with
        ``inputs="probs"`` the call is the Keras KL's (:data:`KERAS_KL`), bit for bit.
        ``None``: ``"probs"`` inputs go through ``log(clip(x, 1e-7, 1))`` and :attr:`kernel`.
    aliases : tuple of str
        Other public names of the function.
    params : mapping
        Parameter name -> validator (returns the canonical value or raises).
    """

    name: str
    op: str
    kernel: Callable[..., Any]
    space: str = "log_probs"
    keras_swap: bool | None = None
    aliases: tuple[str, ...] = ()
    # plain dicts, read-only by contract (typed Mapping): torch.compile (dynamo) breaks its
    # graph on reading a MappingProxyType once any dict was built in the traced code
    params: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)

    def bind(self, **params: Any) -> dict[str, Any]:
        """The parameters, validated: every declared one given, no other."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise TypeError(f"{self.name} got unexpected parameter(s) {sorted(unknown)}.")
        missing = set(self.params) - set(params)
        if missing:
            raise TypeError(f"{self.name} is missing parameter(s) {sorted(missing)}.")
        return {key: check(params[key]) for key, check in self.params.items()}

    def generic(self, xp: ModuleType, lp: Any, lq: Any, **params: Any) -> Any:
        """The generic kernel (``params`` already bound; inputs in :attr:`space`)."""
        return self.kernel(xp, lp, lq, **params)


KERAS_KL = Divergence(
    name="keras_kl",
    op="keras_kl",
    kernel=_keras_kl,
    space="probs",
)
"""Keras' ``kl_divergence``: what the forward and reverse KL compute on ``"probs"`` inputs."""
KL = Divergence(
    name="kl_divergence",
    op="kl",
    kernel=_forward_kl,
    keras_swap=False,
    aliases=("kld", "KLD", "kullback_leibler_divergence"),
)
REVERSE_KL = Divergence(
    name="reverse_kl_divergence",
    op="reverse_kl",
    kernel=_reverse_kl,
    keras_swap=True,
)
JS = Divergence(
    name="js_divergence",
    op="js",
    kernel=_js,
    aliases=("jensen_shannon_divergence",),
    params={"beta": _validate_beta},
)

MEMBERS: Mapping[str, Divergence] = MappingProxyType(
    {name: d for d in (KL, REVERSE_KL, JS) for name in (d.name, d.op, *d.aliases)}
)
"""Every public member by its name, op name and aliases (:data:`KERAS_KL` is reached through
``kl_divergence``'s ``"probs"`` inputs)."""


def get(name: str | Divergence) -> Divergence:
    """The member called ``name`` (a name, op name or alias), or ``name`` itself if a record."""
    if isinstance(name, Divergence):
        return name
    try:
        return MEMBERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown divergence {name!r}; expected one of {', '.join(sorted(MEMBERS))}."
        ) from None
