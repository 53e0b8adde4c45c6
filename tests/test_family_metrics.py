"""The family's metrics: ``kldiv.metrics.KLDivergence(inputs=, temperature=)``,
``ReverseKLDivergence`` and ``JensenShannonDivergence(beta=)`` on every backend.

References: the float64 oracle of ``tests/test_family.py`` (written from the definitions),
weighted and averaged here in NumPy float64 with Keras 2's sample-weight rules written out;
``kldiv.kl_divergence`` itself for the ``"probs"`` KL and reverse KL (bit for bit). In Keras:
``tests/test_family_metrics_keras.py``.
"""

from __future__ import annotations

import copy
import json
import pickle
import zlib
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend
from kldiv import _accumulate, _namespace
from kldiv.metrics import JensenShannonDivergence, KLDivergence, ReverseKLDivergence
from test_family import _inputs, _maskable, oracle

CLASSES: dict[str, tuple[type, dict[str, Any]]] = {
    "kl": (KLDivergence, {}),
    "reverse_kl": (ReverseKLDivergence, {}),
    "js": (JensenShannonDivergence, {"beta": 0.3}),
}
SPACES: list[Any] = ["probs", "log_probs", "logits", ("probs", "logits")]


def _temperature(inputs: Any) -> float:
    return 1.7 if "logits" in ((inputs,) if isinstance(inputs, str) else inputs) else 1.0


def _metric(member: str, **kw: Any) -> Any:
    cls, params = CLASSES[member]
    return cls(**{**params, **kw})


def _oracle(member: str, t: np.ndarray, p: np.ndarray, inputs: Any) -> np.ndarray:
    params = CLASSES[member][1]
    return oracle(member, t, p, inputs, _temperature(inputs), **params)


