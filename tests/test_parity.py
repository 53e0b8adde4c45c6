"""Parity with tf.keras (Keras 2, through tf-keras) on a few hundred random cases.

Run by ``nox -s parity`` (``TF_USE_LEGACY_KERAS=1``). There ``KLDIV_REQUIRE_PARITY=1`` is set,
so a missing TensorFlow fails the session instead of skipping it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import kldiv

pytestmark = pytest.mark.parity

N_CASES = 400
KERAS2_REDUCTIONS = ["auto", "sum_over_batch_size", "sum", "none"]
TOL = {"float32": {"rtol": 2e-5, "atol": 2e-6}, "float64": {"rtol": 1e-12, "atol": 1e-13}}


@pytest.fixture(scope="module")
def tf_keras() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tf_keras
    except ImportError as exc:
        if os.environ.get("KLDIV_REQUIRE_PARITY"):
            pytest.fail(f"tf-keras is required for the parity session: {exc}")
        pytest.skip(f"tf-keras is not installed ({exc}): run `nox -s parity`")
    return tf_keras


@dataclass
class Case:
    y_true: np.ndarray
    y_pred: np.ndarray
    reduction: str
    weight: Any
    weight_form: str
    dtype: str

    def __repr__(self) -> str:
        return f"{self.y_pred.shape}-{self.dtype}-{self.reduction}-{self.weight_form}"


def _weight(rng: np.random.Generator, loss_shape: tuple[int, ...], form: str, dtype: str) -> Any:
    r = len(loss_shape)
    if form == "none":
        return None
    if form == "scalar":
        # tf.keras turns a Python float weight into a float32 tensor first (then casts it to
        # the loss dtype); kldiv keeps it in the loss dtype. Use float32-exact values here.
        return float(np.float32(rng.uniform(0, 3)))
    if form == "full":  # same shape as the per-sample loss
        return rng.uniform(0, 2, size=loss_shape).astype(dtype)
    if form == "rank+1":  # trailing axis of 1 (squeezed)
        return rng.uniform(0, 2, size=(*loss_shape, 1)).astype(dtype)
    if form == "rank-1":  # a (B,) weight for a (B, T) loss
        return rng.uniform(0, 2, size=loss_shape[:-1]).astype(dtype)
    if form == "broadcast":  # leading 1s broadcast to the loss shape
        return rng.uniform(0, 2, size=(1,) * (r - 1) + loss_shape[-1:]).astype(dtype)
    raise AssertionError(form)


def _forms(r: int) -> list[str]:
    forms = ["none", "scalar", "rank+1"]
    if r >= 1:
        forms += ["full"]
    if r >= 2:
        forms += ["rank-1", "broadcast"]
    return forms


def _cases() -> list[Case]:
    rng = np.random.default_rng(20261123)
    cases = []
    for i in range(N_CASES):
        ndim = 1 + i % 4
        dims = [int(rng.integers(1, 6)) for _ in range(ndim)]
        if ndim >= 2 and i % 13 == 0:
            dims[0] = 0  # an empty batch
        shape = tuple(dims)
        dtype = "float32" if i % 2 == 0 else "float64"
        # inputs outside [0, 1] (clipped), exact zeros, and plain probabilities
        t = rng.uniform(-0.3, 1.3, size=shape)
        p = rng.uniform(-0.3, 1.3, size=shape)
        t[rng.random(shape) < 0.15] = 0.0
        if i % 3 == 0:  # rows of real distributions
            t = np.abs(t) + 1e-3
            t /= t.sum(axis=-1, keepdims=True)
            p = np.abs(p) + 1e-3
            p /= p.sum(axis=-1, keepdims=True)
        loss_shape = shape[:-1]
        forms = _forms(len(loss_shape))
        form = forms[int(rng.integers(len(forms)))]
        reduction = KERAS2_REDUCTIONS[i % len(KERAS2_REDUCTIONS)]
        cases.append(Case(t.astype(dtype), p.astype(dtype), reduction, _weight(rng, loss_shape, form, dtype), form, dtype))
    return cases


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{i:03d}-{c!r}" for i, c in enumerate(CASES)])
def test_loss_class_matches_tf_keras(tf_keras: Any, case: Case) -> None:
    ref = tf_keras.losses.KLDivergence(reduction=case.reduction)(case.y_true, case.y_pred, sample_weight=case.weight)
    got = kldiv.KLDivergence(reduction=case.reduction)(case.y_true, case.y_pred, sample_weight=case.weight)
    ref = ref.numpy()
    assert np.asarray(got).dtype == np.dtype(case.dtype)
    assert np.shape(got) == ref.shape
    np.testing.assert_allclose(got, ref, **TOL[case.dtype])


@pytest.mark.parametrize("case", CASES[:100], ids=[f"{i:03d}-{c!r}" for i, c in enumerate(CASES[:100])])
def test_function_matches_tf_keras(tf_keras: Any, case: Case) -> None:
    ref = tf_keras.losses.kl_divergence(case.y_true, case.y_pred).numpy()
    got = kldiv.kl_divergence(case.y_true, case.y_pred)
    assert np.shape(got) == ref.shape
    np.testing.assert_allclose(got, ref, **TOL[case.dtype])


def test_seed_reference_values_from_tf_keras(tf_keras: Any) -> None:
    """SPEC's reference numbers were read off tf.keras: check the oracle still gives them."""
    yt = np.array([[0, 1], [0, 0]], dtype=np.float32)
    yp = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)
    np.testing.assert_allclose(tf_keras.losses.KLDivergence()(yt, yp).numpy(), 0.45814306, rtol=1e-6)
    np.testing.assert_allclose(kldiv.KLDivergence()(yt, yp), 0.45814306, rtol=1e-6)


