"""Chunked evaluation: ``evaluate_batches`` and ``evaluate_files`` on every backend."""

from __future__ import annotations

import doctest
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, Backend
from kldiv import DataFileError, KLDivergence, _npy_writer
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


def _file_backend(backend: ArrayBackend) -> str:
    return backend.member.library


def _device(backend: ArrayBackend) -> str | None:
    return {"torch-cuda": "cuda", "jax-gpu": "gpu", "cupy": "cuda:0"}.get(backend.name)


# -- evaluate_batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_evaluate_batches_matches_the_loss_class(backend: ArrayBackend, reduction: str, weighted: bool) -> None:
    t, p, w = _data()
    sw = _batches(w, 32, backend.asarray) if weighted else None
    out = kldiv.evaluate_batches(_batches(t, 32, backend.asarray), _batches(p, 32, backend.asarray), sw,
                                 reduction=reduction)
    assert backend.is_native(out)
    assert out.dtype == backend.dtype("float32")
    expected = KLDivergence(reduction=reduction)(t, p, sample_weight=w if weighted else None)
    np.testing.assert_allclose(backend.to_numpy(out), expected, rtol=1e-6)


def test_evaluate_batches_metric(backend: ArrayBackend) -> None:
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


def test_evaluate_batches_none(backend: ArrayBackend, tmp_path: Path) -> None:
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
def test_evaluate_files_every_backend(backend: ArrayBackend, files: dict[str, Any], reduction: str,
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


def test_evaluate_files_none_to_output(backend: ArrayBackend, files: dict[str, Any]) -> None:
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


def test_evaluate_files_zero_d(files: dict[str, Any]) -> None:
    """A 0-d input broadcasts, as in the loss class; two 0-d inputs have no class axis."""
    half = _save(files["dir"] / "half.npy", np.float32(0.5))
    np.testing.assert_allclose(kldiv.evaluate_files(files["tp"], half, batch_rows=64),
                               KLDivergence()(files["t"], np.float32(0.5)), rtol=1e-6)
    np.testing.assert_allclose(kldiv.evaluate_files(half, files["pp"], batch_rows=64, reduction="sum"),
                               KLDivergence(reduction="sum")(np.float32(0.5), files["p"]), rtol=1e-6)
    with pytest.raises(DataFileError, match=r"both 0-d.*class axis"):
        kldiv.evaluate_files(half, half)


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
        kldiv.evaluate_files(files["tp"], files["pp"], backend="mxnet")
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
    w = _npy_writer.NpyWriter(tmp_path / "x.npy")
    a = np.arange(12, dtype=np.float64).reshape(4, 3)
    w.write(a[:3])
    assert not (tmp_path / "x.npy").exists()  # only the temporary file, until commit
    w.write(a[3:].astype(">f8"))  # cast to the first batch's dtype, native byte order
    assert w.commit() == str(tmp_path / "x.npy")
    assert np.array_equal(np.load(tmp_path / "x.npy"), a)
    assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
    w = _npy_writer.NpyWriter(tmp_path / "y.npy")
    w.write(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="do not stack"):
        w.write(np.ones((2, 4), np.float32))
    w.abort()
    w.abort()  # idempotent
    assert not (tmp_path / "y.npy").exists()
    with _npy_writer.NpyWriter(tmp_path / "z.npy") as w:  # leaving the block without commit: nothing written
        w.write(np.ones((2, 3), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


@pytest.mark.parametrize("module", ["kldiv._stream", "kldiv._files"])
def test_docstring_examples(module: str) -> None:
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- byte order and dtypes the target library lacks (issue 9, item 9) ------------------------------


@pytest.mark.parametrize("kind", ["big_endian", "float16", "big_endian_float64", "uint16", "in_memory_big_endian"])
def test_evaluate_files_byte_order_and_dtypes(backend: ArrayBackend, tmp_path: Path, kind: str) -> None:
    """Big-endian files (FITS, other machines) and dtypes a library lacks (float16 on
    array-api-strict) are converted on the host, before they move: the value is the loss
    class' on the native arrays."""
    t, p, w = _data(rows=30, classes=5)
    dtype = {"float16": "<f2", "big_endian_float64": ">f8", "uint16": ">u2"}.get(kind, ">f4")
    if kind == "uint16":
        t, p = np.round(t * 100), np.round(p * 100)  # integer counts
    tb, pb, wb = t.astype(dtype), p.astype(dtype), w.astype(">f4")
    if kind == "in_memory_big_endian":
        args: list[Any] = [tb, pb]
        sw: Any = wb
    else:
        for name, arr in (("t", tb), ("p", pb), ("w", wb)):
            np.save(tmp_path / f"{name}.npy", arr)
        args, sw = [tmp_path / "t.npy", tmp_path / "p.npy"], tmp_path / "w.npy"
    native = np.dtype(dtype).newbyteorder("=")
    for red in ("auto", "sum", "none"):
        got = kldiv.evaluate_files(*args, sample_weight=sw, reduction=red, batch_rows=7,
                                   backend=_file_backend(backend), device=_device(backend))
        if _file_backend(backend) == "dask":
            got = got.compute()
        else:
            assert backend.is_native(got)
        expected = KLDivergence(reduction=red)(t.astype(native), p.astype(native), sample_weight=w)
        values = backend.to_numpy(got) if _file_backend(backend) != "dask" else np.asarray(got)
        assert values.dtype.isnative
        rtol = 2e-3 if kind == "float16" else 1e-6
        np.testing.assert_allclose(values.astype(np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=1e-6)
        if kind == "float16" and backend.name != "array_api_strict":
            assert str(got.dtype).endswith("float16")  # kept where the library has it


def test_evaluate_files_device_without_float64(tmp_path: Path) -> None:
    """array-api-strict's "no_float64" device (like Apple MPS): float64 files are read as float32."""
    xps = pytest.importorskip("array_api_strict")
    t, p, w = _data(rows=20)
    np.save(tmp_path / "t.npy", t.astype(np.float64))
    np.save(tmp_path / "p.npy", p.astype(np.float64))
    np.save(tmp_path / "w.npy", w.astype(np.float64))
    got = kldiv.evaluate_files(tmp_path / "t.npy", tmp_path / "p.npy", sample_weight=tmp_path / "w.npy",
                               backend="array_api_strict", device="no_float64", batch_rows=6)
    assert got.dtype == xps.float32 and got.device == xps.Device("no_float64")
    np.testing.assert_allclose(float(got), KLDivergence()(t, p, sample_weight=w), rtol=1e-6)


# -- in-memory inputs of every kind, rank rules, integer parameters (issue 9, item 11) --------------


def _in_memory(kind: str, a: np.ndarray) -> Any:
    if kind == "list":
        return a.tolist()
    if kind == "memmap":
        return a  # replaced by the test with a real memmap
    if kind == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(a)
    if kind == "torch_grad":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(a.copy()).requires_grad_(True)
    if kind == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return jnp.asarray(a)
    if kind == "dask":
        da = pytest.importorskip("dask.array")
        return da.from_array(a, chunks=(7, a.shape[1]))
    if kind == "array_api_strict":
        xps = pytest.importorskip("array_api_strict")
        return xps.asarray(a)
    if kind == "matrix":
        return np.asmatrix(a)
    if kind == "tensorflow":
        tf = pytest.importorskip("tensorflow")
        return tf.constant(a)
    return a


IN_MEMORY = ["numpy", "list", "memmap", "torch", "torch_grad", "jax", "dask", "array_api_strict", "matrix",
             "tensorflow"]


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("kind", IN_MEMORY)
@pytest.mark.parametrize("target", ["numpy", "torch", "jax", "dask", "array_api_strict", "tensorflow"])
def test_evaluate_files_in_memory_inputs(tmp_path: Path, kind: str, target: str) -> None:
    pytest.importorskip(Backend(target).modname)
    t, p, w = _data(rows=30, classes=5)
    yt, yp, sw = (_in_memory(kind, a) for a in (t, p, w[:, None]))
    if kind == "memmap":
        yt = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=t.dtype, shape=t.shape)
        yt[:] = t
        yp = np.load(_save(tmp_path / "p.npy", p), mmap_mode="r")
    for red in ("auto", "sum", "none"):
        got = kldiv.evaluate_files(yt, yp, sample_weight=sw, reduction=red, batch_rows=8, backend=target)
        if target == "dask":
            got = got.compute()
        expected = KLDivergence(reduction=red)(t, p, sample_weight=w[:, None])
        assert np.asarray(got).dtype == np.float32
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    del yt, yp


def test_evaluate_files_refuses_masked_arrays() -> None:
    t, p, _ = _data(rows=4)
    with pytest.raises(TypeError, match="masked"):
        kldiv.evaluate_files(np.ma.masked_array(t, mask=t < 0.1), p)


RANK_CASES = {
    # name: (y_true shape, y_pred shape, sample_weight shape or None)
    "true_N1_pred_N": ((12, 1), (12,), None),  # the class squeezes y_true: one sample of 12 classes
    "pred_N1_true_N": ((12,), (12, 1), None),
    "true_NC1_pred_NC": ((12, 4, 1), (12, 4), (12,)),
    "pred_NC1_true_NC": ((12, 4), (12, 4, 1), (12, 1)),
    "true_C_pred_NC": ((4,), (12, 4), (12,)),
    "true_scalar_pred_NC": ((), (12, 4), None),
    "true_1C_pred_NTC": ((1, 4), (12, 3, 4), (12,)),
    "true_TC_pred_NTC": ((3, 4), (12, 3, 4), (12, 3)),
    "weight_NT1": ((12, 3, 4), (12, 3, 4), (12, 3, 1)),
    "weight_U_of_NTU": ((12, 2, 3, 4), (12, 2, 3, 4), (3,)),  # rank r - 2: broadcasts on the last axis
    "weight_N_of_NTU_with_N_eq_U": ((12, 2, 12, 4), (12, 2, 12, 4), (12,)),  # so this one too
    "weight_1T": ((12, 3, 4), (12, 3, 4), (1, 3)),
    "single_row": ((1, 4), (1, 4), (1,)),
    "empty": ((0, 4), (0, 4), (0,)),
    "one_d": ((4,), (4,), None),
}


@pytest.mark.parametrize("case", list(RANK_CASES))
@pytest.mark.parametrize("reduction", [*REDUCTIONS, "none", "metric"])
def test_evaluate_files_follows_the_loss_class_rank_rules(tmp_path: Path, case: str, reduction: str) -> None:
    """Whatever the ranks, batched evaluation gives what the loss class gives on the whole arrays."""
    ts, ps, ws = RANK_CASES[case]
    rng = np.random.default_rng(len(case))
    t = rng.random(ts).astype(np.float32)
    p = rng.random(ps).astype(np.float32)
    w = None if ws is None else rng.random(ws).astype(np.float32)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "p.npy", p)
    if w is not None:
        np.save(tmp_path / "w.npy", w)
    kwargs: dict[str, Any] = {"metric": True} if reduction == "metric" else {"reduction": reduction}
    for batch_rows in (1, 5, 100):
        for inputs in ((tmp_path / "t.npy", tmp_path / "p.npy", None if w is None else tmp_path / "w.npy"),
                       (t, p, w)):
            got = kldiv.evaluate_files(inputs[0], inputs[1], sample_weight=inputs[2], batch_rows=batch_rows,
                                       **kwargs)
            if reduction == "metric":
                m = Metric()
                m.update_state(t, p, w)
                expected = m.result()
            else:
                expected = KLDivergence(reduction=reduction)(t, p, sample_weight=w)
            assert np.shape(got) == np.shape(expected), (case, batch_rows)
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_evaluate_batches_follows_the_loss_class_rank_rules() -> None:
    t, p, _ = _data(rows=12)
    t1, p1 = t[:, :1], p[:, 0]  # (N, 1) and (N,): one sample of N classes, for the loss class
    whole = KLDivergence(reduction="sum")(t1, p1)
    np.testing.assert_allclose(kldiv.evaluate_batches([t1], [p1], reduction="sum"), whole, rtol=1e-6)
    t3, p2 = t[..., None], p  # (N, C, 1) against (N, C): y_true squeezed
    np.testing.assert_allclose(kldiv.evaluate_batches([t3[:5], t3[5:]], [p2[:5], p2[5:]]),
                               KLDivergence()(t3, p2), rtol=1e-6)
    np.testing.assert_allclose(kldiv.evaluate_batches([t3[:5], t3[5:]], [p2[:5], p2[5:]], reduction="none"),
                               KLDivergence(reduction="none")(t3, p2), rtol=1e-6)


@pytest.mark.parametrize("value", [np.int64(5), np.int32(5), np.uint8(5), 5])
def test_integer_like_parameters_are_accepted(files: dict[str, Any], value: Any) -> None:
    expected = KLDivergence()(files["t"], files["p"])
    np.testing.assert_allclose(kldiv.evaluate_files(files["tp"], files["pp"], batch_rows=value), expected, rtol=1e-6)
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(kldiv.evaluate_files(files["tp"], files["pp"], batch_rows=torch.tensor(5)),
                               expected, rtol=1e-6)
    got = kldiv.evaluate_batches(_batches(files["t"], 100), _batches(files["p"], 100), total_rows=value)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (True, TypeError, "not a bool"),
        (False, TypeError, "not a bool"),
        (np.bool_(True), TypeError, "not a bool"),
        (5.0, TypeError, "an integer"),
        (np.float32(5), TypeError, "an integer"),
        ("5", TypeError, "an integer"),
        (0, ValueError, "positive"),
        (-3, ValueError, "positive"),
        (np.int64(-1), ValueError, "positive"),
    ],
)
def test_bad_integer_parameters_are_refused(files: dict[str, Any], value: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=rf"batch_rows.*{match}"):
        kldiv.evaluate_files(files["tp"], files["pp"], batch_rows=value)
    if not (isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_) and value == 0):
        with pytest.raises(error, match=rf"total_rows.*{'non-negative' if match == 'positive' else match}"):
            kldiv.evaluate_batches([files["t"]], [files["p"]], total_rows=value)


