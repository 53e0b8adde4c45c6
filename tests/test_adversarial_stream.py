"""Hostile inputs to the stateful metrics, streaming over batches and files, and the CLI.

Each test is a regression test of a defect found by probing the public API with unusual
input: state corrupted by a failed call, an autograd graph kept in the state, a silent dtype
change, a backend's ``TypeError`` that does not name the argument, an output file of the
wrong dtype, warnings that break the CLI's one-line stderr. Values are checked against a
float64 oracle written from the definition (``conftest.oracle``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, Backend, oracle
from kldiv import _cli
from kldiv.metrics import JensenShannonDivergence, KLDivergence, ReverseKLDivergence

YT = np.array([[0, 1], [0, 0]], dtype=np.float32)
YP = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)


def _float(x: Any) -> float:
    x = x.compute() if hasattr(x, "compute") else x
    return float(np.asarray(x.cpu() if hasattr(x, "cpu") else x))


def _other_library(backend: ArrayBackend) -> Any:
    """An array of another library than ``backend``'s (NumPy, or array-api-strict on NumPy)."""
    if backend.member is Backend.NUMPY:
        xps = pytest.importorskip("array_api_strict")
        return lambda a: xps.asarray(a)
    return np.asarray


# --------------------------------------------------------------------------------------
# The metric's state
# --------------------------------------------------------------------------------------


def test_merge_state_that_fails_changes_nothing(backend: ArrayBackend) -> None:
    """merge_state(b, c) where c holds another library's state raised only after b had been
    added: the metric was left holding a state that no call ever produced."""
    a, b, c = KLDivergence(), KLDivergence(), KLDivergence()
    a.update_state(backend.asarray(YT), backend.asarray(YP), sample_weight=[1, 0])
    b.update_state(backend.asarray(YT), backend.asarray(YP))
    other = _other_library(backend)
    c.update_state(other(YT), other(YP))
    before = _float(a.result())
    with pytest.raises(TypeError, match="merge_state"):
        a.merge_state(b, c)
    assert _float(a.result()) == before
    assert _float(a.running_total()) == pytest.approx(oracle(YT, YP)[0], rel=1e-6)
    # a metric without state takes none either
    empty = KLDivergence()
    with pytest.raises(TypeError, match="merge_state"):
        empty.merge_state(b, c)
    assert empty.library is None and empty.variables == []
    # and the merge that can be done still gives the mean of both
    a.merge_state(b)
    expected = (oracle(YT, YP)[0] + oracle(YT, YP).sum()) / 3
    assert _float(a.result()) == pytest.approx(expected, rel=1e-6)


def test_merge_state_with_itself_adds_its_state_once_per_argument() -> None:
    a = KLDivergence()
    a.update_state(YT, YP, sample_weight=[1, 0])
    once = float(a.running_total())
    a.merge_state(a, a)  # three times the same total and count (was four: a grew in between)
    assert float(a.running_total()) == pytest.approx(3 * once, rel=1e-12)
    assert float(a.result()) == pytest.approx(oracle(YT, YP)[0], rel=1e-6)


def test_sample_weight_requiring_grad_keeps_no_graph_in_the_state() -> None:
    """Inputs were detached but a torch sample_weight requiring grad was not: the state (and
    every later result) held its autograd graph, against the documented behaviour."""
    torch = pytest.importorskip("torch")
    w = torch.tensor([1.0, 0.5], requires_grad=True)
    m = KLDivergence()
    m.update_state(torch.tensor(YT), torch.tensor(YP), sample_weight=w)
    m.update_state(torch.tensor(YT), torch.tensor(YP, requires_grad=True), sample_weight=w)
    assert all(not v.requires_grad and v.grad_fn is None for v in m.variables)
    assert not m.result().requires_grad
    expected = (oracle(YT, YP) * [1.0, 0.5]).sum() / 1.5
    assert float(m.result()) == pytest.approx(expected, rel=1e-6)
    # the streaming helpers accumulate the same way
    total = kldiv.evaluate_batches([torch.tensor(YT)], [torch.tensor(YP)], [w], reduction="sum")
    assert not total.requires_grad


