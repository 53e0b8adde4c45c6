"""The divergence functions: the Keras KL, KL from any input space, reverse KL, Jensen-Shannon.

Every call validates its options first (``inputs``, ``temperature``, ``beta``:
:func:`kldiv._dispatch.resolve`), then brings ``y_true`` to ``y_pred``'s library, device and
dtype (:func:`kldiv._spaces.prepare`: float16/bfloat16 computed in float32 and returned in the
input dtype), then runs the one dispatch, :func:`kldiv._dispatch.compute`: the fast path for
``(library, op)`` unless switched off with :func:`kldiv.use_generic` / ``KLDIV_GENERIC=1``,
else the member's generic array-API kernel. The forward and reverse KL with
``inputs="probs"`` are the Keras KL (:data:`kldiv._divergence.KERAS_KL`), bit for bit.

The public functions (:func:`kl_divergence`, :func:`reverse_kl_divergence`,
:func:`js_divergence`) are defined here and exported by :mod:`kldiv`, :mod:`kldiv.losses` and
(``kl_divergence``) :mod:`kldiv._functional`.
"""

from __future__ import annotations

from typing import Any

from ._dispatch import Call, compute, resolve_traced
from ._divergence import JS, KERAS_KL, KL, REVERSE_KL
from ._namespace import numpy_result, torch_compiling
from ._spaces import prepare

__all__ = [
    "evaluate",
    "jensen_shannon_divergence",
    "js_divergence",
    "kl_divergence",
    "reverse_kl_divergence",
]

def evaluate(call: Call, y_true: Any, y_pred: Any, *, tracing: bool | None = None) -> Any:
    """Prepare and compute one resolved call: the functions' common body.

    The inputs broadcast as given (no rank squeeze); a 0-d NumPy result is a NumPy scalar
    (:func:`kldiv._namespace.numpy_result`), as NumPy's own reductions give. ``tracing``:
    :func:`~kldiv._namespace.torch_compiling`'s answer where the caller has it; asked once
    per call (here when ``None``) and handed to every step.
    """
    prep = prepare(y_true, y_pred, squeeze=False, tracing=tracing)
    return numpy_result(compute(call, prep, compiling=prep.tracing))


_KERAS_KL = Call(KERAS_KL, ("probs", "probs"))  # resolve(KL): the defaults


