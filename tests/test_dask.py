"""Dask: the function, the loss class and the metric stay lazy; a real LocalCluster run.

The cluster test computes the loss over a 16384 x 4096 float32 pair (256 MiB each) that is
generated on the workers block by block, never on the client, and checks it against NumPy.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import kldiv
from kldiv import KLDivergence
from kldiv.metrics import KLDivergence as Metric

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

REDUCTIONS = ["auto", "sum_over_batch_size", "mean", "sum", "none", "mean_with_sample_weight"]


def _no_compute(*_: Any, **__: Any) -> Any:
    raise AssertionError("computed before .compute()")


def _data(rows: int = 12, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.dirichlet(np.ones(classes), size=rows).astype(np.float32)
    p = rng.dirichlet(np.ones(classes), size=rows).astype(np.float32)
    t[0, :2] = [0.0, 1.5]  # clipped values on the way
    return t, p


def _weights(kind: str, rows: int) -> tuple[Any, Any]:
    """(the weight as given to the Dask call, the same weight in NumPy)."""
    rng = np.random.default_rng(4)
    w = rng.random(rows).astype(np.float32)
    if kind == "none":
        return None, None
    if kind == "scalar":
        return 2.5, 2.5
    if kind == "list":
        return w.tolist(), w
    if kind == "numpy":
        return w, w
    if kind == "dask":
        return da.from_array(w, chunks=5), w
    if kind == "dask_column":  # (B, 1): the trailing axis is squeezed
        return da.from_array(w[:, None], chunks=(5, 1)), w[:, None]
    raise AssertionError(kind)


WEIGHTS = ["none", "scalar", "list", "numpy", "dask", "dask_column"]


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_class_is_lazy_and_matches_numpy(reduction: str, weight: str) -> None:
    t, p = _data()
    w_dask, w_np = _weights(weight, len(t))
    dt, dp = da.from_array(t, chunks=(5, 5)), da.from_array(p, chunks=(5, 5))
    loss = KLDivergence(reduction=reduction)
    with dask.config.set(scheduler=_no_compute):
        out = loss(dt, dp, sample_weight=w_dask)
    assert isinstance(out, da.Array)
    assert out.dtype == np.float32
    expected = loss(t, p, sample_weight=w_np)
    np.testing.assert_allclose(out.compute(), expected, rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("weight", ["none", "dask"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unknown_chunk_sizes(reduction: str, weight: str) -> None:
    """Rows selected by a mask have NaN sizes in Dask; every reduction still works, lazily."""
    t, p = _data(rows=20)
    keep = p[:, 0] > 0.1
    dt, dp = da.from_array(t, chunks=(6, 5)), da.from_array(p, chunks=(6, 5))
    mask = dp[:, 0] > 0.1
    st, sp = dt[mask], dp[mask]
    assert np.isnan(sp.shape[0])
    w_np = np.linspace(0.0, 1.0, 20, dtype=np.float32)
    w_dask = da.from_array(w_np, chunks=6)[mask] if weight == "dask" else None
    loss = KLDivergence(reduction=reduction)
    with dask.config.set(scheduler=_no_compute):
        out = loss(st, sp, sample_weight=w_dask)
    expected = loss(t[keep], p[keep], sample_weight=None if weight == "none" else w_np[keep])
    np.testing.assert_allclose(out.compute(), expected, rtol=2e-6, atol=1e-12)


def test_function_is_lazy_with_mixed_inputs() -> None:
    t, p = _data()
    with dask.config.set(scheduler=_no_compute):
        a = kldiv.kld(da.from_array(t, chunks=4), da.from_array(p, chunks=4))
        b = kldiv.kld(t, da.from_array(p, chunks=4))  # NumPy y_true joins Dask y_pred
        c = kldiv.kld(da.from_array(t, chunks=4), p)  # Dask y_true makes the call lazy
    for x in (a, b, c):
        assert isinstance(x, da.Array)
        np.testing.assert_allclose(x.compute(), kldiv.kld(t, p), rtol=1e-6)


def test_metric_is_lazy_and_matches_numpy() -> None:
    t, p = _data(rows=40)
    w = np.linspace(0.0, 2.0, 40, dtype=np.float32)
    m_np, m_da = Metric(), Metric()
    with dask.config.set(scheduler=_no_compute):
        for i in range(0, 40, 10):
            sl = slice(i, i + 10)
            m_da.update_state(da.from_array(t[sl], chunks=5), da.from_array(p[sl], chunks=5),
                              sample_weight=da.from_array(w[sl], chunks=5))
            m_np.update_state(t[sl], p[sl], sample_weight=w[sl])
        r = m_da.result()
        other = Metric()
        other.update_state(da.from_array(t, chunks=8), da.from_array(p, chunks=8))
        m_da.merge_state(other)
        merged = m_da.result()
    assert isinstance(r, da.Array) and r.dtype == np.float32
    np.testing.assert_allclose(r.compute(), m_np.result(), rtol=1e-6)
    m_np.update_state(t, p)
    np.testing.assert_allclose(merged.compute(), m_np.result(), rtol=1e-6)


def test_evaluate_files_with_dask_is_lazy(tmp_path: Any) -> None:
    t, p = _data(rows=50)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "p.npy", p)
    w = np.linspace(0.0, 1.0, 50, dtype=np.float32)
    np.save(tmp_path / "w.npy", w)
    with dask.config.set(scheduler=_no_compute):
        out = kldiv.evaluate_files(tmp_path / "t.npy", tmp_path / "p.npy", backend="dask",
                                   batch_rows=16, sample_weight=tmp_path / "w.npy", reduction="sum")
        met = kldiv.evaluate_files(tmp_path / "t.npy", tmp_path / "p.npy", backend="dask",
                                   batch_rows=16, sample_weight=tmp_path / "w.npy", metric=True)
    assert isinstance(out, da.Array) and out.ndim == 0 and isinstance(met, da.Array)
    # only the path travels in the graph: no block holds the data
    assert all(not isinstance(v, np.ndarray) or v.size < 50 for v in dict(out.__dask_graph__()).values())
    np.testing.assert_allclose(out.compute(), KLDivergence(reduction="sum")(t, p, sample_weight=w), rtol=1e-6)
    np.testing.assert_allclose(met.compute(), (kldiv.kld(t, p) * w).sum() / w.sum(), rtol=1e-6)


# -- a real cluster ------------------------------------------------------------------------------

ROWS, COLS, CHUNK_ROWS, SEED = 16384, 4096, 1024, 1234
MEMORY_LIMIT = "1GiB"


def _block(seed: int, which: int, rows: int, cols: int, start: int) -> np.ndarray:
    """Rows start:start+rows of input ``which``: rows of a probability distribution (float32)."""
    rng = np.random.default_rng([seed, which, start])
    x = rng.random((rows, cols), dtype=np.float32)
    x[:, :: 97] = 0.0  # some exact zeros (clipped to 1e-7)
    x /= x.sum(axis=1, keepdims=True)
    return x


def _weight_block(seed: int, rows: int, start: int) -> np.ndarray:
    return np.random.default_rng([seed, 99, start]).random(rows).astype(np.float32)


def _lazy_inputs() -> tuple[Any, Any, Any]:
    """The 16384 x 4096 inputs as lazy Dask arrays: each block is generated on a worker."""
    chunks = ((CHUNK_ROWS,) * (ROWS // CHUNK_ROWS), (COLS,))

    def gen(which: int) -> Any:
        def make(block_info: Any = None) -> np.ndarray:
            (start, stop), _ = block_info[None]["array-location"]
            return _block(SEED, which, stop - start, COLS, start)

        return da.map_blocks(make, dtype=np.float32, chunks=chunks, meta=np.empty((0, 0), np.float32),
                             name=f"kldiv-test-input-{which}")

    def wgen(block_info: Any = None) -> np.ndarray:
        (start, stop), = block_info[None]["array-location"]
        return _weight_block(SEED, stop - start, start)

    w = da.map_blocks(wgen, dtype=np.float32, chunks=(chunks[0],), meta=np.empty((0,), np.float32),
                      name="kldiv-test-weight")
    return gen(0), gen(1), w


def _numpy_reference() -> dict[str, Any]:
    """The same data in NumPy, chunk by chunk on the client (per-sample losses, weights)."""
    losses, weights = [], []
    for start in range(0, ROWS, CHUNK_ROWS):
        t = _block(SEED, 0, CHUNK_ROWS, COLS, start)
        p = _block(SEED, 1, CHUNK_ROWS, COLS, start)
        losses.append(kldiv.kld(t, p))
        weights.append(_weight_block(SEED, CHUNK_ROWS, start))
    return {"loss": np.concatenate(losses), "w": np.concatenate(weights)}


def _rss_sampler(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    proc = psutil.Process()
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.02)


def _worker_peak_rss() -> int:
    """Peak RSS of this (worker) process: VmHWM on Linux, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _worker_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("psutil")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
        # loopback only, on free ports (dashboard_address=None still starts one on :8787)
        dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0",
        memory_limit=MEMORY_LIMIT, silence_logs=logging.ERROR,
    ) as lc, distributed.Client(lc) as client:
        yield client