def test_metric_float16_result_dtype(backend: ArrayBackend) -> None:
    """dtype="float16" gave a float32 result on Dask (whose dtypes are NumPy's, float16
    included) while NumPy gave float16."""
    m = KLDivergence(dtype="float16")
    m.update_state(backend.asarray(YT), backend.asarray(YP))
    out = m.result()
    expected = np.float32 if backend.member is Backend.ARRAY_API_STRICT else np.float16  # no float16 there
    assert backend.to_numpy(out).dtype == expected
    assert _float(out) == pytest.approx(oracle(YT, YP).mean(), rel=1e-3)


@pytest.mark.parametrize("policy", [{"config": 3}, {"config": ["float32"]}, {"config": None},
                                    {"config": {"name": None}}, {"config": {"name": 16}}])
def test_metric_dtype_malformed_policy_config(policy: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        KLDivergence(dtype=policy)


@pytest.mark.parametrize("config", [None, [("name", "x")], "kl", 3])
def test_from_config_of_a_non_dict(config: Any) -> None:
    for cls in (KLDivergence, ReverseKLDivergence, JensenShannonDivergence):
        with pytest.raises(TypeError, match=r"from_config takes a dict"):
            cls.from_config(config)


def test_from_config_fn_entry() -> None:
    base = {"name": "m", "dtype": "float32"}
    with pytest.raises(ValueError, match="names function"):
        KLDivergence.from_config({**base, "fn": ["kl_divergence"]})  # was: unhashable type
    with pytest.raises(ValueError, match="names function"):
        KLDivergence.from_config({**base, "fn": "mean_squared_error"})
    # Keras 2 names the function; the function object itself is accepted as well
    assert KLDivergence.from_config({**base, "fn": kldiv.kl_divergence}).get_config() == base
    assert KLDivergence.from_config({**base, "fn": "kl_divergence"}).get_config() == base
    with pytest.raises(TypeError, match="Unknown"):
        KLDivergence.from_config({**base, 1: 2, "x": 3})  # was: '<' not supported


# --------------------------------------------------------------------------------------
# evaluate_files / evaluate_batches: arguments
# --------------------------------------------------------------------------------------


@pytest.fixture
def npy(tmp_path: Path) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    t = rng.dirichlet(np.ones(4), 10).astype(np.float32)
    p = rng.dirichlet(np.ones(4), 10).astype(np.float32)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "p.npy", p)
    return {"t": t, "p": p, "tp": str(tmp_path / "t.npy"), "pp": str(tmp_path / "p.npy"), "dir": tmp_path}


@pytest.mark.parametrize("which", ["y_true", "y_pred"])
def test_evaluate_files_none_input(npy: dict[str, Any], which: str) -> None:
    args = [None, npy["pp"]] if which == "y_true" else [npy["tp"], None]
    with pytest.raises(TypeError, match=f"{which} must be a .npy path or an array, not None"):
        kldiv.evaluate_files(*args)


@pytest.mark.parametrize("dtype", ["complex64", "object", "U3", "datetime64[s]"])
def test_evaluate_files_non_numeric_dtype_is_a_type_error(npy: dict[str, Any], dtype: str) -> None:
    """A complex, string or object input is the TypeError the loss raises for it (and still a
    DataFileError, as documented); an object .npy file was 'cannot be read' instead."""
    bad = npy["p"].astype(dtype) if dtype != "datetime64[s]" else np.zeros((10, 4), dtype)
    path = npy["dir"] / "bad.npy"
    np.save(path, bad, allow_pickle=True)
    for given in (bad, str(path)):
        with pytest.raises(TypeError, match="y_pred") as info:
            kldiv.evaluate_files(npy["t"], given)
        assert isinstance(info.value, kldiv.DataFileError)
        assert "complex" in str(info.value) or "not numeric" in str(info.value)
    with pytest.raises(TypeError, match="sample_weight"):
        kldiv.evaluate_files(npy["tp"], npy["pp"], sample_weight=bad[:, 0])


def test_evaluate_files_bytes_paths(npy: dict[str, Any]) -> None:
    got = kldiv.evaluate_files(os.fsencode(npy["tp"]), os.fsencode(npy["pp"]), batch_rows=3)
    assert got == pytest.approx(oracle(npy["t"], npy["p"]).mean(), rel=1e-6)


