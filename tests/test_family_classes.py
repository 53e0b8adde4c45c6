"""The family's faces: the loss classes ``KLDivergence(inputs=, temperature=)``,
``ReverseKLDivergence`` and ``JensenShannonDivergence``, the ``"batchmean"`` reduction, masks
as sample weights, and the public function names.

References: the float64 oracle of ``tests/test_family.py`` (written from the definitions) with
the reductions written out here in NumPy, and, in Keras, a hand-written ``keras.losses.Loss``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pickle
import subprocess
import sys
import zlib
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend
from kldiv import JensenShannonDivergence, KLDivergence, Reduction, ReverseKLDivergence, _keras
from test_family import _inputs, _spaces, oracle

CLASSES: dict[str, tuple[type, dict[str, Any]]] = {
    "kl": (KLDivergence, {}),
    "reverse_kl": (ReverseKLDivergence, {}),
    "js": (JensenShannonDivergence, {"beta": 0.3}),
}
REDUCTIONS = ["auto", "sum_over_batch_size", "mean", "sum", "none", "mean_with_sample_weight",
              "batchmean"]


def _reduce64(per: np.ndarray, w: np.ndarray | None, reduction: str) -> np.ndarray:
    """The reductions, from their definitions (README's table), in float64."""
    weighted = per if w is None else per * w
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return np.asarray(total)
    if reduction == "mean_with_sample_weight" and w is not None:
        denom = np.broadcast_to(w, per.shape).sum()
        return np.asarray(0.0 if denom == 0 else total / denom)
    if reduction == "batchmean":
        n = per.shape[0] if per.ndim else 1
        return np.asarray(0.0 if n == 0 else total / n)
    return np.asarray(0.0 if per.size == 0 else total / per.size)


def _close(got: Any, want: np.ndarray, dtype: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    if dtype == "float64":
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    else:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=5e-6)


# ------------------------------------------------------------------------------ batchmean
def test_batchmean_constant() -> None:
    assert Reduction.BATCHMEAN == "batchmean"
    assert "batchmean" in Reduction.all()
    assert Reduction.validate("batchmean") == "batchmean"
    for bad in ("BATCHMEAN", "batch_mean", " batchmean"):
        with pytest.raises(ValueError, match="batchmean"):
            Reduction.validate(bad)


@pytest.mark.parametrize("shape", [(3,), (4, 3), (2, 5, 3), (0, 3), (0, 4, 3), (4, 0, 3)], ids=str)
def test_batchmean_divides_by_the_first_axis(backend: ArrayBackend, shape: tuple[int, ...]) -> None:
    """``sum(loss * w) / loss.shape[0]`` (torch's ``batchmean``): the tokens of a ``(B, T)``
    loss count once per row; a 0-d loss (1-d inputs) is one sample; an empty batch gives 0."""
    rng = np.random.default_rng(zlib.crc32(str(shape).encode()))
    t = rng.random(shape).astype(np.float32)
    p = rng.random(shape).astype(np.float32)
    per = oracle("kl", t, p)
    weights = [None, rng.random(per.shape).astype(np.float32)]
    if per.ndim == 2:
        weights.append(rng.random(per.shape[:1]).astype(np.float32))  # (B,) on (B, T): rows
    for w in weights:
        loss = KLDivergence(reduction="batchmean")
        got = loss(backend.asarray(t), backend.asarray(p),
                   sample_weight=None if w is None else backend.asarray(w))
        assert backend.is_native(got)
        assert got.dtype == backend.dtype("float32")
        wf = None if w is None else (w[:, None] if w.ndim == per.ndim - 1 else w)
        _close(backend.to_numpy(got), _reduce64(per, wf, "batchmean"), "float32")


def test_batchmean_unknown_sizes() -> None:
    """Lazy sizes: Dask rows of unknown count (a boolean selection) are counted lazily."""
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(30)
    t = rng.random((5, 4, 6)).astype(np.float32)
    p = rng.random((5, 4, 6)).astype(np.float32)
    keep = np.array([True, False, True, True, False])
    lt, lp = da.from_array(t)[da.from_array(keep)], da.from_array(p)[da.from_array(keep)]
    assert np.isnan(lt.shape[0])
    got = KLDivergence(reduction="batchmean")(lt, lp)
    assert isinstance(got, da.Array)
    _close(got.compute(), _reduce64(oracle("kl", t[keep], p[keep]), None, "batchmean"), "float32")
    nothing = da.from_array(np.zeros(5, bool))  # no rows at all, of unknown count
    empty = KLDivergence(reduction="batchmean")(da.from_array(t)[nothing], da.from_array(p)[nothing])
    assert float(empty.compute()) == 0.0


def test_batchmean_in_a_tf_function_with_an_unknown_batch() -> None:
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(31)
    t = rng.random((3, 4, 6)).astype(np.float32)
    p = rng.random((3, 4, 6)).astype(np.float32)
    loss = JensenShannonDivergence(reduction="batchmean", beta=0.4)
    spec = tf.TensorSpec((None, None, 6), tf.float32)
    fn = tf.function(lambda a, b: loss(a, b), input_signature=[spec, spec])
    _close(fn(tf.constant(t), tf.constant(p)).numpy(),
           _reduce64(oracle("js", t, p, beta=0.4), None, "batchmean"), "float32")


def test_streaming_refuses_batchmean_clearly() -> None:
    """The streaming evaluation has reductions of its own: ``"batchmean"`` is a clear error
    there, never another reduction's value."""
    t = np.full((4, 3), 1 / 3, np.float32)
    with pytest.raises(ValueError, match="'batchmean' is not supported here"):
        kldiv.evaluate_batches([t], [t], reduction="batchmean")


# ------------------------------------------------------------- the classes vs. the oracle
CLASS_SPACES: list[Any] = ["probs", "log_probs", "logits", ("probs", "logits")]


def _weight_forms(rng: np.random.Generator, loss_shape: tuple[int, ...]) -> list[Any]:
    forms: list[Any] = [None, rng.uniform(0.0, 2.0, loss_shape[:1]).astype(np.float32),
                        rng.random(loss_shape) < 0.6]  # per row; a mask of tokens
    if len(loss_shape) > 1:
        forms.append(rng.uniform(0.0, 2.0, loss_shape).astype(np.float32))  # per token
    return forms


def _as_weight(w: np.ndarray | None, loss_shape: tuple[int, ...]) -> np.ndarray | None:
    """The weight as Keras 2's rank rules apply it, in float64."""
    if w is None:
        return None
    w = w.astype(np.float64)
    return w.reshape(w.shape + (1,) * (len(loss_shape) - w.ndim))


@pytest.mark.parametrize("inputs", CLASS_SPACES, ids=str)
@pytest.mark.parametrize("member", list(CLASSES))
def test_classes_match_float64_oracle(backend: ArrayBackend, member: str, inputs: Any) -> None:
    """Every reduction (with batchmean), weights per row, per token and boolean masks, on every
    backend, against the oracle reduced by the definitions above."""
    cls, params = CLASSES[member]
    rng = np.random.default_rng(zlib.crc32(f"class{member}{inputs}".encode()))
    T = 1.7 if "logits" in _spaces(inputs) else 1.0
    probs_vs_logits = _spaces(inputs) == ("probs", "logits")
    for shape in ((5, 7), (2, 3, 7)):
        for dtype in ("float32", "float64"):
            t, p = _inputs(rng, shape, inputs, one_sided=False, masked=not probs_vs_logits)
            t, p = t.astype(dtype), p.astype(dtype)
            per = oracle(member, t, p, inputs, T, params.get("beta", 0.5))
            for w in _weight_forms(rng, per.shape):
                wb = None if w is None else backend.asarray(w)
                for reduction in REDUCTIONS:
                    loss = cls(reduction=reduction, inputs=inputs, temperature=T, **params)
                    got = loss(backend.asarray(t, dtype), backend.asarray(p, dtype), sample_weight=wb)
                    assert backend.is_native(got)
                    assert str(got.dtype).endswith(dtype)
                    want = _reduce64(per, _as_weight(w, per.shape), reduction)
                    _close(backend.to_numpy(got), want, dtype)
            np.testing.assert_allclose(
                np.asarray(backend.to_numpy(cls(inputs=inputs, temperature=T, **params).call(
                    backend.asarray(t, dtype), backend.asarray(p, dtype))), np.float64),
                per, rtol=2e-5 if dtype == "float32" else 1e-9, atol=5e-6 if dtype == "float32" else 1e-12)


def test_kl_class_with_probs_is_today_s_bit_for_bit(backend: ArrayBackend) -> None:
    """``KLDivergence(inputs="probs")`` (the default, also given explicitly) runs the Keras KL."""
    rng = np.random.default_rng(32)
    t = rng.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    p = rng.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    a, b = backend.asarray(t), backend.asarray(p)
    for reduction in REDUCTIONS:
        default = KLDivergence(reduction=reduction)(a, b)
        explicit = KLDivergence(reduction=reduction, inputs="probs", temperature=1.0)(a, b)
        np.testing.assert_array_equal(backend.to_numpy(default), backend.to_numpy(explicit))
    np.testing.assert_array_equal(backend.to_numpy(KLDivergence(reduction="none")(a, b)),
                                  backend.to_numpy(kldiv.kl_divergence(a, b)))
    np.testing.assert_array_equal(backend.to_numpy(ReverseKLDivergence(reduction="none")(a, b)),
                                  backend.to_numpy(kldiv.kl_divergence(b, a)))


def test_classes_apply_keras_rank_squeeze() -> None:
    t = np.array([[0.2], [0.3], [0.5]])
    p = np.array([0.3, 0.3, 0.4])
    for member, (cls, params) in CLASSES.items():
        out = cls(reduction="none", **params)(t, p)
        assert out.shape == ()  # (3, 1) against (3,): one sample of 3 classes
        _close(out, oracle(member, t[:, 0], p, beta=params.get("beta", 0.5)), "float64")


# ------------------------------------------------------------------------ masks as weights
def _masked_logits(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, S, V) teacher and student logits with a shared masked vocabulary (-inf), masked
    tokens whose rows hold -inf (entirely, or shared entries only), and the token mask."""
    b, s, v = 3, 4, 7
    t = rng.normal(0.0, 2.0, (b, s, v))
    p = rng.normal(0.0, 2.0, (b, s, v))
    t[..., -2:] = p[..., -2:] = -np.inf           # a masked vocabulary
    mask = np.ones((b, s), bool)
    mask[:, 0] = False                              # prompt tokens
    mask[2, 2:] = False                             # padding
    t[2, 3] = p[2, 3] = -np.inf                     # a padded row of -inf logits on both sides
    t[1, 0, :3] = p[1, 0, :3] = -np.inf             # more shared -inf in a masked row
    return t, p, mask


def _grads(diff_backend: ArrayBackend, loss: Any, t: np.ndarray, p: np.ndarray,
           w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    name = diff_backend.name.split("-")[0]
    if name == "torch":
        torch = diff_backend.module
        a = torch.tensor(t, device=diff_backend.device, requires_grad=True)
        b = torch.tensor(p, device=diff_backend.device, requires_grad=True)
        out = loss(a, b, sample_weight=torch.tensor(w, device=diff_backend.device))
        out.backward()
        return float(out.detach()), a.grad.cpu().numpy(), b.grad.cpu().numpy()
    import jax

    fn = jax.jit(jax.value_and_grad(lambda a, b: loss(a, b, sample_weight=w), argnums=(0, 1)))
    value, (ga, gb) = fn(diff_backend.asarray(t), diff_backend.asarray(p))
    return float(value), np.asarray(ga), np.asarray(gb)


@pytest.mark.parametrize("generic", [False, True], ids=["fast", "generic"])
@pytest.mark.parametrize("member", list(CLASSES))
def test_masks_are_sample_weights(diff_backend: ArrayBackend, member: str, generic: bool) -> None:
    """``sample_weight=(labels != -100)`` with ``"mean_with_sample_weight"``: the mean over the
    unmasked tokens, gradients those of that mean (zero on masked tokens), finite; and an
    all-masked batch gives 0 with zero, finite gradients, for every reducing reduction."""
    from test_family import _closed_forms

    cls, params = CLASSES[member]
    beta = params.get("beta", 0.5)
    rng = np.random.default_rng(33)
    t, p, mask = _masked_logits(rng)
    T = 2.0
    per = oracle(member, t, p, "logits", T, beta)
    assert np.isfinite(per).all()
    want = per[mask].mean()
    g_t, g_s = _closed_forms(member, t, p, T, beta)
    scale = (mask / mask.sum())[..., None]
    with kldiv.use_generic(generic):
        loss = cls(reduction="mean_with_sample_weight", inputs="logits", temperature=T, **params)
        value, ga, gb = _grads(diff_backend, loss, t, p, mask)
        np.testing.assert_allclose(value, want, rtol=1e-9)
        for got, closed in ((ga, g_t), (gb, g_s)):
            assert np.isfinite(got).all()
            np.testing.assert_allclose(got, np.where(scale > 0, closed, 0.0) * scale,
                                       rtol=1e-8, atol=1e-12)
            assert np.all(got[~mask] == 0.0)
        none = np.zeros_like(mask)
        for reduction in ("mean_with_sample_weight", "batchmean", "sum", "auto"):
            loss = cls(reduction=reduction, inputs="logits", temperature=T, **params)
            value, ga, gb = _grads(diff_backend, loss, t, p, none)
            assert value == 0.0
            assert np.isfinite(ga).all() and np.isfinite(gb).all()
            assert not ga.any() and not gb.any()


# ------------------------------------------------------- config, pickling, repr, signature
def test_default_configs_and_names() -> None:
    assert KLDivergence().get_config() == {"reduction": "auto", "name": "kl_divergence"}
    assert ReverseKLDivergence().get_config() == {"reduction": "auto",
                                                  "name": "reverse_kl_divergence"}
    assert JensenShannonDivergence().get_config() == {"reduction": "auto", "name": "js_divergence",
                                                      "beta": 0.5}
    assert not isinstance(ReverseKLDivergence(), KLDivergence)
    assert KLDivergence() != ReverseKLDivergence()
    assert KLDivergence(inputs="logits") != KLDivergence()
    assert kldiv.losses.ReverseKLDivergence is ReverseKLDivergence
    assert kldiv.losses.JensenShannonDivergence is JensenShannonDivergence


OPTIONS: list[dict[str, Any]] = [
    {},
    {"inputs": "logits", "temperature": 2.5},
    {"inputs": ("probs", "logits"), "reduction": "batchmean", "name": "distill"},
    {"inputs": ["log_probs", "logits"], "temperature": 0.5, "dtype": "float64", "reduction": None},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("member", list(CLASSES))
def test_config_round_trip(member: str, options: dict[str, Any]) -> None:
    cls, params = CLASSES[member]
    loss = cls(**options, **params)
    config = loss.get_config()
    for again in (cls.from_config(config), cls.from_config(json.loads(json.dumps(config)))):
        assert again == loss and again is not loss
        assert again.get_config() == config
        assert type(again) is type(loss)
    if "inputs" in options:
        spaces = options["inputs"]
        assert config["inputs"] == (spaces if isinstance(spaces, str) else list(spaces))
    if "temperature" in options:
        assert config["temperature"] == options["temperature"]
    rng = np.random.default_rng(34)
    t, p = _inputs(rng, (3, 5), loss.inputs, masked=False)
    np.testing.assert_array_equal(cls.from_config(config)(t, p), loss(t, p))


def test_keras_configs_load() -> None:
    """Today's configs and Keras' forms: Keras 2's ``"fn"`` key (the member's names only),
    Keras 3's ``None`` reduction and dtype policy; unknown keys are a ``TypeError``."""
    assert KLDivergence.from_config({"reduction": "auto", "name": "kl_divergence"}) == KLDivergence()
    assert KLDivergence.from_config({"reduction": "auto", "name": "k", "fn": "kld"}).name == "k"
    rkl = ReverseKLDivergence.from_config({"reduction": None, "name": "r", "dtype": None,
                                           "fn": "reverse_kl_divergence"})
    assert rkl.reduction == "none"
    js = JensenShannonDivergence.from_config({"name": "j", "reduction": "sum", "beta": 0.2,
                                              "fn": "jensen_shannon_divergence"})
    assert js.beta == 0.2
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_bfloat16"}}
    assert JensenShannonDivergence.from_config({"name": "j", "dtype": policy}).dtype == "bfloat16"
    with pytest.raises(ValueError, match="not the reverse KL divergence"):
        ReverseKLDivergence.from_config({"name": "r", "fn": "kl_divergence"})
    with pytest.raises(ValueError, match="not the Jensen-Shannon divergence"):
        JensenShannonDivergence.from_config({"name": "j", "fn": "kld"})
    with pytest.raises(TypeError, match=r"Unknown KLDivergence config keys: \['beta'\]"):
        KLDivergence.from_config({"name": "k", "beta": 0.5})
    with pytest.raises(TypeError, match="Unknown JensenShannonDivergence config keys"):
        JensenShannonDivergence.from_config({"name": "j", "bogus": 1})