@pytest.mark.slow
def test_local_cluster_16384x4096(cluster: Any, request: pytest.FixtureRequest) -> None:
    client = cluster
    import psutil

    t, p, w = _lazy_inputs()
    assert t.shape == (ROWS, COLS) and t.dtype == np.float32 and t.nbytes == 256 * 2**20
    with dask.config.set(scheduler=_no_compute):  # building all of this computes nothing
        per_sample = kldiv.kld(t, p)
        auto = KLDivergence()(t, p)
        wsum = KLDivergence(reduction="sum")(t, p, sample_weight=w)
        wmean = KLDivergence(reduction="mean_with_sample_weight")(t, p, sample_weight=w)
        metric = Metric()
        for start in range(0, ROWS, 4096):  # a stream of four updates, lazily
            sl = slice(start, start + 4096)
            metric.update_state(t[sl], p[sl], sample_weight=w[sl])
        m_result = metric.result()

    client.run(lambda: None)  # workers are up
    base_workers = client.run(_worker_rss)
    proc = psutil.Process()
    client_base = proc.memory_info().rss
    stop, peak = threading.Event(), [client_base]
    sampler = threading.Thread(target=_rss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    got = dict(zip(["per_sample", "auto", "wsum", "wmean", "metric"],
                   dask.compute(per_sample, auto, wsum, wmean, m_result), strict=True))
    elapsed = time.perf_counter() - t0
    stop.set()
    sampler.join()
    worker_peaks = client.run(_worker_peak_rss)
    client_growth = peak[0] - client_base

    ref = _numpy_reference()
    loss, wt = ref["loss"], ref["w"]
    assert got["per_sample"].shape == (ROWS,) and got["per_sample"].dtype == np.float32
    np.testing.assert_allclose(got["per_sample"], loss, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["auto"], loss.astype(np.float64).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["wsum"], (loss.astype(np.float64) * wt).sum(), rtol=1e-6)
    np.testing.assert_allclose(got["wmean"], (loss.astype(np.float64) * wt).sum() / wt.sum(), rtol=1e-6)
    np.testing.assert_allclose(got["metric"], (loss.astype(np.float64) * wt).sum() / wt.sum(), rtol=1e-6)
    assert got["metric"].dtype == np.float32

    mib = 2**20
    figures = {
        "input_MiB_each": t.nbytes // mib,
        "chunk_MiB": CHUNK_ROWS * COLS * 4 // mib,
        "worker_memory_limit": MEMORY_LIMIT,
        "worker_rss_before_MiB": {k: round(v / mib) for k, v in base_workers.items()},
        "worker_peak_rss_MiB": {k: round(v / mib) for k, v in worker_peaks.items()},
        "client_rss_growth_MiB": round(client_growth / mib, 1),
        "compute_seconds": round(elapsed, 2),
    }
    print("\nkldiv dask LocalCluster memory:", json.dumps(figures))
    request.node.user_properties.append(("memory", figures))
    out = os.environ.get("KLDIV_DASK_MEMORY_REPORT")
    if out:  # written beside the target and renamed: a failed write never leaves half a report
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".part")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(figures, f, indent=2)
            os.replace(tmp, out)
        except BaseException:
            os.remove(tmp)
            raise
    # Nothing big comes back to the client, and each worker stays well inside its limit.
    assert client_growth < 100 * mib
    assert all(v < 1024 * mib for v in worker_peaks.values())