def _weights64(per: np.ndarray, w: Any) -> np.ndarray:
    """Keras 2's sample-weight rules for a per-sample loss of rank r, written out: a scalar
    weighs everything, rank r - 1 scales rows, rank r + 1 with a trailing 1 is squeezed."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == per.ndim + 1 and w.shape[-1] == 1:
        w = w[..., 0]
    elif per.ndim >= 1 and w.ndim == per.ndim - 1:
        w = w[..., None]
    return np.broadcast_to(w, per.shape)


def _mean64(pers: list[np.ndarray], weights: list[Any]) -> float:
    """The weighted mean over every batch: sum(w * loss) / sum(w) (count without weights)."""
    total = count = 0.0
    for per, w in zip(pers, weights, strict=True):
        wb = np.ones(per.shape) if w is None else _weights64(per, w)
        total += float((wb * per).sum())
        count += float(wb.sum())
    return 0.0 if count == 0 else total / count


def _batches(member: str, inputs: Any, seed: str) -> list[tuple[np.ndarray, np.ndarray, Any]]:
    """Three batches of (y_true, y_pred, sample_weight) with every weight form: a weight per
    token, a mask (bool, ``labels != -100``), a weight per row of a (B, T) loss, a scalar."""
    rng = np.random.default_rng(zlib.crc32(f"{member}{inputs}{seed}".encode()))
    out = []
    for b, w_kind in ((4, "token"), (2, "mask"), (3, "row"), (2, "scalar"), (3, None)):
        t, p = _inputs(rng, (b, 3, 6), inputs, masked=_maskable(inputs), one_sided=False)
        w: Any
        if w_kind == "token":
            w = rng.random((b, 3))
        elif w_kind == "mask":
            labels = rng.integers(-1, 3, (b, 3))
            labels[labels < 0] = -100
            w = labels != -100
        elif w_kind == "row":
            w = rng.random(b)
        elif w_kind == "scalar":
            w = 2.5
        else:
            w = None
        out.append((t, p, w))
    return out


def _as(backend: ArrayBackend, w: Any, dtype: str) -> Any:
    if w is None or isinstance(w, float):
        return w
    return backend.asarray(w, "bool" if w.dtype == bool else dtype)


# --------------------------------------------------------------------- values vs. the oracle
@pytest.mark.parametrize("inputs", SPACES, ids=str)
@pytest.mark.parametrize("member", list(CLASSES))
def test_weighted_mean_matches_float64_oracle(backend: ArrayBackend, member: str, inputs: Any) -> None:
    batches = _batches(member, inputs, "oracle")
    for dtype in ("float32", "float64"):
        # the oracle of what the metric is given: inputs and weights rounded to the dtype
        given = [(t.astype(dtype), p.astype(dtype), w if w is None or isinstance(w, float) else w.astype(
            bool if w.dtype == bool else dtype)) for t, p, w in batches]
        pers = [_oracle(member, t, p, inputs) for t, p, _ in given]
        assert all(np.isfinite(per).all() for per in pers)
        want = _mean64(pers, [w for _, _, w in given])
        m = _metric(member, inputs=inputs, temperature=_temperature(inputs), dtype=dtype)
        for t, p, w in given:
            m.update_state(backend.asarray(t), backend.asarray(p), sample_weight=_as(backend, w, dtype))
        got = m.result()
        assert backend.is_native(got) and got.dtype == backend.dtype(dtype)
        assert m.library == backend.name.split("-")[0]
        total, count = m.variables
        assert total.dtype == backend.dtype("float64")  # accumulated in float64 either way
        want_count = sum(per.size if w is None else float(_weights64(per, w).sum())
                         for per, (_, _, w) in zip(pers, given, strict=True))
        np.testing.assert_allclose(float(backend.to_numpy(count)), want_count, rtol=1e-13)
        rtol = 1e-9 if dtype == "float64" else 2e-5
        np.testing.assert_allclose(float(backend.to_numpy(got)), want, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("member", list(CLASSES))
def test_streaming_equals_one_update_and_the_loss_class(backend: ArrayBackend, member: str) -> None:
    inputs = ("probs", "logits")
    rng = np.random.default_rng(zlib.crc32(member.encode()))
    t, p = _inputs(rng, (12, 5, 7), inputs, masked=False)
    w = rng.random((12, 5))
    w[3] = 0.0
    kw = {"inputs": inputs, "temperature": 1.7}
    whole, stream = _metric(member, dtype="float64", **kw), _metric(member, dtype="float64", **kw)
    whole.update_state(backend.asarray(t, "float64"), backend.asarray(p, "float64"),
                       sample_weight=backend.asarray(w, "float64"))
    for lo, hi in ((0, 1), (1, 5), (5, 12)):
        stream.update_state(backend.asarray(t[lo:hi], "float64"), backend.asarray(p[lo:hi], "float64"),
                            sample_weight=backend.asarray(w[lo:hi], "float64"))
    one, many = float(backend.to_numpy(whole.result())), float(backend.to_numpy(stream.result()))
    np.testing.assert_allclose(many, one, rtol=1e-13)
    loss_cls = getattr(kldiv.losses, type(whole).__name__)
    loss = loss_cls(reduction="mean_with_sample_weight", **CLASSES[member][1], **kw)
    np.testing.assert_allclose(one, float(loss(t, p, sample_weight=w)), rtol=1e-12)
    np.testing.assert_allclose(one, _mean64([_oracle(member, t, p, inputs)], [w]), rtol=1e-9)


def test_all_masked_batches_give_zero(backend: ArrayBackend) -> None:
    t, p = _inputs(np.random.default_rng(3), (2, 3, 6), "logits", masked=False)
    for member in CLASSES:
        m = _metric(member, inputs="logits")
        m.update_state(backend.asarray(t), backend.asarray(p), sample_weight=_as(backend, np.zeros((2, 3), bool), "float32"))
        assert float(backend.to_numpy(m.result())) == 0.0
        assert float(backend.to_numpy(m.variables[1])) == 0.0


# ------------------------------------------- state where the data is: lazy, no graph, no host
def test_dask_updates_stay_lazy() -> None:
    dask = pytest.importorskip("dask")
    da = pytest.importorskip("dask.array")

    def no_compute(*_: Any, **__: Any) -> Any:
        raise AssertionError("computed before .compute()")

    t, p = _inputs(np.random.default_rng(4), (6, 5), "logits", masked=False)
    for member in CLASSES:
        m = _metric(member, inputs="logits", temperature=2.0)
        with dask.config.set(scheduler=no_compute):
            m.update_state(da.from_array(t, chunks=3), da.from_array(p, chunks=3),
                           sample_weight=da.from_array(np.arange(6.0), chunks=3))
            m.update_state(da.from_array(t, chunks=2), da.from_array(p, chunks=2))
            r = m.result()
        assert isinstance(r, da.Array)
        per = oracle(member, t, p, "logits", 2.0, **CLASSES[member][1])
        want = (float((per * np.arange(6.0)).sum()) + float(per.sum())) / (15.0 + 6.0)
        np.testing.assert_allclose(float(r.compute()), want, rtol=2e-5)


def test_torch_state_holds_no_graph_and_jax_no_host_reads() -> None:
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    t, p = _inputs(np.random.default_rng(8), (4, 5), "logits", masked=False)
    for member in CLASSES:
        m = _metric(member, inputs="logits")
        m.update_state(torch.tensor(t), torch.tensor(p, requires_grad=True))
        assert not any(v.requires_grad for v in m.variables) and not m.result().requires_grad
        j = _metric(member, inputs="logits")
        a, b = jax.numpy.asarray(t), jax.numpy.asarray(p)
        j.update_state(a, b)  # compiles what the guarded updates below run
        with jax.transfer_guard_device_to_host("disallow"):
            j.update_state(a, b, sample_weight=jax.numpy.ones(4))
            other = _metric(member, inputs="logits")
            other.update_state(a, b)
            j.merge_state(other)
            r = j.result()
        np.testing.assert_allclose(float(r), float(m.result()), rtol=1e-6)


# ------------------------------------------------------------ "probs": today's KL, bit for bit
def test_probs_kl_and_reverse_kl_are_todays_kl_bit_for_bit(backend: ArrayBackend) -> None:
    rng = np.random.default_rng(5)
    t = rng.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    p = rng.uniform(-0.2, 1.2, (6, 5)).astype(np.float32)
    t[0, 0] = p[1, 1] = 0.0
    a, b = backend.asarray(t), backend.asarray(p)
    xp = _namespace.array_namespace(b)
    for cls, args in ((KLDivergence, (a, b)), (ReverseKLDivergence, (b, a))):
        m = cls()
        m.update_state(a, b)
        want = xp.sum(xp.astype(kldiv.kl_divergence(*args), xp.float64))
        np.testing.assert_array_equal(backend.to_numpy(m.variables[0]), backend.to_numpy(want))


def test_probs_kl_runs_the_keras_kls_own_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    compute = _accumulate.compute  # the one dispatch, as the metrics' batch sums call it

    def spy(call: Any, *args: Any, **kwargs: Any) -> Any:
        if call.divergence.op == "keras_kl":  # the Keras KL's record
            calls.append(1)
        return compute(call, *args, **kwargs)

    monkeypatch.setattr(_accumulate, "compute", spy)
    for cls in (KLDivergence, ReverseKLDivergence):
        cls().update_state([[0.0, 1.0]], [[0.6, 0.4]])
    assert len(calls) == 2
    KLDivergence(inputs="log_probs").update_state([[-1.0, -0.5]], [[-0.6, -0.9]])
    JensenShannonDivergence().update_state([[0.0, 1.0]], [[0.6, 0.4]])
    assert len(calls) == 2  # other spaces and members: the family's kernels


# -------------------------------------------------------------------------------- merge_state
@pytest.mark.parametrize("member", list(CLASSES))
def test_merge_state_equals_one_metric(backend: ArrayBackend, member: str) -> None:
    inputs = "log_probs"
    rng = np.random.default_rng(zlib.crc32(f"merge{member}".encode()))
    t, p = _inputs(rng, (9, 6), inputs, one_sided=False)
    w = rng.random(9)
    whole = _metric(member, inputs=inputs)
    whole.update_state(backend.asarray(t), backend.asarray(p), sample_weight=backend.asarray(w))
    workers = [_metric(member, inputs=inputs) for _ in range(3)]
    for k, worker in enumerate(workers):
        sl = slice(3 * k, 3 * k + 3)
        worker.update_state(backend.asarray(t[sl]), backend.asarray(p[sl]), sample_weight=backend.asarray(w[sl]))
    workers = [pickle.loads(pickle.dumps(x)) for x in workers]  # as they come back from workers
    head = _metric(member, inputs=(inputs, inputs))  # the same options, given as a pair
    head.merge_state(_metric(member, inputs=inputs), *workers)
    np.testing.assert_allclose(float(backend.to_numpy(head.result())),
                               float(backend.to_numpy(whole.result())), rtol=1e-6)
    np.testing.assert_allclose(float(backend.to_numpy(workers[0].variables[1])), w[:3].sum(), rtol=1e-6)


def test_merge_state_only_same_class_and_options() -> None:
    kl, rkl, js = KLDivergence(), ReverseKLDivergence(), JensenShannonDivergence()
    with pytest.raises(TypeError, match=r"takes kldiv\.metrics\.KLDivergence metrics, got "
                                        r"kldiv\.metrics\.ReverseKLDivergence\."):
        kl.merge_state(rkl)
    with pytest.raises(TypeError, match=r"takes kldiv\.metrics\.JensenShannonDivergence metrics, got "
                                        r"kldiv\.metrics\.KLDivergence\."):
        js.merge_state(kl)
    with pytest.raises(TypeError, match=r"takes kldiv\.metrics\.ReverseKLDivergence metrics, got "
                                        r"kldiv\.losses\.ReverseKLDivergence \(a loss"):
        rkl.merge_state(kldiv.ReverseKLDivergence())
    with pytest.raises(TypeError, match=r"got kldiv\.metrics\.KLEstimator\."):
        kl.merge_state(kldiv.metrics.KLEstimator())
    cases = [
        (KLDivergence(), KLDivergence(inputs="logits")),
        (KLDivergence(inputs="logits"), KLDivergence(inputs="logits", temperature=2.0)),
        (KLDivergence(inputs="log_probs"), KLDivergence(inputs=("log_probs", "logits"))),
        (JensenShannonDivergence(), JensenShannonDivergence(beta=0.3)),
    ]
    for mine, other in cases:
        other.update_state([[-1.0, -0.5]], [[-0.6, -0.9]])
        name = type(mine).__name__
        with pytest.raises(ValueError, match=rf"merge_state: kldiv\.metrics\.{name}\(.*other options "
                                             rf"than kldiv\.metrics\.{name}\("):
            mine.merge_state(other)
        assert mine.variables == []  # nothing was merged


# ------------------------------------------------------------------- config, pickling, repr
CONFIG_CASES = [
    (KLDivergence, {}, {"name": "kullback_leibler_divergence", "dtype": "float32"}),
    (KLDivergence, {"inputs": "probs", "temperature": 1}, {"name": "kullback_leibler_divergence", "dtype": "float32"}),
    (KLDivergence, {"inputs": ("probs", "logits"), "temperature": 2.0},
     {"name": "kullback_leibler_divergence", "dtype": "float32", "inputs": ["probs", "logits"], "temperature": 2.0}),
    (ReverseKLDivergence, {}, {"name": "reverse_kl_divergence", "dtype": "float32"}),
    (ReverseKLDivergence, {"inputs": "log_probs", "name": "rkl", "dtype": "float64"},
     {"name": "rkl", "dtype": "float64", "inputs": "log_probs"}),
    (JensenShannonDivergence, {}, {"name": "js_divergence", "dtype": "float32", "beta": 0.5}),
    (JensenShannonDivergence, {"beta": 0.25, "inputs": "logits", "temperature": 3},
     {"name": "js_divergence", "dtype": "float32", "beta": 0.25, "inputs": "logits", "temperature": 3.0}),
]


@pytest.mark.parametrize(("cls", "kwargs", "config"), CONFIG_CASES)
def test_config_round_trip(cls: type, kwargs: dict[str, Any], config: dict[str, Any]) -> None:
    m = cls(**kwargs)
    assert m.get_config() == config
    again = cls.from_config(json.loads(json.dumps(m.get_config())))  # JSON-ready
    assert type(again) is type(m) and again.get_config() == config
    assert again._options() == m._options()
    keras3 = {**config, "dtype": {"module": "keras", "class_name": "DTypePolicy",
                                  "config": {"name": config["dtype"]}, "registered_name": None}}
    assert cls.from_config(keras3).get_config() == config
    fn = cls.divergence.name
    assert cls.from_config({**config, "fn": fn}).get_config() == config  # Keras 2 names the function
    for option in ("inputs", "temperature", "beta"):
        if option in config or option in kwargs:
            assert getattr(m, option) == (tuple(config[option]) if isinstance(config.get(option), list)
                                          else config.get(option, kwargs.get(option)))


def test_config_errors_name_the_class_fully() -> None:
    with pytest.raises(ValueError, match=r"kldiv\.metrics\.ReverseKLDivergence config names function "
                                         r"'kl_divergence', not the reverse KL divergence"):
        ReverseKLDivergence.from_config({"name": "r", "fn": "kl_divergence"})
    with pytest.raises(TypeError, match=r"Unknown kldiv\.metrics\.JensenShannonDivergence config keys: \['reduction'\]"):
        JensenShannonDivergence.from_config({"name": "js", "reduction": "sum"})
    with pytest.raises(TypeError, match=r"Unknown kldiv\.metrics\.KLDivergence config keys: \['beta'\]"):
        KLDivergence.from_config({"name": "kl", "beta": 0.5})
    assert JensenShannonDivergence.from_config({"fn": "jensen_shannon_divergence"}).beta == 0.5


@pytest.mark.parametrize("member", list(CLASSES))
def test_pickle_and_deepcopy_keep_options_and_state(member: str) -> None:
    kw = {"inputs": ("log_probs", "logits"), "temperature": 0.5, "dtype": "float64"}
    m = _metric(member, **kw)
    t, p = _inputs(np.random.default_rng(1), (5, 4), kw["inputs"], one_sided=False)
    m.update_state(t[:3], p[:3])
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        assert type(clone) is type(m) and clone.get_config() == m.get_config()
        assert clone.result() == m.result() and clone.inputs == ("log_probs", "logits")
        clone.update_state(t[3:], p[3:])
        m2 = _metric(member, **kw)
        m2.update_state(t, p)
        np.testing.assert_allclose(float(clone.result()), float(m2.result()), rtol=1e-13)
    assert m.variables[1] == 3.0  # the original is untouched
    fresh = pickle.loads(pickle.dumps(_metric(member)))
    assert fresh.variables == [] and fresh.library is None


def test_repr_shows_the_options() -> None:
    assert repr(KLDivergence()) == "KLDivergence(name='kullback_leibler_divergence', dtype='float32')"
    m = JensenShannonDivergence(beta=0.3, inputs=("probs", "logits"), temperature=2.0)
    assert repr(m) == ("JensenShannonDivergence(name='js_divergence', dtype='float32', beta=0.3, "
                       "inputs=['probs', 'logits'], temperature=2.0)")
    m.update_state([[0.5, 0.5]], [[1.0, 0.0]])
    assert repr(m).endswith("temperature=2.0, state on numpy:cpu)")


# ------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("member", list(CLASSES))
def test_bad_options(member: str) -> None:
    cls, params = CLASSES[member]
    qualified = rf"kldiv\.metrics\.{cls.__name__}"
    with pytest.raises(ValueError, match="unknown input space 'probabilities'"):
        cls(inputs="probabilities", **params)
    with pytest.raises(TypeError, match="inputs must be one of"):
        cls(inputs=("probs", "logits", "logits"), **params)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        cls(inputs="logits", temperature=0.0, **params)
    with pytest.raises(ValueError, match="only applies to logits"):
        cls(temperature=2.0, **params)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        cls(inputs="logits", temperature="2", **params)
    with pytest.raises(TypeError, match=qualified + " name must be a str, got int"):
        cls(name=3, **params)
    with pytest.raises(ValueError, match=qualified + " dtype must be one of"):
        cls(dtype="int32", **params)
    with pytest.raises(TypeError):
        cls("name", "float32", "logits")  # options are keyword-only
    if member != "js":
        with pytest.raises(TypeError, match="beta"):
            cls(beta=0.5)


@pytest.mark.parametrize(("beta", "points_to"), [(0.0, "kl_divergence"), (1.0, "reverse_kl_divergence"),
                                                 (1.5, "open interval"), (float("nan"), "open interval")])
def test_js_beta_range(beta: float, points_to: str) -> None:
    with pytest.raises(ValueError, match=points_to):
        JensenShannonDivergence(beta=beta)


def test_logits_class_axis_and_shape_errors() -> None:
    m = KLDivergence(inputs="logits")
    with pytest.raises(ValueError, match=r"class \(last\) axis"):
        m.update_state(np.zeros((3, 1)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="do not broadcast"):
        m.update_state(np.zeros((3, 5)), np.zeros((3, 4)))
    assert m.variables == []  # a failed update leaves no state


def test_exported_names() -> None:
    for name in ("KLDivergence", "ReverseKLDivergence", "JensenShannonDivergence", "KLEstimator"):
        assert name in kldiv.metrics.__all__ and hasattr(kldiv.metrics, name)
    assert kldiv.metrics.ReverseKLDivergence is not kldiv.ReverseKLDivergence  # the loss class