@pytest.mark.parametrize("member", list(CLASSES))
def test_pickle_and_repr(member: str) -> None:
    cls, params = CLASSES[member]
    loss = cls(reduction="batchmean", name="x", inputs=("log_probs", "logits"), temperature=3.0,
               **params)
    again = pickle.loads(pickle.dumps(loss))
    assert again == loss and _keras.kldiv_class(again) is cls  # (Keras-aware once Keras is loaded)
    rng = np.random.default_rng(35)
    t, p = _inputs(rng, (4, 6), loss.inputs, masked=False)
    np.testing.assert_array_equal(again(t, p), loss(t, p))
    beta = ", beta=0.3" if member == "js" else ""
    assert repr(loss) == (f"{cls.__name__}(reduction='batchmean', name='x'{beta}, "
                          "inputs=('log_probs', 'logits'), temperature=3.0)")
    assert repr(cls(**params)).startswith(f"{cls.__name__}(reduction='auto', name=")


def test_kl_pickled_before_the_options_existed_still_works() -> None:
    """An instance pickled by an older kldiv holds no ``inputs``/``temperature``: it is today's
    Keras KL."""
    from kldiv.losses import _restore

    old = _restore(KLDivergence, {"reduction": "sum", "name": "old", "dtype": None})
    t, p = [[0.0, 1.0], [0.0, 0.0]], [[0.6, 0.4], [0.4, 0.6]]
    assert old(t, p) == KLDivergence(reduction="sum")(t, p)
    assert old == KLDivergence(reduction="sum", name="old")