def test_cli_on_an_existing_cluster(cluster: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``--backend dask --scheduler ADDRESS``: the same command on a running cluster."""
    from kldiv import _cli

    t, p = _data(rows=30)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "p.npy", p)
    address = cluster.scheduler.address
    rc = _cli.compute_main([str(tmp_path / "t.npy"), str(tmp_path / "p.npy"), "--backend", "dask",
                       "--scheduler", address, "--batch-rows", "7", "--reduction", "sum"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    np.testing.assert_allclose(float(captured.out), KLDivergence(reduction="sum")(t, p), rtol=1e-6)


@pytest.mark.parametrize(
    ("ts", "ps", "ws"),
    [
        ((12, 1), (12,), None),  # one sample of 12 classes, for the loss class
        ((12, 4, 1), (12, 4), (12,)),
        ((4,), (12, 4), (12, 1)),
        ((), (12, 4), None),
        ((12, 2, 12, 4), (12, 2, 12, 4), (12,)),  # weight of rank r - 2: broadcast on the last axis
        ((0, 4), (0, 4), (0,)),
    ],
)
@pytest.mark.parametrize("reduction", ["auto", "sum", "none", "mean_with_sample_weight"])
def test_evaluate_files_with_dask_follows_the_loss_class(tmp_path: Any, ts: tuple[int, ...], ps: tuple[int, ...],
                                                         ws: tuple[int, ...] | None, reduction: str) -> None:
    """backend="dask": lazy, and what the loss class gives on the whole arrays, whatever the ranks."""
    rng = np.random.default_rng(len(ts) + len(ps))
    t = rng.random(ts).astype(np.float32)
    p = rng.random(ps).astype(np.float32)
    w = None if ws is None else rng.random(ws).astype(np.float32)
    np.save(tmp_path / "t.npy", t.astype(">f4"))  # big-endian on the way, too
    np.save(tmp_path / "p.npy", p)
    for y_true, y_pred in ((tmp_path / "t.npy", tmp_path / "p.npy"),
                           (da.from_array(t.astype(">f4")), da.from_array(p, chunks=5))):
        with dask.config.set(scheduler=_no_compute):
            out = kldiv.evaluate_files(y_true, y_pred, sample_weight=w, backend="dask", batch_rows=5,
                                       reduction=reduction)
        assert isinstance(out, da.Array)
        got = out.compute()
        expected = KLDivergence(reduction=reduction)(t, p, sample_weight=w)
        assert np.asarray(got).dtype == np.float32 and np.shape(got) == np.shape(expected)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_evaluate_files_with_dask_writes_out_safely(tmp_path: Any) -> None:
    """backend="dask", out=: the output is written block by block to a temporary file and
    renamed into place; an input as out= is refused before anything runs."""
    t, p = _data(rows=30)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "p.npy", p)
    got = kldiv.evaluate_files(tmp_path / "t.npy", tmp_path / "p.npy", backend="dask", batch_rows=7,
                               reduction="none", out=tmp_path / "o.npy")
    assert isinstance(got, np.memmap)
    np.testing.assert_allclose(got, kldiv.kld(t, p), rtol=1e-6)
    del got
    with pytest.raises(ValueError, match="overwrite an input"):
        kldiv.evaluate_files(tmp_path / "t.npy", tmp_path / "p.npy", backend="dask", reduction="none",
                             out=tmp_path / "t.npy")
    assert np.array_equal(np.load(tmp_path / "t.npy"), t)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o.npy", "p.npy", "t.npy"]