def kl_divergence(y_true: Any, y_pred: Any, /, *, inputs: Any = "probs",
                  temperature: Any = 1.0) -> Any:
    """The Kullback-Leibler divergence ``KL(P || Q)``: Keras' loss, and from log-probabilities
    or logits, in the inputs' own library and device.

    P comes from ``y_true``, Q from ``y_pred``; the divergence is summed over the last axis.
    With the default ``inputs="probs"`` this is exactly ``tf.keras.losses.kl_divergence``:
    ``loss = sum(t * log(t / p), axis=-1)`` with ``t = clip(y_true, 1e-7, 1)`` and
    ``p = clip(y_pred, 1e-7, 1)``.

    Parameters
    ----------
    y_true : array_like
        True distributions, shape ``(..., C)``. Any supported library (NumPy, PyTorch, JAX,
        CuPy, Dask, array-API), a Python list or a number; converted to ``y_pred``'s library,
        device and dtype (through DLPack where it can be).
    y_pred : array_like
        Predicted distributions, broadcastable with ``y_true``. Its library and device are
        where the computation runs.
    inputs : {"probs", "log_probs", "logits"} or pair of them, default "probs"
        The space of both inputs, or ``(y_true's, y_pred's)``, e.g. ``("probs", "logits")``
        for soft labels against logits:

        - ``"probs"``: probabilities, clipped to ``[1e-7, 1]`` as Keras does (today's
          behaviour, bit for bit);
        - ``"log_probs"``: natural-log probabilities, not clipped:
          ``sum(exp(lp) * (lp - lq))`` with ``0 * log 0 = 0`` (an entry with ``lp = -inf``
          contributes 0, also to the gradient);
        - ``"logits"``: unnormalised logits, divided by ``temperature`` and log-softmaxed over
          the last axis (stably; in float32 for half precision). ``-inf`` logits (a masked
          vocabulary entry) are allowed on both sides; a row of all ``-inf`` is the zero
          measure, never NaN.
    temperature : float, default 1.0
        Divides logits; a finite number > 0, and only with ``"logits"`` inputs. The result is
        *not* multiplied by ``temperature ** 2`` (for Hinton's scaling, multiply it yourself).

    Returns
    -------
    array
        The per-sample divergence, of shape ``broadcast(y_true, y_pred).shape[:-1]``: an array
        of ``y_pred``'s library on its device, with its floating dtype (integer and bool
        ``y_pred`` give float32; float16/bfloat16 are computed in float32 and rounded back).
        On NumPy a 0-d result (1-d inputs) is a NumPy scalar, as NumPy's own reductions
        give. A Dask input gives a lazy Dask array. ``+inf`` where Q is 0 and P is not (a
        ``-inf`` log-probability or logit of ``y_pred`` only).

    Raises
    ------
    TypeError
        If ``y_true`` cannot be cast to ``y_pred``'s dtype (strings, objects, complex), an
        input is not an array, it is a sparse array, or ``inputs``/``temperature`` have the
        wrong type.
    ValueError
        If both inputs are 0-d (there is no class axis), the shapes do not broadcast (the
        message names the shapes as given), ``inputs`` names an unknown space, the
        temperature is not > 0 or is given without logits, or a logits input's class axis
        would be broadcast.

    See Also
    --------
    reverse_kl_divergence : ``KL(Q || P)``.
    js_divergence : the generalized Jensen-Shannon divergence.

    Notes
    -----
    The inputs broadcast as given, like ``tf.keras.losses.kld`` and
    ``keras.losses.kl_divergence``: ``y_true`` of shape ``(3, 1)`` against ``y_pred`` of shape
    ``(3,)`` gives shape ``(3,)``. Keras' rank squeeze (a trailing axis of 1 dropped when the
    ranks differ by one) belongs to the loss class, :class:`kldiv.KLDivergence`.

    With ``"probs"``, values outside ``[0, 1]`` are clipped silently, as in Keras; NaN
    propagates. The gradient is that of the formula inside the clip range and 0 for clipped
    elements, and is finite for zeros in either input.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> kldiv.kl_divergence([.4, .9, .2], [.5, .8, .12])
    np.float32(0.11891246)
    >>> kldiv.kld(np.array([[0., 1.], [0., 0.]]), np.array([[.6, .4], [.4, .6]]))
    array([ 9.16289171e-01, -3.08090749e-06])
    >>> kldiv.kld(np.full((3, 1), 0.5), np.full(3, 0.25)).shape   # broadcast, no squeeze
    (3,)
    >>> teacher = np.array([[2.0, 1.0, -np.inf]])   # logits; the last entry masked
    >>> student = np.array([[1.0, 1.0, 0.0]])
    >>> kldiv.kl_divergence(teacher, student, inputs="logits").round(6)
    array([0.279792])
    >>> kldiv.kl_divergence(teacher, student, inputs="logits", temperature=2.0).round(6)
    array([0.295173])
    """
    tracing = torch_compiling()  # once per call
    if (type(inputs) is str and inputs == "probs"
            and type(temperature) is float and temperature == 1.0):
        call = _KERAS_KL  # the defaults: no options to check
    else:
        call = resolve_traced(KL, inputs, temperature, {}, tracing)
    return evaluate(call, y_true, y_pred, tracing=tracing)


kl_divergence_family = kl_divergence
"""The name ``kl_divergence`` had in this module before it became the public function."""


