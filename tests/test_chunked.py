"""Chunked evaluation: ``evaluate_batches`` and ``evaluate_files`` on every backend."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import Backend
from kldiv import KLDivergence
from kldiv._chunked import DataFileError, _NpyWriter
from kldiv.metrics import KLDivergence as Metric

REDUCTIONS = ["auto", "sum_over_batch_size", "mean", "sum", "mean_with_sample_weight"]


def _data(rows: int = 100, classes: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.dirichlet(np.ones(classes), size=rows).astype(np.float32)
    p = rng.dirichlet(np.ones(classes), size=rows).astype(np.float32)
    w = rng.random(rows).astype(np.float32)
    return t, p, w


def _batches(a: np.ndarray, size: int, conv: Any = None) -> list[Any]:
    return [conv(a[i:i + size]) if conv else a[i:i + size] for i in range(0, len(a), size)]


def _file_backend(backend: Backend) -> str:
    return backend.name.split("-")[0]


def _device(backend: Backend) -> str | None:
    return {"torch-cuda": "cuda", "jax-gpu": "gpu", "cupy": "cuda:0"}.get(backend.name)


# -- evaluate_batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_evaluate_batches_matches_the_loss_class(backend: Backend, reduction: str, weighted: bool) -> None:
    t, p, w = _data()
    sw = _batches(w, 32, backend.asarray) if weighted else None
    out = kldiv.evaluate_batches(_batches(t, 32, backend.asarray), _batches(p, 32, backend.asarray), sw,
                                 reduction=reduction)
    assert backend.is_native(out)
    assert out.dtype == backend.dtype("float32")
    expected = KLDivergence(reduction=reduction)(t, p, sample_weight=w if weighted else None)
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=1e-6)


def test_evaluate_batches_metric(backend: Backend) -> None:
    t, p, w = _data()
    got = kldiv.evaluate_batches(_batches(t, 25, backend.asarray), _batches(p, 25, backend.asarray),
                                 _batches(w, 25, backend.asarray), metric=True)
    assert backend.is_native(got) and got.dtype == backend.dtype("float32")
    expected = (kldiv.kld(t, p).astype(np.float64) * w).sum() / w.sum()
    np.testing.assert_allclose(backend.to_numpy(got), expected, rtol=1e-6)
    # an existing metric keeps its state and goes on
    m = Metric()
    m.update_state(backend.asarray(t[:10]), backend.asarray(p[:10]))
    kldiv.evaluate_batches(_batches(t[10:], 30, backend.asarray), _batches(p[10:], 30, backend.asarray), metric=m)
    np.testing.assert_allclose(backend.to_numpy(m.result()), kldiv.kld(t, p).astype(np.float64).mean(), rtol=1e-6)


def test_evaluate_batches_none(backend: Backend, tmp_path: Path) -> None:
    t, p, w = _data()
    out = kldiv.evaluate_batches(_batches(t, 40, backend.asarray), _batches(p, 40, backend.asarray),
                                 _batches(w, 40, backend.asarray), reduction="none")
    assert backend.is_native(out)
    expected = KLDivergence(reduction="none")(t, p, sample_weight=w)
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=1e-6)
    path = tmp_path / "loss.npy"
    written = kldiv.evaluate_batches(_batches(t, 40, backend.asarray), _batches(p, 40, backend.asarray),
                                     _batches(w, 40, backend.asarray), reduction="none", out=path)
    assert isinstance(written, np.memmap) and written.shape == (100,) and written.dtype == np.float32
    np.testing.assert_allclose(np.load(path), expected, rtol=1e-6)


def test_evaluate_batches_none_is_bit_exact_on_numpy(tmp_path: Path) -> None:
    t, p, w = _data(rows=37)
    expected = KLDivergence(reduction="none")(t, p, sample_weight=w)
    got = kldiv.evaluate_batches(_batches(t, 8), _batches(p, 8), _batches(w, 8), reduction=None,
                                 out=tmp_path / "o.npy")
    assert np.array_equal(got, expected)
    t64, p64 = t.astype(np.float64), p.astype(np.float64)
    got64 = kldiv.evaluate_batches(_batches(t64, 8), _batches(p64, 8), reduction="none", out=tmp_path / "o64.npy")
    assert got64.dtype == np.float64 and np.array_equal(got64, kldiv.kld(t64, p64))


def test_evaluate_batches_edge_cases() -> None:
    t, p, _ = _data(rows=10)
    # no batch at all: 0, as the loss of an empty batch
    empty = kldiv.evaluate_batches([], [])
    assert float(empty) == 0.0
    assert float(kldiv.evaluate_batches([], [], metric=True)) == 0.0
    with pytest.raises(ValueError, match=r"differ in length.*y_pred"):
        kldiv.evaluate_batches(_batches(t, 5), _batches(p[:5], 5))
    with pytest.raises(ValueError, match="sample_weight"):
        kldiv.evaluate_batches(_batches(t, 5), _batches(p, 5), [1.0])
    with pytest.raises(ValueError, match="Invalid reduction"):
        kldiv.evaluate_batches(_batches(t, 5), _batches(p, 5), reduction="median")
    with pytest.raises(ValueError, match="either metric= or reduction="):
        kldiv.evaluate_batches(_batches(t, 5), _batches(p, 5), reduction="sum", metric=True)
    with pytest.raises(ValueError, match="out= is for reduction='none'"):
        kldiv.evaluate_batches(_batches(t, 5), _batches(p, 5), out="x.npy")
    with pytest.raises(TypeError, match="metric must be"):
        kldiv.evaluate_batches(_batches(t, 5), _batches(p, 5), metric=KLDivergence())  # type: ignore[arg-type]
    # generators (single pass) and scalar weights
    got = kldiv.evaluate_batches((x for x in _batches(t, 3)), (x for x in _batches(p, 3)),
                                 (2.0 for _ in range(4)), reduction="sum")
    np.testing.assert_allclose(got, 2 * kldiv.kld(t, p).astype(np.float64).sum(), rtol=1e-6)


def test_evaluate_batches_refuses_mixed_libraries() -> None:
    torch = pytest.importorskip("torch")
    t, p, _ = _data(rows=10)
    with pytest.raises(TypeError, match=r"numpy state.*torch"):
        kldiv.evaluate_batches([t[:5], t[5:]], [p[:5], torch.from_numpy(p[5:])])
    with pytest.raises(TypeError, match=r"numpy.*torch"):
        kldiv.evaluate_batches([t[:5], t[5:]], [p[:5], torch.from_numpy(p[5:])], reduction="none")


def test_evaluate_batches_convert() -> None:
    torch = pytest.importorskip("torch")
    t, p, w = _data(rows=20)
    out = kldiv.evaluate_batches(_batches(t, 6), _batches(p, 6), _batches(w, 6), convert=torch.from_numpy)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.item(), KLDivergence()(t, p, sample_weight=w), rtol=1e-6)


# -- evaluate_files ------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Any]:
    t, p, w = _data(rows=1000, classes=7, seed=5)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "w.npy", w)
    return {"dir": tmp_path, "t": t, "p": p, "w": w,
            "tp": tmp_path / "t.npy", "pp": tmp_path / "p.npy", "wp": tmp_path / "w.npy"}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", [*REDUCTIONS, "metric"])
def test_evaluate_files_every_backend(backend: Backend, files: dict[str, Any], reduction: str,
                                      weighted: bool) -> None:
    kwargs: dict[str, Any] = {"metric": True} if reduction == "metric" else {"reduction": reduction}
    out = kldiv.evaluate_files(files["tp"], files["pp"], sample_weight=files["wp"] if weighted else None,
                               backend=_file_backend(backend), device=_device(backend), batch_rows=128,
                               **kwargs)
    if _file_backend(backend) == "dask":
        out = out.compute()
        assert isinstance(out, np.ndarray | np.generic)
    else:
        assert backend.is_native(out)
    w = files["w"] if weighted else None
    if reduction == "metric":
        wb = np.ones(1000) if w is None else w.astype(np.float64)
        expected = (kldiv.kld(files["t"], files["p"]) * wb).sum() / wb.sum()
    else:
        expected = KLDivergence(reduction=reduction)(files["t"], files["p"], sample_weight=w)
    assert out.dtype == backend.dtype("float32")
    np.testing.assert_allclose(backend.to_numpy(out) if _file_backend(backend) != "dask" else out,
                               expected, rtol=1e-6)


def test_evaluate_files_none_to_output(backend: Backend, files: dict[str, Any]) -> None:
    path = files["dir"] / "loss.npy"
    got = kldiv.evaluate_files(files["tp"], files["pp"], sample_weight=files["wp"], reduction="none",
                               backend=_file_backend(backend), device=_device(backend), batch_rows=300,
                               out=path)
    assert isinstance(got, np.memmap) and got.shape == (1000,)
    expected = KLDivergence(reduction="none")(files["t"], files["p"], sample_weight=files["w"])
    np.testing.assert_allclose(np.load(path), expected, rtol=1e-6)


def test_evaluate_files_none_in_memory(files: dict[str, Any]) -> None:
    got = kldiv.evaluate_files(files["tp"], files["pp"], reduction="none", batch_rows=333)
    assert np.array_equal(got, kldiv.kld(files["t"], files["p"]))


def test_evaluate_files_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    # rank 3, with the Keras 2 trailing-1 squeeze on y_true, and a (N, T) weight
    t = rng.random((50, 4, 3, 1)).astype(np.float32)[..., 0][..., None]
    t3 = rng.random((50, 4, 3)).astype(np.float32)
    p = rng.random((50, 4, 3)).astype(np.float32)
    w = rng.random((50, 4)).astype(np.float32)
    for name, arr in {"t": t, "t3": t3, "p": p, "w": w, "one": t3[:1], "flat": t3[0, 0]}.items():
        np.save(tmp_path / f"{name}.npy", arr)

    def ev(a: str, b: str, **kw: Any) -> Any:
        return kldiv.evaluate_files(tmp_path / f"{a}.npy", tmp_path / f"{b}.npy", batch_rows=7, **kw)

    np.testing.assert_allclose(ev("t3", "p", sample_weight=tmp_path / "w.npy"),
                               KLDivergence()(t3, p, sample_weight=w), rtol=1e-6)
    np.testing.assert_allclose(ev("t3", "p", sample_weight=w[:, :1]),  # in-memory weight (N, 1)
                               KLDivergence()(t3, p, sample_weight=w[:, :1]), rtol=1e-6)
    # a single row, or fewer axes, broadcasts
    np.testing.assert_allclose(ev("one", "p", reduction="sum"), KLDivergence(reduction="sum")(t3[:1], p), rtol=1e-6)
    np.testing.assert_allclose(ev("flat", "p"), KLDivergence()(t3[0, 0], p), rtol=1e-6)
    np.testing.assert_allclose(ev("flat", "flat"), KLDivergence()(t3[0, 0], t3[0, 0]), atol=1e-7)
    # a scalar weight
    np.testing.assert_allclose(ev("t3", "p", sample_weight=0.5, reduction="sum"),
                               KLDivergence(reduction="sum")(t3, p, sample_weight=0.5), rtol=1e-6)
    # arrays (not paths) are accepted too
    got = kldiv.evaluate_files(t3, p, batch_rows=9)
    np.testing.assert_allclose(got, KLDivergence()(t3, p), rtol=1e-6)


def test_evaluate_files_integer_fortran_and_empty(tmp_path: Path) -> None:
    t, p, _ = _data(rows=40)
    np.save(tmp_path / "ti.npy", (t > 0.2).astype(np.int8))  # integer y_true
    np.save(tmp_path / "pf.npy", np.asfortranarray(p))  # Fortran order: read by slicing
    got = kldiv.evaluate_files(tmp_path / "ti.npy", tmp_path / "pf.npy", batch_rows=6)
    np.testing.assert_allclose(got, KLDivergence()((t > 0.2).astype(np.float32), p), rtol=1e-6)
    np.save(tmp_path / "e1.npy", np.zeros((0, 3), np.float32))
    np.save(tmp_path / "e2.npy", np.zeros((0, 3), np.float32))
    for red in ("auto", "sum"):
        assert float(kldiv.evaluate_files(tmp_path / "e1.npy", tmp_path / "e2.npy", reduction=red)) == 0.0
    got_none = kldiv.evaluate_files(tmp_path / "e1.npy", tmp_path / "e2.npy", reduction="none",
                                    out=tmp_path / "o.npy")
    assert got_none.shape == (0,)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing.npy", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: _write(d / "text.npy", b"hello, not numpy"), "not a .npy file"),
        (lambda d: _save(d / "s.npy", np.array(["a", "b"])), "not numeric"),
        (lambda d: _save(d / "c.npy", np.ones((3, 2), np.complex64)), "complex"),
        (lambda d: _save(d / "z.npy", np.float32(1.0)), "0-d"),
        (lambda d: _save(d / "short.npy", np.ones((99, 7), np.float32)), "same number of rows"),
        (lambda d: _save(d / "cls.npy", np.ones((1000, 5), np.float32)), "do not fit"),
        (lambda d: _savez(d / "a.npz"), ".npz"),
        (lambda d: _truncated(d / "trunc.npy"), "cannot be read"),
        (lambda d: _objects(d / "o.npy"), "Python objects"),
    ],
)
def test_evaluate_files_bad_files(files: dict[str, Any], make: Any, match: str) -> None:
    bad = make(files["dir"])
    with pytest.raises(DataFileError, match=match):
        kldiv.evaluate_files(files["tp"], bad)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, arr: Any) -> Path:
    np.save(path, arr)
    return path


def _savez(path: Path) -> Path:
    np.savez(path, a=np.ones((2, 2)))
    return path


def _truncated(path: Path) -> Path:
    np.save(path, np.ones((1000, 7), np.float32))
    path.write_bytes(path.read_bytes()[:2000])
    return path


def _objects(path: Path) -> Path:
    np.save(path, np.array([1, None], dtype=object), allow_pickle=True)
    return path


def test_evaluate_files_bad_options(files: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown backend"):
        kldiv.evaluate_files(files["tp"], files["pp"], backend="tensorflow")
    with pytest.raises(ValueError, match="batch_rows"):
        kldiv.evaluate_files(files["tp"], files["pp"], batch_rows=0)
    with pytest.raises(ValueError, match="runs on the CPU"):
        kldiv.evaluate_files(files["tp"], files["pp"], device="cuda")
    with pytest.raises(DataFileError, match="sample_weight"):
        kldiv.evaluate_files(files["tp"], files["pp"], sample_weight=np.ones(3))


def test_evaluate_files_unavailable_device(files: dict[str, Any]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        kldiv.evaluate_files(files["tp"], files["pp"], backend="torch", device="cuda")


# -- progress bars -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tqdm", "rich", True])
def test_progress_bar(files: dict[str, Any], kind: Any, capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(kind if isinstance(kind, str) else "tqdm")
    got = kldiv.evaluate_files(files["tp"], files["pp"], batch_rows=100, progress=kind)
    np.testing.assert_allclose(got, KLDivergence()(files["t"], files["p"]), rtol=1e-6)
    err = capfd.readouterr().err
    assert err.strip(), "no progress bar on stderr"


def test_progress_bar_without_tqdm_or_rich(files: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    monkeypatch.setitem(sys.modules, "rich.console", None)
    with pytest.raises(ImportError, match=r"kldiv\[progress\]"):
        kldiv.evaluate_files(files["tp"], files["pp"], progress=True)
    # "auto" (None) quietly goes without
    kldiv.evaluate_files(files["tp"], files["pp"], progress=None)
    with pytest.raises(ValueError, match="progress must be"):
        kldiv.evaluate_files(files["tp"], files["pp"], progress="bar")


# -- bounded memory ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_evaluate_files_runs_in_bounded_memory(tmp_path: Path) -> None:
    """2 x 256 MiB files, 8 MiB batches: the process' peak RSS grows by a few batches only."""
    rows, cols = 16384, 4096
    for name, seed in (("t", 0), ("p", 1)):
        mm = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=np.float32, shape=(rows, cols))
        rng = np.random.default_rng(seed)
        for i in range(0, rows, 2048):
            mm[i:i + 2048] = rng.random((2048, cols), dtype=np.float32)
        mm.flush()
        del mm
    code = textwrap.dedent(
        f"""
        import json, numpy as np, kldiv

        def hwm():  # peak RSS of this process (VmHWM: reset at exec, unlike ru_maxrss)
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
        t, p = {str(tmp_path / "t.npy")!r}, {str(tmp_path / "p.npy")!r}
        small = np.random.default_rng(0).random((64, 8), dtype=np.float32)
        kldiv.evaluate_files(small, small, batch_rows=8)  # warm up (imports, caches)
        kldiv.evaluate_files(small, small, batch_rows=8, reduction="none", out={str(tmp_path / "w.npy")!r})
        base = hwm()
        auto = kldiv.evaluate_files(t, p, batch_rows=512)
        out = kldiv.evaluate_files(t, p, batch_rows=512, reduction="none", out={str(tmp_path / "o.npy")!r})
        peak = hwm()
        print(json.dumps({{"base": base, "peak": peak, "auto": float(auto), "n": int(out.shape[0])}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (res["peak"] - res["base"]) / 2**20
    print(f"\nevaluate_files over 2 x 256 MiB: peak RSS {res['peak'] / 2**20:.0f} MiB, growth {growth:.0f} MiB")
    # one batch is 8 MiB per input; the kernel's temporaries a few times that
    assert growth < 96, f"peak RSS grew by {growth:.0f} MiB over 512 MiB of input"
    assert res["n"] == rows
    # the value, from a few rows checked in NumPy
    t = np.load(tmp_path / "t.npy", mmap_mode="r")
    p = np.load(tmp_path / "p.npy", mmap_mode="r")
    total = sum(float(kldiv.kld(np.array(t[i:i + 2048]), np.array(p[i:i + 2048])).astype(np.float64).sum())
                for i in range(0, rows, 2048))
    np.testing.assert_allclose(res["auto"], total / rows, rtol=1e-6)


# -- the writer and the docs -----------------------------------------------------------------------


def test_npy_writer_round_trip(tmp_path: Path) -> None:
    w = _NpyWriter(tmp_path / "x.npy")
    a = np.arange(12, dtype=np.float64).reshape(4, 3)
    w.write(a[:3])
    w.write(a[3:])
    w.close()
    assert np.array_equal(np.load(tmp_path / "x.npy"), a)
    w = _NpyWriter(tmp_path / "y.npy")
    w.write(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="do not stack"):
        w.write(np.ones((2, 4), np.float32))
    w.abort()
    assert not (tmp_path / "y.npy").exists()


def test_docstring_examples() -> None:
    import kldiv._chunked

    result = doctest.testmod(kldiv._chunked, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