def test_where_kldiv_deliberately_differs(tf_keras: Any) -> None:
    """tf.keras accepts a weight that does not broadcast to the loss; kldiv refuses it."""
    yt = np.array([[0.0, 1.0]], dtype=np.float32)
    yp = np.array([[0.6, 0.4]], dtype=np.float32)
    w = np.ones((1, 3, 4), dtype=np.float32)
    tf_keras.losses.KLDivergence()(yt, yp, sample_weight=w)  # no error in tf.keras
    with pytest.raises(ValueError, match="does not broadcast"):
        kldiv.KLDivergence()(yt, yp, sample_weight=w)


# Rank combinations (y_true shape, y_pred shape), including those where Keras' class squeezes
# a trailing axis of 1 and those where the shapes do not broadcast at all.
RANK_PAIRS = [
    ((3, 1), (3,)), ((3,), (3, 1)), ((3, 1), (5, 3, 1)), ((5, 3, 1), (3, 1)), ((2, 3), (2, 3, 1)),
    ((2, 3, 1), (2, 3)), ((2, 1), (2,)), ((2,), (2, 1)), ((1,), (3,)), ((2, 3), (3,)),
    ((4, 1), (4, 1)), ((2, 1, 1), (2, 1)), ((2, 1), (2, 1, 1)), ((0, 1), (0,)), ((3, 2), (3,)),
    ((1, 1), (1,)), ((2, 3, 1), (2, 1)), ((5, 1), (3, 1)), ((3, 2, 1), (2,)),
]


def _rank_inputs(t_shape: tuple[int, ...], p_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(len(t_shape) * 7 + sum(p_shape))
    return rng.random(t_shape).astype(np.float32), rng.random(p_shape).astype(np.float32)


def _tf_result(fn: Any) -> Any:
    """tf.keras' result as an array, or ``ValueError`` when it fails on the shapes."""
    import tensorflow as tf

    try:
        return np.asarray(fn())
    except (tf.errors.InvalidArgumentError, ValueError):
        return ValueError


@pytest.mark.parametrize(("t_shape", "p_shape"), RANK_PAIRS, ids=[f"{t}-{p}" for t, p in RANK_PAIRS])
def test_function_ranks_match_tf_keras_function(tf_keras: Any, t_shape: tuple, p_shape: tuple) -> None:
    """The function broadcasts as given, like ``tf.keras.losses.kld`` (no rank squeeze)."""
    import tensorflow as tf

    t, p = _rank_inputs(t_shape, p_shape)
    for wrap in (np.asarray, tf.constant):
        ref = _tf_result(lambda wrap=wrap: tf_keras.losses.kld(wrap(t), wrap(p)))
        if ref is ValueError:
            with pytest.raises(ValueError, match=r"y_true of shape .* and y_pred of shape .* do not broadcast"):
                kldiv.kld(t, p)
        else:
            got = kldiv.kld(t, p)
            assert np.shape(got) == ref.shape
            np.testing.assert_allclose(got, ref, **TOL["float32"])


@pytest.mark.parametrize(("t_shape", "p_shape"), RANK_PAIRS, ids=[f"{t}-{p}" for t, p in RANK_PAIRS])
def test_class_ranks_match_tf_keras_class_on_tensors(tf_keras: Any, t_shape: tuple, p_shape: tuple) -> None:
    """The class applies Keras 2's ``squeeze_or_expand_dimensions``, as tf.keras' class does
    on tensors (tf.keras skips it for NumPy inputs, a quirk kldiv does not copy)."""
    import tensorflow as tf

    t, p = _rank_inputs(t_shape, p_shape)
    for reduction in ("none", "sum"):
        ref = _tf_result(
            lambda reduction=reduction: tf_keras.losses.KLDivergence(reduction=reduction)(tf.constant(t), tf.constant(p))
        )
        loss = kldiv.KLDivergence(reduction=reduction)
        if ref is ValueError:
            with pytest.raises(ValueError, match=r"y_true of shape .* and y_pred of shape .* do not broadcast"):
                loss(t, p)
        else:
            got = loss(t, p)
            assert np.shape(got) == ref.shape
            np.testing.assert_allclose(got, ref, **TOL["float32"])
            # kldiv's own TensorFlow path gives the same
            np.testing.assert_allclose(loss(tf.constant(t), tf.constant(p)).numpy(), ref, **TOL["float32"])