@pytest.mark.parametrize("out", [3, 2.5, ["x.npy"], object()])
def test_out_that_is_not_a_path(npy: dict[str, Any], out: Any) -> None:
    with pytest.raises(TypeError, match="out must be a path"):
        kldiv.evaluate_files(npy["tp"], npy["pp"], reduction="none", out=out)
    with pytest.raises(TypeError, match="out must be a path"):
        kldiv.evaluate_batches([npy["t"]], [npy["p"]], reduction="none", out=out)


def test_out_that_is_an_input_names_it_once(npy: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="same file as") as info:
        kldiv.evaluate_files(npy["tp"], npy["pp"], reduction="none", out=npy["tp"])
    assert str(info.value).count(npy["tp"]) == 2  # out=... and the input, not three times
    assert "y_true file" in str(info.value)


@pytest.mark.parametrize(("name", "args"), [
    ("y_true_batches", (None, [YP])),
    ("y_pred_batches", ([YT], 3)),
    ("sample_weight_batches", ([YT], [YP], 2.0)),
])
def test_evaluate_batches_not_iterable(name: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError, match=f"{name} must be an iterable"):
        kldiv.evaluate_batches(*args)


def test_evaluate_batches_convert_not_callable() -> None:
    with pytest.raises(TypeError, match="convert must be a callable"):
        kldiv.evaluate_batches([YT], [YP], convert=3)


def test_metric_class_instead_of_instance() -> None:
    with pytest.raises(TypeError, match="pass an instance"):
        kldiv.evaluate_batches([YT], [YP], metric=KLDivergence)
    with pytest.raises(TypeError, match=r"got kldiv\.metrics\.KLEstimator"):
        kldiv.evaluate_batches([YT], [YP], metric=kldiv.metrics.KLEstimator())


# --------------------------------------------------------------------------------------
# Batches of several dtypes: the result is their concatenation's
# --------------------------------------------------------------------------------------


def test_batches_of_several_dtypes(backend: ArrayBackend, tmp_path: Path) -> None:
    """The reduced result took the first batch's dtype (float32 data rounded a float64
    batch's sum), the out= file too (float64 losses written as float32), while the
    in-memory reduction="none" promoted: all three now follow the concatenation."""
    if "float64" not in backend.float_dtypes:
        pytest.skip(f"{backend.name}: no float64")
    rng = np.random.default_rng(11)
    t = rng.dirichlet(np.ones(3), 9)
    p = rng.dirichlet(np.ones(3), 9)
    tb = [backend.asarray(t[:4], "float32"), backend.asarray(t[4:], "float64")]
    pb = [backend.asarray(p[:4], "float32"), backend.asarray(p[4:], "float64")]
    per = np.concatenate([oracle(t[:4].astype(np.float32), p[:4].astype(np.float32)), oracle(t[4:], p[4:])])

    total = kldiv.evaluate_batches(tb, pb, reduction="sum")
    assert backend.to_numpy(total).dtype == np.float64
    assert _float(total) == pytest.approx(per.sum(), rel=1e-7)

    losses = kldiv.evaluate_batches(tb, pb, reduction="none")
    assert backend.to_numpy(losses).dtype == np.float64
    np.testing.assert_allclose(backend.to_numpy(losses), per, rtol=1e-6)

    written = kldiv.evaluate_batches(tb, pb, reduction="none", out=tmp_path / "loss.npy")
    assert written.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(written), backend.to_numpy(losses))
    assert os.listdir(tmp_path) == ["loss.npy"]  # no temporary file left


