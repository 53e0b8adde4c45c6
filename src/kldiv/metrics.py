"""Keras-style metrics: the functional aliases and the stateful divergence metrics.

``kldiv.metrics.KLDivergence`` is Keras' ``metrics.KLDivergence`` (a ``MeanMetricWrapper``
of the KL divergence): a running, optionally weighted, mean of the per-sample loss over
every batch passed to :meth:`~KLDivergence.update_state`. Its state lives in the inputs' own
library and on their device, so a stream of GPU batches never waits on the host. (The loss
class is ``kldiv.KLDivergence`` / ``kldiv.losses.KLDivergence``.)
:class:`ReverseKLDivergence` and :class:`JensenShannonDivergence` are the same metric of the
other members of the divergence family, and every one of them takes ``inputs=`` (probabilities,
log-probabilities or logits) and ``temperature=``, as the functions and loss classes of the
same names do. :class:`KLEstimator` averages sampled-token KL estimates.

Created while Keras is imported, a divergence metric is also a ``keras.metrics.Metric`` and
works in ``model.compile(metrics=[...])``: see :class:`KLDivergence`'s Notes and
``kldiv._keras``. The shared machinery is in ``kldiv._metric_base`` and ``kldiv._accumulate``.
"""

from __future__ import annotations

from typing import Any

# Re-exported: the accumulation engine (streaming and tests reach it here) and where float64 is
from ._accumulate import BatchSums as BatchSums
from ._accumulate import RunningSum as RunningSum
from ._accumulate import accumulator_dtype as accumulator_dtype
from ._accumulate import batch_sums as batch_sums
from ._accumulate import check_same_place as check_same_place
from ._accumulate import has_float64 as has_float64
from ._accumulate import qualified as _qualified  # noqa: F401  (streaming's messages)
from ._accumulate import safe_divide as safe_divide
from ._divergence import JS, KL, REVERSE_KL
from ._estimator_metric import KLEstimator
from ._family import js_divergence, reverse_kl_divergence
from ._functional import KLD, kl_divergence, kld, kullback_leibler_divergence
from ._metric_base import DivergenceMetric
from ._metric_restore import restore_metric as _restore_metric  # noqa: F401  (pickles name it)

__all__ = [
    "KLD",
    "JensenShannonDivergence",
    "KLDivergence",
    "KLEstimator",
    "ReverseKLDivergence",
    "kl_divergence",
    "kld",
    "kullback_leibler_divergence",
]

# --------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------


_DTYPE = """    dtype : str or dtype, default "float32"
        The dtype of :meth:`result`; accumulation is in float64 where the library has it."""

_OPTIONS = """
    inputs : {"probs", "log_probs", "logits"} or pair of them, default "probs"
        The space of both inputs, or ``(y_true's, y_pred's)``.
    temperature : float, default 1.0
        Divides logits (> 0, only with ``"logits"`` inputs)."""


