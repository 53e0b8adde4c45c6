"""Keras-style losses: the functional aliases and the divergence loss classes
:class:`KLDivergence`, :class:`ReverseKLDivergence` and :class:`JensenShannonDivergence`;
the sampled-token estimates :func:`~kldiv.kl_estimate` and their loss class :class:`~kldiv.KLEstimator`.

The machinery they share (reductions, config, pickling, Keras interop) is
``kldiv._loss_base.DivergenceLoss``; this module holds the members' classes and their
documentation.
"""

from __future__ import annotations

from typing import Any

from ._divergence import JS, KL, REVERSE_KL
from ._estimator_loss import KLEstimator
from ._estimators import kl_estimate
from ._family import jensen_shannon_divergence, js_divergence, reverse_kl_divergence
from ._functional import KLD, kl_divergence, kld, kullback_leibler_divergence
from ._keras import keras_aware_class  # noqa: F401  (a public name of this module before)
from ._keras.detect import graph_safe
from ._loss_base import DivergenceLoss
from ._loss_base import restore as _restore  # noqa: F401  (pickles name kldiv.losses._restore)
from ._reduction import Reduction

__all__ = [
    "KLD",
    "JensenShannonDivergence",
    "KLDivergence",
    "KLEstimator",
    "Reduction",
    "ReverseKLDivergence",
    "jensen_shannon_divergence",
    "js_divergence",
    "kl_divergence",
    "kl_estimate",
    "kld",
    "kullback_leibler_divergence",
    "reverse_kl_divergence",
]

# autograph calls the family's functions as they are inside a tf.function (graph-safe code;
# kl_divergence: kldiv._functional)
for _function in (reverse_kl_divergence, js_divergence):
    graph_safe(_function)
del _function

_PARAMETERS = """
    Parameters
    ----------
    reduction : str or None, default "auto"
        ``"auto"`` / ``"sum_over_batch_size"`` / ``"mean"``: the weighted sum divided by the
        number of per-sample losses; ``"sum"``: the weighted sum; ``"none"`` (or ``None``):
        the weighted per-sample losses; ``"mean_with_sample_weight"``: the weighted sum divided
        by the sum of the weights (0 when they sum to 0); ``"batchmean"``: the weighted sum
        divided by the size of the per-sample loss' first axis (torch's). See
        :class:`Reduction`."""

def _name(default: str) -> str:
    return f"""
    name : str or None, default "{default}"
        The loss' name (Keras uses it to label logs), stored as a plain ``str``; ``None`` is
        the default, as in Keras."""


_OPTIONS = """
    inputs : {"probs", "log_probs", "logits"} or pair of them, default "probs"
        The space of both inputs, or ``(y_true's, y_pred's)``; see
        :func:`kldiv.kl_divergence`. Stored as given (a pair as a list in the config).
    temperature : float, default 1.0
        Divides logits (> 0, only with ``"logits"`` inputs); the loss is not multiplied by
        ``temperature ** 2``.
    dtype : str or dtype, optional
        If given, the result is cast to the dtype of this name in the result's library (Keras
        3's ``dtype`` argument): ``"float16"``, ``"bfloat16"``, ``"float32"``, ``"float64"``,
        a Keras ``"mixed_float16"``/``"mixed_bfloat16"`` policy, or any library's floating
        dtype object (``np.float64``, ``torch.float64``, ...), stored as its name; Python's
        ``float`` is float32, as in Keras. NumPy's bfloat16 is ``ml_dtypes``'. By default the
        result has ``y_pred``'s floating dtype."""

_NOTES = """

    Notes
    -----
    Before the kernel, Keras 2's ``squeeze_or_expand_dimensions`` applies: when the ranks of
    ``y_true`` and ``y_pred`` differ by one and the larger has a trailing axis of 1, that axis
    is dropped (``(3, 1)`` against ``(3,)`` is one sample of 3 classes). The functions
    broadcast instead, as Keras' functions do.

    ``sample_weight`` follows Keras 2's rank rules (a ``(B,)`` weight scales the rows of a
    ``(B, T)`` loss). A mask is a weight: ``sample_weight=(labels != -100)`` with
    ``reduction="mean_with_sample_weight"`` is the mean over the unmasked tokens, 0 (with zero
    gradients) when every token is masked. A masked token's divergence must still be finite
    (padding holds ordinary logits, or ``-inf`` on both sides): its weight multiplies it, as
    in Keras, and ``0 * inf`` is NaN.

    On NumPy a reduced result is a NumPy scalar of the result dtype (``np.float32`` for
    float32 inputs) for every reduction, also for an empty batch or a zero weight sum; an
    unreduced one is an ndarray. Other libraries return their 0-d array.

    Made before Keras (or tf_keras) is imported, an instance becomes a Keras ``Loss`` the
    first time Keras checks ``isinstance(loss, keras.losses.Loss)``, so the order of the
    imports does not matter."""