def test_out_file_widens_after_many_float32_rows(tmp_path: Path) -> None:
    """Widening converts what was written so far (in chunks) and keeps every value."""
    rng = np.random.default_rng(5)
    first_t = rng.dirichlet(np.ones(2), 70_000).astype(np.float32)
    first_p = rng.dirichlet(np.ones(2), 70_000).astype(np.float32)
    last_t, last_p = rng.dirichlet(np.ones(2), 3), rng.dirichlet(np.ones(2), 3)
    got = kldiv.evaluate_batches([first_t, last_t], [first_p, last_p], reduction="none",
                                 out=tmp_path / "w.npy")
    assert got.dtype == np.float64 and got.shape == (70_003,)
    np.testing.assert_array_equal(got[:70_000], kldiv.kld(first_t, first_p).astype(np.float64))
    np.testing.assert_allclose(got[70_000:], oracle(last_t, last_p), rtol=1e-12)


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def test_cli_warnings_are_one_line_each(npy: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """An infinite sample weight made NumPy warn: the warning escaped as a two-line Python
    warning on stderr (here, to pytest's warning capture instead of the command's stderr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        status = _cli.compute_main([npy["tp"], npy["pp"], "--sample-weight", "inf"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.strip() in ("inf", "nan")
    assert err.strip(), "the warning is reported"
    assert all(line.startswith("kldiv compute: warning: ") for line in err.strip().splitlines())


def test_cli_warnings_on_real_stderr(npy: dict[str, Any]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kldiv", "compute", npy["tp"], npy["pp"], "--sample-weight", "1e400"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("inf", "nan")
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("kldiv compute: warning: ") for line in lines), proc.stderr


def test_cli_summary_of_a_single_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "t.npy", YT[1])
    np.save(tmp_path / "p.npy", YP[1])
    out_path = str(tmp_path / "o.npy")
    status = _cli.compute_main([str(tmp_path / "t.npy"), str(tmp_path / "p.npy"), "--reduction", "none",
                                "--output", out_path])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.startswith("wrote 1 per-sample loss (float32")
    assert float(np.load(out_path)) == pytest.approx(oracle(YT[1], YP[1]), rel=1e-6)


@pytest.mark.parametrize("dtype", ["complex64", "object"])
def test_cli_non_numeric_file_is_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], dtype: str) -> None:
    np.save(tmp_path / "t.npy", YT)
    np.save(tmp_path / "p.npy", YP.astype(dtype), allow_pickle=True)
    status = _cli.compute_main([str(tmp_path / "t.npy"), str(tmp_path / "p.npy")])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert err.startswith("kldiv compute: error: y_pred file") and len(err.strip().splitlines()) == 1


def test_shape_error_says_which_rows_it_checked(npy: dict[str, Any]) -> None:
    """The message named the shapes of the 2-row stand-ins the shapes are checked on, (2, 4)
    and (2, 5), next to the files' (10, 4) and (10, 5), without saying what they were."""
    np.save(npy["dir"] / "p5.npy", np.full((10, 5), 0.2, np.float32))
    with pytest.raises(kldiv.DataFileError) as info:
        kldiv.evaluate_files(npy["tp"], str(npy["dir"] / "p5.npy"))
    message = str(info.value)
    assert "y_true (10, 4), y_pred (10, 5)" in message
    assert "on their first 2 rows: y_true of shape (2, 4)" in message
    with pytest.raises(kldiv.DataFileError, match=r"first 2 rows: .* per-sample loss of shape \(2,\)"):
        kldiv.evaluate_files(npy["tp"], npy["pp"], sample_weight=np.ones((10, 4)))


@pytest.mark.parametrize("weights", [
    [None, 2.0], [1.0, None], [None, np.full(3, 2.0)], [np.ones(3), None], [None, None], [1.0, 2.0],
])
def test_mean_with_sample_weight_when_some_batches_have_no_weight(
        backend: ArrayBackend, weights: list[Any]) -> None:
    """A batch without weights weighs 1 per sample, as in the loss class; its samples were
    counted in the numerator but not in sum(w) (a mean off by the unweighted batches)."""
    rng = np.random.default_rng(2)
    t = rng.dirichlet(np.ones(3), 6).astype(np.float32)
    p = rng.dirichlet(np.ones(3), 6).astype(np.float32)
    full = np.concatenate([np.broadcast_to(np.float32(1.0) if w is None else np.asarray(w, np.float32), (3,))
                           for w in weights])
    expected = (oracle(t, p) * full).sum() / full.sum()
    sw = [None if w is None else (w if isinstance(w, float) else backend.asarray(w, "float32"))
          for w in weights]
    got = kldiv.evaluate_batches([backend.asarray(t[:3]), backend.asarray(t[3:])],
                                 [backend.asarray(p[:3]), backend.asarray(p[3:])], sw,
                                 reduction="mean_with_sample_weight")
    assert _float(got) == pytest.approx(expected, rel=1e-6)
    metric = kldiv.evaluate_batches([backend.asarray(t[:3]), backend.asarray(t[3:])],
                                    [backend.asarray(p[:3]), backend.asarray(p[3:])], sw, metric=True)
    assert _float(metric) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------
# Second pass: tracers, data-less tensors, per-sample losses that do not stack, messages
# --------------------------------------------------------------------------------------


def test_metric_refuses_jax_tracers_and_keeps_its_state() -> None:
    """An update of a metric under jax.jit stored the tracer as the state: later calls of the
    compiled function never updated the metric again (a silently wrong mean) and the next
    eager use raised JAX's UnexpectedTracerError."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    m = KLDivergence()
    m.update_state(jnp.asarray(YT), jnp.asarray(YP), sample_weight=[1, 0])

    def step(t: Any, p: Any) -> Any:
        m.update_state(t, p)
        return m.result()

    for transform in (jax.jit, jax.grad):
        with pytest.raises(TypeError, match=r"update_state .*traced.*kldiv\.kl_divergence"):
            transform(lambda t, p: step(t, p).sum())(jnp.asarray(YT), jnp.asarray(YP))
    assert _float(m.result()) == pytest.approx(oracle(YT, YP)[0], rel=1e-6)
    m.update_state(jnp.asarray(YT), jnp.asarray(YP))
    assert _float(m.result()) == pytest.approx((oracle(YT, YP)[0] + oracle(YT, YP).sum()) / 3, rel=1e-6)
    # a fresh metric under jit: the same clear error, and no state left behind
    fresh = KLDivergence()
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda t, p: fresh(t, p))(jnp.asarray(YT), jnp.asarray(YP))
    assert fresh.variables == [] and fresh.library is None


def test_reduction_none_batches_that_do_not_stack(backend: ArrayBackend) -> None:
    """In memory, per-sample losses of different ranks or trailing shapes reached the
    library's concatenate: torch's RuntimeError, JAX's TypeError, NumPy's ValueError, each
    worded its own way; the out= file already said so clearly."""
    t2, p2 = backend.asarray(YT), backend.asarray(YP)
    t3, p3 = backend.asarray(YT[None]), backend.asarray(YP[None])
    for tb, pb, shapes in (([t2, t3], [p2, p3], r"\('N',\) then \(1, 2\)"),
                           ([t3, backend.asarray(np.ones((1, 3, 2), np.float32) / 2)],
                            [p3, backend.asarray(np.ones((1, 3, 2), np.float32) / 2)],
                            r"\('N', 2\) then \(1, 3\)")):
        with pytest.raises(ValueError, match=f"do not stack along the first axis: {shapes}"):
            kldiv.evaluate_batches(tb, pb, reduction="none")


def test_batches_of_two_libraries_name_no_metric_method() -> None:
    """evaluate_batches' message for batches of two libraries told the caller to call
    reset_state(), which it has no way to do (it holds no metric)."""
    torch = pytest.importorskip("torch")
    for red in ("sum", "none"):
        with pytest.raises(TypeError, match="evaluate_batches") as info:
            kldiv.evaluate_batches([YT, torch.tensor(YT)], [YP, torch.tensor(YP)], reduction=red)
        assert "reset_state" not in str(info.value) and "a metric" not in str(info.value)
        assert "numpy" in str(info.value) and "torch" in str(info.value)


def test_meta_tensors_have_no_values_to_write_or_move(tmp_path: Path) -> None:
    """torch's 'meta' tensors (shapes only) leaked NotImplementedError('Cannot copy out of meta
    tensor') from out= and from evaluate_files' move to another device; on 'meta' itself they
    compute (lazily, shapes only) as the loss class does."""
    torch = pytest.importorskip("torch")
    t, p = torch.tensor(YT, device="meta"), torch.tensor(YP, device="meta")
    with pytest.raises(ValueError, match="meta"):
        kldiv.evaluate_batches([t], [p], reduction="none", out=tmp_path / "o.npy")
    assert os.listdir(tmp_path) == []
    for backend in ("numpy", "torch"):
        with pytest.raises(ValueError, match=r"y_true .*meta"):
            kldiv.evaluate_files(t, p, backend=backend)
    assert kldiv.evaluate_files(t, p, backend="torch", device="meta").device.type == "meta"
    assert kldiv.evaluate_batches([t], [p]).device.type == "meta"


def test_metric_dtype_python_float_is_float32_as_in_keras() -> None:
    """dtype=float gave a float64 metric (NumPy's reading of the Python type); Keras 3
    (PYTHON_DTYPES_MAP) and tf.keras (tf.as_dtype) both read it as float32."""
    m = KLDivergence(dtype=float)
    assert m.get_config()["dtype"] == "float32"
    m.update_state(YT, YP)
    assert m.result().dtype == np.float32
    assert KLDivergence.from_config(m.get_config()).get_config() == m.get_config()


def test_compensated_sum_of_an_infinity_stays_infinite(backend: ArrayBackend) -> None:
    """Where there is no float64 (JAX without x64, MPS, array-API devices) the running sums
    are float32 with Neumaier compensation, whose error term of an infinite sum is inf - inf:
    a total that overflowed, or a batch with an infinite weight, became NaN there while the
    float64 state (and the loss class) gave inf."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's overflow warning: the data's
        warnings.filterwarnings("error", "invalid value", RuntimeWarning)  # inf - inf: kldiv's
        s = kldiv.metrics.RunningSum(backend.asarray(np.float32(1.0)), True)
        s.add(backend.asarray(np.float32(np.inf)))
        s.add(backend.asarray(np.float32(2.0)))
        assert _float(s.total()) == np.inf
        big = kldiv.metrics.RunningSum(backend.asarray(np.float32(3e38)), True)
        big.add(backend.asarray(np.float32(3e38)))  # overflows to inf
        assert _float(big.total()) == np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        big.add(-big.total())  # inf - inf is NaN, as in float64
        assert np.isnan(_float(big.total()))
    fin = kldiv.metrics.RunningSum(backend.asarray(np.float32(1.0)), True)
    for _ in range(3):
        fin.add(backend.asarray(np.float32(1e-8)))
    if fin.parts is None:  # (Dask sums its lazy parts as a tree instead)
        assert backend.to_numpy(fin.comp).dtype == np.float32 and _float(fin.comp) != 0  # still compensates


def test_streamed_sum_with_an_infinite_weight_on_a_device_without_float64() -> None:
    xps = pytest.importorskip("array_api_strict")
    try:
        dev = xps.Device("no_float64")
    except Exception:
        pytest.skip("this array-api-strict has no device without float64")
    t, p = xps.asarray(YT, device=dev), xps.asarray(YP, device=dev)
    w = xps.asarray(np.array([np.inf, 1.0], np.float32), device=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = kldiv.evaluate_batches([t, t], [p, p], [None, w], reduction="sum")
        whole = kldiv.KLDivergence(reduction="sum")(t, p, sample_weight=w)
    assert float(got) == float(whole) == np.inf


def test_reduction_none_batches_of_several_dtypes_concatenate_promoted(backend: ArrayBackend) -> None:
    """The in-memory result has the dtype of the batches' concatenation on every backend."""
    if "float64" not in backend.float_dtypes:
        pytest.skip(f"{backend.name}: no float64")
    t = backend.asarray(YT)
    got = kldiv.evaluate_batches([t, t, t], [backend.asarray(YP), backend.asarray(YP, "float64"),
                                             backend.asarray(YP)], reduction="none")
    out = backend.to_numpy(got)
    assert out.dtype == np.float64 and out.shape == (6,)
    np.testing.assert_allclose(out, np.tile(oracle(YT, YP), 3), rtol=1e-6, atol=1e-9)


def test_repr_of_a_metric_whose_dtype_was_set_to_a_bad_value() -> None:
    """repr() (and every message naming the metric) raised the dtype's ValueError once the
    dtype attribute had been set to a bad value: a mixed-library update then reported the
    dtype instead of the library."""
    torch = pytest.importorskip("torch")
    m = KLDivergence()
    m.update_state(YT, YP)
    try:
        m.dtype = "int32"
    except AttributeError:
        pytest.skip("a Keras is loaded: the metric is a keras Metric, whose dtype is read-only")
    assert "dtype='int32'" in repr(m)
    with pytest.raises(TypeError, match="holds numpy state but update_state gave torch"):
        m.update_state(torch.tensor(YT), torch.tensor(YP))
    with pytest.raises(ValueError, match="dtype must be one of"):
        m.result()  # where the dtype is used, it is still refused


@pytest.mark.parametrize("library", ["numpy", "torch", "jax", "dask"])
def test_cli_prints_a_float16_result_in_float16_digits(tmp_path: Path, library: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The same float16 result printed as '0.4583' on NumPy, JAX and Dask but in float32's
    digits on torch ('0.45825195'): the printout went through a float32 host copy."""
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "jax": "jax", "dask": "dask.array"}[library])
    np.save(tmp_path / "t.npy", YT.astype(np.float16))
    np.save(tmp_path / "p.npy", YP.astype(np.float16))
    expected = kldiv.KLDivergence(reduction="sum")(YT.astype(np.float16), YP.astype(np.float16))
    assert expected.dtype == np.float16
    status = _cli.compute_main([str(tmp_path / "t.npy"), str(tmp_path / "p.npy"), "--backend", library,
                                "--reduction", "sum"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert out.strip() == str(expected), (library, out)


def test_streaming_under_jax_jit(tmp_path: Path) -> None:
    """Under jax.jit, evaluate_batches(metric=True) (its metric lives for the call only) and
    the reductions compute; what needs values on the host (out=, a NumPy backend) is a
    TypeError naming the traced input, not JAX's TracerArrayConversionError."""
    jax = pytest.importorskip("jax")
    t, p = jax.numpy.asarray(YT), jax.numpy.asarray(YP)
    expected = oracle(YT, YP).mean()
    got = jax.jit(lambda t, p: kldiv.evaluate_batches([t, t], [p, p], metric=True))(t, p)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    got = jax.jit(lambda t, p: kldiv.evaluate_files(t, p, backend="jax", batch_rows=1))(t, p)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda t, p: kldiv.evaluate_batches([t], [p], reduction="none", out=tmp_path / "o.npy"))(t, p)
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match=r"y_true is a traced array .*backend='numpy'"):
        jax.jit(lambda t, p: kldiv.evaluate_files(t, p, batch_rows=1))(t, p)


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_metric_refuses_torch_func_transforms(transform: str) -> None:
    """Under torch.func.vmap / grad the state became functorch's wrapped tensors: a later
    result() raised 'your tensor may have escaped from inside a function being vmapped', and
    after grad the state held GradTrackingTensors (and the gradient was silently zero)."""
    torch = pytest.importorskip("torch")
    m = KLDivergence()
    m.update_state(torch.tensor(YT), torch.tensor(YP), sample_weight=[1, 0])

    def step(p: Any) -> Any:
        m.update_state(torch.tensor(YT), p)
        return m.result()

    p = torch.tensor(YP)
    with pytest.raises(TypeError, match="traced"):
        if transform == "vmap":
            torch.func.vmap(step)(p[None].repeat(3, 1, 1))
        else:
            torch.func.grad(step)(p)
    assert float(m.result()) == pytest.approx(oracle(YT, YP)[0], rel=1e-6)
    assert all(type(v) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(v)
               for v in m.variables)


@pytest.mark.parametrize("metric", [False, True])
def test_streamed_float16_result_beyond_its_range_is_inf_without_a_warning(
        backend: ArrayBackend, metric: bool) -> None:
    """evaluate_batches' float16 result (y_pred's dtype, or a float16 metric's) cast a float64
    value above 65504 with NumPy's "overflow encountered in cast" RuntimeWarning (Dask's at
    compute time); the loss class gives inf silently, as Keras' cast."""
    strict = backend.member is Backend.ARRAY_API_STRICT  # no float16 there: float32 results
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if metric:  # log-probabilities: KL = 0 - (-1e5) per sample
            the_metric = KLDivergence(dtype="float16", inputs="log_probs", name="m")
            t = backend.asarray([[0.0, -np.inf]], dtype="float32")
            p = backend.asarray([[-1e5, 0.0]], dtype="float32")
            got = kldiv.evaluate_batches([t, t], [p, p], metric=the_metric)
            expected = 1e5
        else:  # 5000 * 16.1 = 80590
            dtype = "float32" if strict else "float16"
            t = backend.asarray([[1.0, 0.0]], dtype=dtype)
            p = backend.asarray([[0.0, 1.0]], dtype=dtype)
            w = backend.asarray([5000.0], dtype="float32")
            got = kldiv.evaluate_batches([t], [p], [w], reduction="sum")
            expected = float(oracle([[1.0, 0.0]], [[0.0, 1.0]])[0]) * 5000
        value = backend.to_numpy(got)
    if strict:
        assert value.dtype == np.float32 and float(value) == pytest.approx(expected, rel=1e-6)
    else:
        assert value.dtype == np.float16 and float(value) == np.inf


def test_files_with_values_are_refused_on_a_device_without_values(tmp_path: Path) -> None:
    """evaluate_files(paths, backend="torch", device="meta") moved the files' values to a
    device that keeps shapes only: a meta result (a silently empty answer) or, for out= and
    on the host, torch's "Cannot copy out of meta tensor". A ValueError naming the device;
    meta tensors computed on 'meta' itself stay allowed."""
    torch = pytest.importorskip("torch")
    np.save(tmp_path / "t.npy", YT)
    np.save(tmp_path / "p.npy", YP)
    t, p = str(tmp_path / "t.npy"), str(tmp_path / "p.npy")
    for kwargs in ({}, {"metric": True}, {"reduction": "none"}):
        with pytest.raises(ValueError, match=r"device 'meta' .*no values.*y_true file"):
            kldiv.evaluate_files(t, p, backend="torch", device="meta", **kwargs)
    with pytest.raises(ValueError, match=r"device 'meta' .*no values"):  # one input with values
        kldiv.evaluate_files(torch.tensor(YT, device="meta"), p, backend="torch", device="meta")
    meta = torch.tensor(YT, device="meta"), torch.tensor(YP, device="meta")
    assert kldiv.evaluate_files(*meta, backend="torch", device="meta").device.type == "meta"


def test_traced_looks_up_the_tracer_types_once_per_array_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """traced() runs on every metric update: it read jax.core.Tracer from sys.modules (and
    torch's functorch check) on every call, about 0.5 us each; the answer depends only on the
    array's type, so it is looked up once per type."""
    from kldiv import _accumulate

    class JaxCore:
        reads = 0

        @property
        def Tracer(self) -> type:  # jax.core's name
            type(self).reads += 1
            return type("Tracer", (), {})

    monkeypatch.setitem(sys.modules, "jax.core", JaxCore())
    monkeypatch.setattr(_accumulate, "_TRACED_BY_TYPE", {}, raising=False)
    m = KLDivergence()
    for _ in range(5):
        m.update_state(YT, YP)
    assert JaxCore.reads <= 1
    assert _float(m.result()) == pytest.approx(oracle(YT, YP).mean(), rel=1e-6)


# Last: importing TensorFlow loads Keras, which makes later metrics keras Metrics
def test_reduction_none_batches_of_two_half_dtypes_on_tensorflow() -> None:
    """TensorFlow's concat does not promote: bfloat16 then float16 per-sample losses raised
    TensorFlow's InvalidArgumentError in memory (out= wrote float32, as NumPy and torch
    concatenate them)."""
    tf = pytest.importorskip("tensorflow")
    t = tf.constant(YT)
    got = kldiv.evaluate_batches([t, t], [tf.constant(YP, tf.bfloat16), tf.constant(YP, tf.float16)],
                                 reduction="none")
    assert got.dtype == tf.float32 and tuple(got.shape) == (4,)
    np.testing.assert_allclose(got.numpy(), np.tile(oracle(YT, YP), 2), rtol=1e-2, atol=1e-6)