class KLDivergence(DivergenceMetric, member=KL, function=kl_divergence,
                   title="KL divergence"):
    """Keras' ``metrics.KLDivergence``: a running (weighted) mean of the KL divergence.

    Each :meth:`update_state` computes the per-sample loss ``sum(t * log(t / p), axis=-1)``
    (both inputs clipped to ``[1e-7, 1]``; with ``inputs=`` from log-probabilities or logits,
    as :func:`kldiv.kl_divergence` computes it), weights it by ``sample_weight`` (Keras 2 rules,
    as for the loss class), and adds ``sum(w * loss)`` to a total and ``sum(w)`` (without
    weights: the number of per-sample losses) to a count. :meth:`result` is
    ``total / count``, 0 while the count is 0.

    The state lives in the first batch's library (``y_pred``'s) and on its device, as 0-d
    arrays: an update never reads anything back to the host, and a Dask batch keeps the
    state lazy. It is accumulated in float64 where the library has it on that device
    (JAX with ``jax_enable_x64``, everything but torch on MPS), else in float32 with
    compensated (Neumaier) summation, so a stream of millions of rows loses no precision.

    Parameters
    ----------
    name : str or None, default "kullback_leibler_divergence"
        The metric's name (Keras 2's default; ``None`` gives it too, as in Keras).
    dtype : str or dtype, default "float32"
        The dtype of :meth:`result` (Keras' metric dtype): ``"float32"``, ``"float64"``,
        ``"float16"`` or ``"bfloat16"``. Accumulation is in float64 regardless, where the
        library has it; without float64, a ``"float64"`` result is float32.
    inputs : {"probs", "log_probs", "logits"} or pair of them, default "probs"
        The space of both inputs, or ``(y_true's, y_pred's)``, as for
        :func:`kldiv.kl_divergence`. The default is Keras' metric, bit for bit.
    temperature : float, default 1.0
        Divides logits (> 0, only with ``"logits"`` inputs); not multiplied back.

    Raises
    ------
    TypeError
        From :meth:`update_state` or :meth:`merge_state` when a batch or another metric is
        of a different library than the state held (or another metric is not a
        ``kldiv.metrics.KLDivergence``), or an update gives traced arrays (see Notes);
        ``ValueError`` when it is on a different device or was made with other options. The constructor raises as :func:`kldiv.kl_divergence`
        does for bad ``inputs`` or ``temperature``.

    See Also
    --------
    kldiv.losses.KLDivergence : the loss class (reductions instead of a running mean).
    ReverseKLDivergence, JensenShannonDivergence : the other members' metrics.
    kldiv.evaluate_files : the metric (or loss) over ``.npy`` files, in bounded memory.

    Notes
    -----
    Before the first update the metric has no library: :meth:`result` then returns a NumPy
    0-d array holding 0. Under ``jax.jit`` use the functional ``kldiv.kld`` and sum the
    result yourself: the metric is an eager, stateful Python object, and an update with
    traced arrays (``jax.jit``, ``jax.grad``, ``jax.vmap``, ``torch.func`` transforms) is a
    ``TypeError`` that leaves the state as it was (a compiled function would never update it
    again). ``kldiv.evaluate_batches(..., metric=True)``, whose metric lives for the call
    only, works there.

    **In Keras.** Created while a Keras is imported (Keras 3 on any backend, or tf.keras 2
    through ``tf_keras``; kldiv never imports Keras itself), the metric is also a
    ``keras.metrics.Metric``: a ``MeanMetricWrapper`` of :func:`kldiv.kl_divergence`, as
    ``keras.metrics.KLDivergence`` is one of Keras' own function (with ``inputs=`` and
    ``temperature=`` passed to it, as ``MeanMetricWrapper(fn, **kwargs)`` does). So
    ``model.compile(metrics=[kldiv.metrics.KLDivergence()])`` (or ``weighted_metrics=``) logs
    Keras' numbers batch for batch, in ``fit`` and ``evaluate``, compiled or eagerly. Once
    Keras drives it (``compile``'s symbolic build, a compiled step, the ``stateless_*`` API, a
    TensorFlow graph, or TensorFlow tensors while Keras runs on TensorFlow), its state is two
    Keras variables updated with ``assign_add`` (stateless under ``jax.jit`` in Keras' JAX
    trainer), and it stays so; what it had accumulated before moves into them (except inside
    the symbolic build, where Keras resets its metrics anyway). Before that it is the metric
    described above, so a process where Keras is merely loaded (``import tensorflow`` loads
    Keras 3) keeps kldiv's behaviour: ``variables`` is empty until the first update (a custom
    JAX loop may pass that empty list to ``stateless_update_state``). tf.keras takes the
    metric over at ``compile``.

    Created *before* Keras is imported, the metric is kldiv's own. ``compile`` then wraps it in
    Keras' ``MeanMetricWrapper``, which calls it as a per-sample function: the metric
    recognises that caller and returns the per-sample divergence, so the logged values are
    the same (the state is then the wrapper's, and this object is left untouched). The same
    holds for a metric of one Keras given to the other (tf-keras wins when both are loaded).

    The default name is Keras 2's ``"kullback_leibler_divergence"`` (Keras 3 names its own
    ``"kl_divergence"``); ``get_config()`` is ``{"name": ..., "dtype": ...}`` either way (plus
    ``inputs`` and ``temperature`` where they are not the defaults; a pair of spaces as a
    list), and a pickled metric is rebuilt through the constructor, with its state.

    Examples
    --------
    >>> import numpy as np
    >>> from kldiv.metrics import KLDivergence
    >>> y_true = np.array([[0, 1], [0, 0]], dtype=np.float32)
    >>> y_pred = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)
    >>> m = KLDivergence()
    >>> m.update_state(y_true, y_pred, sample_weight=[1, 0])
    >>> print(m.result())
    0.9162892
    >>> m.update_state(y_true, y_pred)
    >>> print(m.result())
    0.61085844
    >>> m.get_config()
    {'name': 'kullback_leibler_divergence', 'dtype': 'float32'}
    >>> m.reset_state()
    >>> print(m.result())
    0.0

    Partial results of several workers combine with :meth:`merge_state`:

    >>> a, b = KLDivergence(), KLDivergence()
    >>> a.update_state(y_true[:1], y_pred[:1])
    >>> b.update_state(y_true[1:], y_pred[1:])
    >>> a.merge_state(b)
    >>> print(a.result())
    0.45814306
    """

    def __init__(self, name: str | None = "kullback_leibler_divergence", dtype: Any = None, *,
                 inputs: Any = "probs", temperature: Any = 1.0) -> None:
        super().__init__(name, dtype, inputs=inputs, temperature=temperature)


