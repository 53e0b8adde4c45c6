"""``python -m kldiv compute``: values on every backend; one-line errors, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import CPU_BACKENDS
from kldiv import KLDivergence
from kldiv._cli import compute_main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    t = rng.dirichlet(np.ones(5), size=200).astype(np.float32)
    p = rng.dirichlet(np.ones(5), size=200).astype(np.float32)
    w = rng.random(200).astype(np.float32)
    out: dict[str, Any] = {"t": t, "p": p, "w": w, "dir": tmp_path}
    for k in ("t", "p", "w"):
        np.save(tmp_path / f"{k}.npy", out[k])
        out[k + "p"] = str(tmp_path / f"{k}.npy")
    seed_t = np.array([[0, 1], [0, 0]], dtype=np.float32)
    seed_p = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)
    np.save(tmp_path / "seed_t.npy", seed_t)
    np.save(tmp_path / "seed_p.npy", seed_p)
    np.save(tmp_path / "seed_w.npy", np.array([1.0, 0.0], dtype=np.float32))
    return out


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = compute_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["auto", "sum", "mean_with_sample_weight"])
def test_values_on_every_backend(files: dict[str, Any], backend: str, reduction: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip({"numpy": "numpy", "dask": "dask.array"}.get(backend, backend))
    rc, out, err = _run([files["tp"], files["pp"], "--backend", backend, "--batch-rows", "64",
                         "--reduction", reduction, "--sample-weight", files["wp"]], capsys)
    assert rc == 0, err
    expected = KLDivergence(reduction=reduction)(files["t"], files["p"], sample_weight=files["w"])
    np.testing.assert_allclose(float(out), expected, rtol=1e-6)


def test_seed_reference_numbers(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d = files["dir"]
    t, p, w = str(d / "seed_t.npy"), str(d / "seed_p.npy"), str(d / "seed_w.npy")
    assert _run([t, p], capsys)[1].strip() == "0.45814306"
    assert _run([t, p, "--metric", "--sample-weight", w, "--batch-rows", "1"], capsys)[1].strip() == "0.9162892"
    # SPEC §3: sum -> 0.9162861; scalar weight 2.0 -> 0.9162861; [.8, .2] -> 0.3665154
    assert _run([t, p, "--reduction", "sum"], capsys)[1].strip() == "0.9162861"
    assert _run([t, p, "--sample-weight", "2"], capsys)[1].strip() == "0.9162861"
    np.save(d / "w82.npy", np.array([0.8, 0.2], dtype=np.float32))
    # float64 accumulation: 0.36651537, the exact value's float32; Keras (float32 sums) 1 ulp off
    got = float(_run([t, p, "--sample-weight", str(d / "w82.npy"), "--batch-rows", "1"], capsys)[1])
    np.testing.assert_allclose(got, 0.3665154, rtol=2e-7)


def test_reduction_none_writes_output(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out_path = files["dir"] / "loss.npy"
    rc, out, err = _run([files["tp"], files["pp"], "--reduction", "none", "--output", str(out_path),
                         "--batch-rows", "33", "--sample-weight", files["wp"]], capsys)
    assert rc == 0, err
    assert "wrote 200 per-sample losses" in out and "float32" in out
    expected = KLDivergence(reduction="none")(files["t"], files["p"], sample_weight=files["w"])
    assert np.array_equal(np.load(out_path), expected)


def test_progress_flag(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    rc, out, err = _run([files["tp"], files["pp"], "--progress", "--batch-rows", "10"], capsys)
    assert rc == 0 and float(out) > 0
    assert "kldiv" in err  # the bar, on stderr; stdout holds only the value


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0 and "--reduction" in out and "--batch-rows" in out and "exit status" in out


def _bad(d: Path, kind: str) -> str:
    path = d / f"bad_{kind}.npy"
    if kind == "missing":
        return str(d / "nope.npy")
    if kind == "directory":
        return str(d)
    if kind == "text":
        path.write_text("1, 2, 3\n")
    elif kind == "strings":
        np.save(path, np.array([["a", "b"]] * 200))
    elif kind == "objects":
        np.save(path, np.array([1, None], dtype=object), allow_pickle=True)
    elif kind == "complex":
        np.save(path, np.ones((200, 5), np.complex64))
    elif kind == "zero_d":
        np.save(path, np.float32(0.5))
    elif kind == "rows":
        np.save(path, np.ones((199, 5), np.float32))
    elif kind == "classes":
        np.save(path, np.ones((200, 4), np.float32))
    elif kind == "truncated":
        np.save(path, np.ones((200, 5), np.float32))
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "npz":
        path = d / "bad.npz"
        np.savez(path, a=np.ones(3))
    return str(path)


BAD_FILES = {
    "missing": "does not exist",
    "directory": "is a directory",
    "text": "not a .npy file",
    "strings": "not numeric",
    "objects": "Python objects",
    "complex": "complex",
    "zero_d": "0-d",
    "rows": "same number of rows",
    "classes": "do not fit",
    "truncated": "cannot be read",
    "empty_file": "cannot be read",
    "npz": ".npz",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("position", ["y_true", "y_pred"])
def test_bad_files_one_line_exit_2(files: dict[str, Any], kind: str, position: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad(files["dir"], kind)
    argv = [bad, files["pp"]] if position == "y_true" else [files["tp"], bad]
    rc, out, err = _run(argv, capsys)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kldiv compute: error: ")
    assert BAD_FILES[kind] in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "match", "status"),
    [
        (["--batch-rows", "0"], "--batch-rows must be a positive integer", 2),
        (["--batch-rows", "x"], "invalid int value", 2),
        (["--reduction", "median"], "invalid choice", 2),
        (["--reduction", "none"], "needs --output", 2),
        (["--output", "o.npy"], "--output is for --reduction none", 2),
        (["--metric", "--reduction", "sum"], "not allowed with argument", 2),
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler is for --backend dask", 2),
        (["--backend", "tensorflow"], "invalid choice", 2),
        (["--backend", "numpy", "--device", "cuda"], "runs on the CPU", 2),
        (["--sample-weight", "nope.npy"], "does not exist", 2),
        (["--backend", "cupy"], "", 1),  # not installed here (or no GPU): exit 1
        (["--frobnicate"], "unrecognized arguments", 2),
    ],
)
def test_bad_options(files: dict[str, Any], extra: list[str], match: str, status: int,
                     capsys: pytest.CaptureFixture[str]) -> None:
    if extra[:2] == ["--backend", "cupy"]:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                pytest.skip("CuPy and a GPU are here")
        except Exception:
            pass
    rc, _, err = _run([files["tp"], files["pp"], *extra], capsys)
    assert rc == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], err


def test_output_must_not_overwrite_an_input(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run([files["tp"], files["pp"], "--reduction", "none", "--output", files["pp"]], capsys)
    assert rc == 2 and "overwrite an input" in err
    assert np.array_equal(np.load(files["pp"]), files["p"])
    rc, _, err = _run([files["tp"], files["pp"], "--reduction", "none", "--output",
                       str(files["dir"] / "no" / "such" / "dir.npy")], capsys)
    assert rc == 2 and "does not exist" in err


def test_missing_device_exit_1(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    rc, _, err = _run([files["tp"], files["pp"], "--backend", "torch", "--device", "cuda"], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "CUDA" in err


def test_subprocess_success_and_failure(files: dict[str, Any]) -> None:
    """The real command: value on stdout; a bad file gives one stderr line, status 2."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ok = subprocess.run([sys.executable, "-m", "kldiv", "compute", files["tp"], files["pp"],
                         "--batch-rows", "50"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    np.testing.assert_allclose(float(ok.stdout), KLDivergence()(files["t"], files["p"]), rtol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "kldiv", "compute", files["tp"], str(files["dir"] / "x.npy")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_value_matches_evaluate_files(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run([files["tp"], files["pp"], "--metric", "--batch-rows", "7"], capsys)
    assert rc == 0
    assert out.strip() == str(kldiv.evaluate_files(files["tp"], files["pp"], metric=True, batch_rows=7))