def test_signatures_are_visible() -> None:
    kw = inspect.Parameter.KEYWORD_ONLY
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD
    tail = [("inputs", "probs", kw), ("temperature", 1.0, kw), ("dtype", None, kw)]
    for cls, name, extra in ((KLDivergence, "kl_divergence", []),
                             (ReverseKLDivergence, "reverse_kl_divergence", []),
                             (JensenShannonDivergence, "js_divergence", [("beta", 0.5, kw)])):
        params = inspect.signature(cls).parameters.values()
        assert [(p.name, p.default, p.kind) for p in params] == [
            ("reduction", "auto", pos), ("name", name, pos), *extra, *tail]


@pytest.mark.parametrize("member", list(CLASSES))
def test_options_are_checked_when_made(member: str) -> None:
    cls, params = CLASSES[member]
    with pytest.raises(ValueError, match="input space"):
        cls(inputs="logit", **params)
    with pytest.raises(ValueError, match="only applies to logits"):
        cls(temperature=2.0, **params)
    with pytest.raises(ValueError, match="temperature must be"):
        cls(inputs="logits", temperature=0.0, **params)
    with pytest.raises(ValueError, match="Invalid reduction"):
        cls(reduction="batch_mean", **params)
    with pytest.raises(ValueError, match=f"Invalid dtype 'int32' for {cls.__name__}"):
        cls(dtype="int32", **params)