def reverse_kl_divergence(y_true: Any, y_pred: Any, /, *, inputs: Any = "probs",
                          temperature: Any = 1.0) -> Any:
    """The reverse Kullback-Leibler divergence ``KL(Q || P)``, summed over the last axis.

    P comes from ``y_true`` (the teacher, the data), Q from ``y_pred`` (the student, the
    model): ``sum(q * (log q - log p), axis=-1)``, mode-seeking where the forward KL
    :func:`kldiv.kl_divergence` is mass-covering.

    Parameters
    ----------
    y_true : array_like
        P, shape ``(..., C)``: any supported library, a list or a number; converted to
        ``y_pred``'s library, device and dtype.
    y_pred : array_like
        Q, broadcastable with ``y_true``; its library and device are where the computation
        runs.
    inputs : {"probs", "log_probs", "logits"} or pair of them, default "probs"
        The space of both inputs, or ``(y_true's, y_pred's)``:

        - ``"probs"``: probabilities, clipped to ``[1e-7, 1]`` as Keras does;
          ``sum(q * log(q / p))`` on the clipped values, i.e. exactly
          ``kl_divergence(y_pred, y_true)`` computed in ``y_pred``'s library;
        - ``"log_probs"``: natural-log probabilities, not clipped; ``-inf`` is a probability
          of 0 (``0 * log 0 = 0``, also for the gradient);
        - ``"logits"``: unnormalised logits, divided by ``temperature`` and log-softmaxed over
          the last axis (stably; in float32 for half precision). ``-inf`` logits (a masked
          vocabulary entry) are allowed; a row of all ``-inf`` is the zero measure (it
          contributes as all-zero probabilities), never NaN.
    temperature : float, default 1.0
        Divides logits; > 0, and only with ``"logits"`` inputs. The result is *not* multiplied
        by ``temperature ** 2`` (Hinton's scaling: multiply it yourself).

    Returns
    -------
    array
        The per-sample divergence, of shape ``broadcast(y_true, y_pred).shape[:-1]``, in
        ``y_pred``'s library, device and floating dtype. ``+inf`` where Q > 0 and P = 0
        (a ``-inf`` log-probability or logit of ``y_true``).

    Raises
    ------
    TypeError
        For an input that is not an array (or castable), or ``inputs``/``temperature`` of the
        wrong type.
    ValueError
        For an unknown input space, a temperature that is not > 0 or is given without logits,
        shapes that do not broadcast, or logits whose class axis would be broadcast.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> p = np.array([0.7, 0.2, 0.1])
    >>> q = np.array([0.5, 0.25, 0.25])
    >>> round(float(kldiv.reverse_kl_divergence(p, q)), 6)
    0.116622
    >>> lp, lq = np.log(p), np.log(q)
    >>> round(float(kldiv.reverse_kl_divergence(lp, lq, inputs="log_probs")), 6)
    0.116622
    """
    tracing = torch_compiling()  # once per call
    call = resolve_traced(REVERSE_KL, inputs, temperature, {}, tracing)
    return evaluate(call, y_true, y_pred, tracing=tracing)


def js_divergence(y_true: Any, y_pred: Any, /, *, beta: Any = 0.5, inputs: Any = "probs",
                  temperature: Any = 1.0) -> Any:
    """The generalized Jensen-Shannon divergence, summed over the last axis.

    ``beta * KL(P || M) + (1 - beta) * KL(Q || M)`` with ``M = beta * P + (1 - beta) * Q``,
    P from ``y_true`` and Q from ``y_pred``; ``log M`` is computed in log space
    (``logaddexp(log(beta) + log p, log1p(-beta) + log q)``). Bounded (by
    ``-beta log(beta) - (1 - beta) log(1 - beta)``, ``log 2`` at ``beta = 0.5``) and finite
    even where P or Q is 0. The GKD paper's JSD(beta); TRL's ``generalized_jsd_loss`` and
    Liger-Kernel's JSD with the same ``beta`` (teacher P = ``y_true``) for ``0 < beta < 1``.

    Parameters
    ----------
    y_true, y_pred, inputs, temperature
        As for :func:`reverse_kl_divergence`. With ``"probs"`` both inputs are clipped to
        ``[1e-7, 1]`` (not renormalised) and their logarithms used.
    beta : float, default 0.5
        The weight of P in the mixture, in the open interval (0, 1). At 0 and 1 the divergence
        vanishes identically: TRL's and Liger's ``beta=0`` / ``beta=1`` special cases are
        :func:`kldiv.kl_divergence` / :func:`reverse_kl_divergence`, and asking for them here
        is a ``ValueError`` that says so.

    Returns
    -------
    array
        The per-sample divergence, shape ``broadcast(y_true, y_pred).shape[:-1]``, in
        ``y_pred``'s library, device and floating dtype.

    Examples
    --------
    >>> import numpy as np
    >>> import kldiv
    >>> p = np.array([1.0, 0.0])
    >>> q = np.array([0.0, 1.0])
    >>> round(float(kldiv.js_divergence(p, q)), 4)  # disjoint supports: log 2
    0.6931
    >>> logits = np.array([[0.0, 0.0, -np.inf]])
    >>> kldiv.js_divergence(logits, logits, inputs="logits", beta=0.3)
    array([0.])
    """
    tracing = torch_compiling()  # once per call
    call = resolve_traced(JS, inputs, temperature, {"beta": beta}, tracing)
    return evaluate(call, y_true, y_pred, tracing=tracing)


jensen_shannon_divergence = js_divergence