class ReverseKLDivergence(DivergenceMetric, member=REVERSE_KL, function=reverse_kl_divergence,
                          title="reverse KL divergence"):
    __doc__ = """A running (weighted) mean of the reverse KL divergence ``KL(Q || P)``.

    :class:`KLDivergence`'s metric (state, precision, sample weights, :meth:`merge_state`,
    config, pickling and Keras) of :func:`kldiv.reverse_kl_divergence`: P from ``y_true``, Q
    from ``y_pred``, ``sum(q * (log q - log p), axis=-1)`` per sample. With the default
    ``inputs="probs"`` each per-sample value is exactly ``kldiv.kl_divergence(y_pred,
    y_true)`` (both clipped to ``[1e-7, 1]``), computed in ``y_pred``'s library.

    Parameters
    ----------
    name : str or None, default "reverse_kl_divergence"
        The metric's name (``None``: the default).
""" + _DTYPE + _OPTIONS + """

    See Also
    --------
    kldiv.losses.ReverseKLDivergence : the loss class.

    Examples
    --------
    >>> import numpy as np
    >>> from kldiv.metrics import ReverseKLDivergence
    >>> teacher = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])   # logits
    >>> student = np.array([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    >>> m = ReverseKLDivergence(inputs="logits", temperature=2.0)
    >>> m.update_state(teacher, student, sample_weight=[1, 0])
    >>> m.update_state(teacher[1:], student[1:])
    >>> print(round(float(m.result()), 6))
    0.174223
    >>> m.get_config()
    {'name': 'reverse_kl_divergence', 'dtype': 'float32', 'inputs': 'logits', 'temperature': 2.0}
    """

    def __init__(self, name: str | None = "reverse_kl_divergence", dtype: Any = None, *,
                 inputs: Any = "probs", temperature: Any = 1.0) -> None:
        super().__init__(name, dtype, inputs=inputs, temperature=temperature)


class JensenShannonDivergence(DivergenceMetric, member=JS, function=js_divergence,
                              title="Jensen-Shannon divergence"):
    __doc__ = """A running (weighted) mean of the generalized Jensen-Shannon divergence.

    :class:`KLDivergence`'s metric (state, precision, sample weights, :meth:`merge_state`,
    config, pickling and Keras) of :func:`kldiv.js_divergence`: per sample
    ``beta * KL(P || M) + (1 - beta) * KL(Q || M)`` with ``M = beta * P + (1 - beta) * Q``, P
    from ``y_true``, Q from ``y_pred``.

    Parameters
    ----------
    name : str or None, default "js_divergence"
        The metric's name (``None``: the default).
""" + _DTYPE + """
    beta : float, default 0.5
        The weight of P in the mixture, in the open interval (0, 1) (0 and 1 are a
        ``ValueError`` pointing to :class:`KLDivergence` / :class:`ReverseKLDivergence`).""" + _OPTIONS + """

    See Also
    --------
    kldiv.losses.JensenShannonDivergence : the loss class.

    Examples
    --------
    >>> import numpy as np
    >>> from kldiv.metrics import JensenShannonDivergence
    >>> p = np.array([[1.0, 0.0], [0.5, 0.5]])
    >>> q = np.array([[0.0, 1.0], [0.5, 0.5]])
    >>> m = JensenShannonDivergence()
    >>> m.update_state(p, q)     # log 2 for the disjoint pair, 0 for the equal one
    >>> print(round(float(m.result()), 4))
    0.3466
    >>> a, b = JensenShannonDivergence(beta=0.3), JensenShannonDivergence(beta=0.3)
    >>> a.update_state(p[:1], q[:1])
    >>> b.update_state(p[1:], q[1:])
    >>> a.merge_state(b)      # workers' states: same class, same options
    >>> a.get_config()
    {'name': 'js_divergence', 'dtype': 'float32', 'beta': 0.3}
    """

    def __init__(self, name: str | None = "js_divergence", dtype: Any = None, *, beta: Any = 0.5,
                 inputs: Any = "probs", temperature: Any = 1.0) -> None:
        super().__init__(name, dtype, inputs=inputs, temperature=temperature, beta=beta)

    @property
    def beta(self) -> float:
        """The weight of P (``y_true``) in the mixture."""
        return float(self._kldiv_call.params["beta"])