@pytest.mark.parametrize("beta", [0.0, 1.0, 1.5])
def test_js_class_beta(beta: float) -> None:
    target = {0.0: "kldiv.kl_divergence", 1.0: "kldiv.reverse_kl_divergence", 1.5: "open interval"}
    with pytest.raises(ValueError, match=target[beta]):
        JensenShannonDivergence(beta=beta)


# ------------------------------------------------------------------------ the public names
def test_public_function_names() -> None:
    from kldiv import _family

    for module in (kldiv, kldiv.losses):
        assert module.reverse_kl_divergence is _family.reverse_kl_divergence
        assert module.js_divergence is module.jensen_shannon_divergence is _family.js_divergence
        assert module.kl_divergence is kldiv.kl_divergence
        for name in ("reverse_kl_divergence", "js_divergence", "jensen_shannon_divergence",
                     "ReverseKLDivergence", "JensenShannonDivergence"):
            assert name in module.__all__
    assert kldiv.metrics.kl_divergence is kldiv.kl_divergence
    assert kldiv.kld is kldiv.KLD is kldiv.kullback_leibler_divergence is kldiv.kl_divergence
    params = inspect.signature(kldiv.kl_divergence).parameters
    assert [(p.name, p.kind) for p in params.values()] == [
        ("y_true", inspect.Parameter.POSITIONAL_ONLY), ("y_pred", inspect.Parameter.POSITIONAL_ONLY),
        ("inputs", inspect.Parameter.KEYWORD_ONLY), ("temperature", inspect.Parameter.KEYWORD_ONLY)]