# -- one return-type rule (issue 10, item 4) ------------------------------------------------------


@pytest.mark.parametrize("path", ["files", "batches", "empty_files", "no_batches"])
@pytest.mark.parametrize("reduction", [*REDUCTIONS, "metric", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_numpy_results_follow_one_rule(tmp_path: Path, path: str, reduction: str, dtype: Any) -> None:
    """A reduced result on NumPy is a NumPy scalar of the result dtype; an unreduced one an ndarray."""
    t, p, _ = _data(rows=0 if path.startswith("empty") else 10)
    t, p = t.astype(dtype), p.astype(dtype)
    kwargs: dict[str, Any] = {"metric": True} if reduction == "metric" else {"reduction": reduction}
    if path in ("files", "empty_files"):
        np.save(tmp_path / "t.npy", t)
        np.save(tmp_path / "p.npy", p)
        got = kldiv.evaluate_files(tmp_path / "t.npy", tmp_path / "p.npy", batch_rows=3, **kwargs)
    elif path == "batches":
        got = kldiv.evaluate_batches(_batches(t, 3), _batches(p, 3), **kwargs)
    else:
        got = kldiv.evaluate_batches([], [], **kwargs)
    expected_dtype = np.float32 if reduction == "metric" or path == "no_batches" else dtype
    if reduction == "none":
        assert type(got) is np.ndarray and got.dtype == expected_dtype
    else:
        assert type(got) is expected_dtype, type(got)


def test_streaming_sum_is_the_float64_sum_rounded_once() -> None:
    """What the docstring promises: the streamed "sum" is the float64 sum of the float32
    per-sample losses, rounded once to float32; the loss class sums in float32, so the two
    can differ in the last bits, and the streamed one is the closer to the exact sum."""
    rng = np.random.default_rng(7)
    t = rng.dirichlet(np.ones(8), size=20000).astype(np.float32)
    p = rng.dirichlet(np.ones(8), size=20000).astype(np.float32)
    per_sample = kldiv.kld(t, p)  # float32, as the class computes it
    exact = math.fsum(per_sample.astype(np.float64))  # the exact sum of those float32 values
    streamed = kldiv.evaluate_batches(_batches(t, 999), _batches(p, 999), reduction="sum")
    whole = KLDivergence(reduction="sum")(t, p)
    ulp = float(np.spacing(np.float32(exact)))
    assert abs(float(streamed) - exact) <= 0.5 * ulp * (1 + 1e-6)  # correctly rounded
    assert abs(float(whole) - exact) <= 8 * ulp  # float32 pairwise: a few ulps at most here
    assert abs(float(streamed) - exact) <= abs(float(whole) - exact)
    mean = kldiv.evaluate_batches(_batches(t, 999), _batches(p, 999))
    assert abs(float(mean) - exact / len(t)) <= 0.5 * float(np.spacing(np.float32(exact / len(t)))) * (1 + 1e-6)
    # weighted: float32 loss x float32 weight is exact in float64, so the same holds
    w = rng.random(len(t)).astype(np.float32)
    exact_w = math.fsum(per_sample.astype(np.float64) * w.astype(np.float64))
    streamed_w = kldiv.evaluate_batches(_batches(t, 999), _batches(p, 999), _batches(w, 999), reduction="sum")
    assert abs(float(streamed_w) - exact_w) <= 0.5 * float(np.spacing(np.float32(exact_w))) * (1 + 1e-6)


# -- TensorFlow ------------------------------------------------------------------------------------


def test_evaluate_files_on_tensorflow(files: dict[str, Any], tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    for red in ("auto", "sum", "mean_with_sample_weight", "none", "metric"):
        kwargs: dict[str, Any] = {"metric": True} if red == "metric" else {"reduction": red}
        got = kldiv.evaluate_files(files["tp"], files["pp"], sample_weight=files["wp"], backend="tensorflow",
                                   batch_rows=300, **kwargs)
        assert isinstance(got, tf.Tensor) and got.dtype == tf.float32
        if red == "metric":
            expected = (kldiv.kld(files["t"], files["p"]).astype(np.float64) * files["w"]).sum() / files["w"].sum()
        else:
            expected = KLDivergence(reduction=red)(files["t"], files["p"], sample_weight=files["w"])
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    written = kldiv.evaluate_files(files["tp"], files["pp"], reduction="none", backend="tensorflow",
                                   device="cpu", out=tmp_path / "o.npy", batch_rows=300)
    np.testing.assert_allclose(written, kldiv.kld(files["t"], files["p"]), rtol=1e-6)
    with pytest.raises(RuntimeError, match="no device"):
        kldiv.evaluate_files(files["tp"], files["pp"], backend="tensorflow", device="tpu:3")


@pytest.mark.parametrize(("backend_name", "device"), [("array_api_strict", "cuda"), ("jax", "tpu"),
                                                      ("jax", "cpu:x"), ("torch", "nonsense")])
def test_unavailable_device_is_a_runtime_error(files: dict[str, Any], backend_name: str, device: str) -> None:
    pytest.importorskip(backend_name)
    with pytest.raises(RuntimeError, match="no device"):
        kldiv.evaluate_files(files["tp"], files["pp"], backend=backend_name, device=device)


@pytest.mark.parametrize("name", ["ReverseKLDivergence", "JensenShannonDivergence"])
def test_evaluate_batches_with_a_family_metric(name: str) -> None:
    """Every divergence metric of kldiv.metrics streams (not only the KL one); a loss or an
    estimator metric is refused with both classes named."""
    t, p, w = _data()
    cls = getattr(kldiv.metrics, name)
    got = kldiv.evaluate_batches(_batches(t, 25, np.asarray), _batches(p, 25, np.asarray),
                                 _batches(w, 25, np.asarray), metric=cls())
    one = cls()
    one.update_state(t, p, w)
    np.testing.assert_allclose(got, one.result(), rtol=1e-6)
    for bad in (kldiv.losses.ReverseKLDivergence(), kldiv.metrics.KLEstimator()):
        with pytest.raises(TypeError, match=r"divergence metric of kldiv\.metrics"):
            kldiv.evaluate_batches([t], [p], metric=bad)