class KLDivergence(DivergenceLoss, member=KL, title="KL divergence"):
    __doc__ = """Keras' ``KLDivergence`` loss, on any array library and device; also from
    log-probabilities or logits.

    ``loss = y_true * log(y_true / y_pred)`` summed over the last axis (both clipped to
    ``[1e-7, 1]``; with ``inputs=``, :func:`kldiv.kl_divergence`'s ``KL(P || Q)`` of the
    given spaces), then weighted by ``sample_weight`` and reduced.
""" + _PARAMETERS + _name("kl_divergence") + _OPTIONS + _NOTES + """

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> y_true = np.array([[0, 1], [0, 0]], dtype=np.float32)
    >>> y_pred = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)
    >>> kl = kldiv.KLDivergence()
    >>> kl(y_true, y_pred)
    np.float32(0.45814306)
    >>> kl(y_true, y_pred, sample_weight=[0.8, 0.2])
    np.float32(0.3665154)
    >>> kldiv.KLDivergence(reduction="none")(y_true, y_pred)
    array([ 9.1628921e-01, -3.0809074e-06], dtype=float32)
    >>> teacher = np.array([[[2.0, 1.0, 0.0], [0.5, 0.5, -np.inf]]])  # (1, 2, 3) logits
    >>> student = np.array([[[1.0, 1.0, 0.0], [0.0, 1.0, -np.inf]]])
    >>> distill = kldiv.KLDivergence(reduction="batchmean", inputs="logits", temperature=2.0)
    >>> round(float(distill(teacher, student)), 6)
    0.06192
    """

    def __init__(self, reduction: str | None = "auto", name: str | None = "kl_divergence", *,
                 inputs: Any = "probs", temperature: Any = 1.0, dtype: Any = None) -> None:
        super().__init__(reduction, name, inputs=inputs, temperature=temperature, dtype=dtype)


class ReverseKLDivergence(DivergenceLoss, member=REVERSE_KL, title="reverse KL divergence"):
    __doc__ = """The reverse Kullback-Leibler divergence loss ``KL(Q || P)``, P from ``y_true``,
    Q from ``y_pred``: :func:`kldiv.reverse_kl_divergence`, weighted and reduced.

    Mode-seeking where :class:`KLDivergence` is mass-covering. With ``inputs="probs"`` it is
    exactly ``KLDivergence`` with the inputs swapped (computed in ``y_pred``'s library).
""" + _PARAMETERS + _name("reverse_kl_divergence") + _OPTIONS + _NOTES + """

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> p = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    >>> q = np.array([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    >>> loss = kldiv.ReverseKLDivergence(reduction="sum")
    >>> round(float(loss(p, q)), 6)
    0.116622
    >>> kldiv.ReverseKLDivergence(inputs="log_probs")
    ReverseKLDivergence(reduction='auto', name='reverse_kl_divergence', inputs='log_probs')
    """

    def __init__(self, reduction: str | None = "auto", name: str | None = "reverse_kl_divergence", *,
                 inputs: Any = "probs", temperature: Any = 1.0, dtype: Any = None) -> None:
        super().__init__(reduction, name, inputs=inputs, temperature=temperature, dtype=dtype)


class JensenShannonDivergence(DivergenceLoss, member=JS, title="Jensen-Shannon divergence"):
    __doc__ = """The generalized Jensen-Shannon divergence loss: :func:`kldiv.js_divergence`
    (``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``, P from
    ``y_true``), weighted and reduced.
""" + _PARAMETERS + _name("js_divergence") + """
    beta : float, default 0.5
        The weight of P in the mixture, in the open interval (0, 1) (TRL's and Liger's
        ``beta``; their 0 and 1 are :class:`KLDivergence` and :class:`ReverseKLDivergence`
        with ``inputs="logits"``).""" + _OPTIONS + _NOTES + """

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> teacher = np.array([[2.0, 1.0, -np.inf], [0.0, 0.0, 0.0]])   # logits
    >>> student = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    >>> mask = np.array([True, False])                                 # the 2nd token is padding
    >>> loss = kldiv.JensenShannonDivergence(reduction="mean_with_sample_weight",
    ...                                      beta=0.5, inputs="logits")
    >>> round(float(loss(teacher, student, sample_weight=mask)), 6)
    0.083339
    >>> loss.get_config()
    {'reduction': 'mean_with_sample_weight', 'name': 'js_divergence', 'beta': 0.5, 'inputs': 'logits'}
    """

    def __init__(self, reduction: str | None = "auto", name: str | None = "js_divergence", *,
                 beta: Any = 0.5, inputs: Any = "probs", temperature: Any = 1.0,
                 dtype: Any = None) -> None:
        super().__init__(reduction, name, inputs=inputs, temperature=temperature, dtype=dtype,
                         beta=beta)