@pytest.mark.parametrize("inputs", CLASS_SPACES[1:], ids=str)
def test_kl_divergence_inputs_through_the_public_name(backend: ArrayBackend, inputs: Any) -> None:
    rng = np.random.default_rng(zlib.crc32(f"public{inputs}".encode()))
    t, p = _inputs(rng, (4, 9), inputs, one_sided=False)
    T = 2.0 if "logits" in _spaces(inputs) else 1.0
    for fn, member in ((kldiv.kl_divergence, "kl"), (kldiv.KLD, "kl"),
                       (kldiv.reverse_kl_divergence, "reverse_kl"),
                       (kldiv.jensen_shannon_divergence, "js")):
        got = fn(backend.asarray(t, "float64"), backend.asarray(p, "float64"), inputs=inputs,
                 temperature=T)
        assert backend.is_native(got)
        _close(backend.to_numpy(got), oracle(member, t, p, inputs, T), "float64")


# -------------------------------------------------------------------------------- in Keras
KERAS_SCRIPT = r"""
import json
import numpy as np
import kldiv

made_before = {
    "kl": kldiv.KLDivergence(inputs=("probs", "logits"), temperature=2.0),
    "reverse_kl": kldiv.ReverseKLDivergence(inputs=("probs", "logits"), temperature=2.0),
    "js": kldiv.JensenShannonDivergence(beta=0.3, inputs=("probs", "logits"), temperature=2.0),
}
import keras
from keras import ops

rng = np.random.default_rng(0)
x = rng.normal(size=(16, 6)).astype("float32")
y = rng.dirichlet(np.ones(4), size=16).astype("float32")   # teacher probabilities
w = (rng.random(16) > 0.3).astype("float32")               # a mask


class Hand(keras.losses.Loss):
    # The member written out with Keras ops: teacher probs (clipped), student logits / T.
    def __init__(self, member):
        super().__init__(name="hand_" + member)
        self.member = member

    def call(self, y_true, y_pred):
        lp = ops.log(ops.clip(y_true, 1e-7, 1.0))
        lq = ops.log_softmax(y_pred / 2.0, axis=-1)
        p, q = ops.exp(lp), ops.exp(lq)
        if self.member == "kl":
            return ops.sum(p * (lp - lq), axis=-1)
        if self.member == "reverse_kl":
            return ops.sum(q * (lq - lp), axis=-1)
        lm = ops.log(0.3 * p + 0.7 * q)
        return 0.3 * ops.sum(p * (lp - lm), axis=-1) + 0.7 * ops.sum(q * (lq - lm), axis=-1)


def fit(loss):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])   # logits
    m.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    history = m.fit(x, y, sample_weight=w, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return history.history["loss"]


out = {}
for member, before in made_before.items():
    after = {"kl": kldiv.KLDivergence, "reverse_kl": kldiv.ReverseKLDivergence,
             "js": kldiv.JensenShannonDivergence}[member].from_config(before.get_config())
    out[member] = {"before": fit(before), "after": fit(after), "hand": fit(Hand(member)),
                   "is_loss": isinstance(before, keras.losses.Loss),
                   "config": keras.losses.deserialize(keras.losses.serialize(after),
                                                      custom_objects={type(after).__name__: type(after)}).get_config()
                             == after.get_config()}
print(json.dumps(out))
"""


def test_keras3_jax_compile_and_fit() -> None:
    """Each loss class, made before and after Keras is imported, trains in Keras 3 (JAX
    backend) exactly like the member written by hand as a ``keras.losses.Loss``."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", KERAS_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for member, res in got.items():
        assert res["is_loss"] and res["config"], member
        np.testing.assert_allclose(res["before"], res["hand"], rtol=1e-5, err_msg=member)
        np.testing.assert_allclose(res["after"], res["hand"], rtol=1e-5, err_msg=member)
    # the members differ: the comparison above can fail
    assert not np.allclose(got["kl"]["hand"], got["reverse_kl"]["hand"], rtol=1e-3)
    assert not np.allclose(got["kl"]["hand"], got["js"]["hand"], rtol=1e-3)


DOCS_SCRIPT = r"""
import json, re, sys
page = sys.argv[1]
blocks = re.findall(r"```python\n(.*?)```", open(page, encoding="utf-8").read(), flags=re.S)
ns = {}
for block in blocks:
    exec(compile(block, page, "exec"), ns)
print(json.dumps({"blocks": len(blocks), "history": ns["history"].history["loss"],
                  "step_loss": float(ns["step_loss"]), "grad_finite": bool(ns["grad"] is not None)}))
"""


def test_distillation_page_examples_run() -> None:
    """docs/distillation.md: its Python blocks run in order, in one namespace (a fresh
    process: the page imports Keras on JAX and TensorFlow)."""
    for module in ("torch", "jax", "keras", "tensorflow"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: docs/distillation.md has an example for it")
    page = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "distillation.md")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-c", DOCS_SCRIPT, page], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["blocks"] == 8
    assert len(got["history"]) == 2 and all(np.isfinite(got["history"]))
    assert got["step_loss"] > 0 and got["grad_finite"]


@pytest.mark.parametrize("member", list(CLASSES))
def test_torch_compile_fullgraph_loss_classes(member: str) -> None:
    """Each loss class, masked and reduced, traces into one graph (``fullgraph=True``) and
    gives eager's value and gradient."""
    torch = pytest.importorskip("torch")
    cls, params = CLASSES[member]
    rng = np.random.default_rng(36)
    t, p, mask = _masked_logits(rng)
    loss = cls(reduction="mean_with_sample_weight", inputs="logits", temperature=2.0, **params)
    batch = cls(reduction="batchmean", inputs="logits", **params)

    def step(a: Any, b: Any, w: Any) -> Any:
        return loss(a, b, sample_weight=w) + batch(a, b, sample_weight=w)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    b1 = torch.tensor(p, requires_grad=True)
    b2 = torch.tensor(p, requires_grad=True)
    got = compiled(torch.tensor(t), b1, torch.tensor(mask))
    want = step(torch.tensor(t), b2, torch.tensor(mask))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.backward()
    want.backward()
    assert torch.isfinite(b1.grad).all()
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-12)
