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
from conftest import SUITE_BACKENDS, Backend
from kldiv import KLDivergence, _cli

# the libraries of the CLI's --backend checked on every backend (TensorFlow: its own tests)
CPU_MEMBERS = [b for b in SUITE_BACKENDS if not b.gpu]


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
    rc = _cli.compute_main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("member", [b.pytest_param() for b in CPU_MEMBERS])
@pytest.mark.parametrize("reduction", ["auto", "sum", "mean_with_sample_weight"])
def test_values_on_every_backend(files: dict[str, Any], member: Backend, reduction: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(member.modname)
    backend = member.library
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
    elif kind == "zero_d":  # 0-d broadcasts, as in the loss class; two 0-d inputs have no class axis
        np.save(path, np.float32(0.5))
        np.save(d / "zero_d_other.npy", np.float32(0.25))
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
    "zero_d": "class axis",
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
    good = {"y_true": files["tp"], "y_pred": files["pp"]}
    if kind == "zero_d":
        good = dict.fromkeys(good, str(files["dir"] / "zero_d_other.npy"))
    argv = [bad, good["y_pred"]] if position == "y_true" else [good["y_true"], bad]
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
        (["--backend", "mxnet"], "invalid choice", 2),
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


def test_zero_d_file_broadcasts_as_in_the_loss_class(files: dict[str, Any],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    np.save(files["dir"] / "half.npy", np.float32(0.5))
    rc, out, err = _run([str(files["dir"] / "half.npy"), files["pp"]], capsys)
    assert rc == 0, err
    np.testing.assert_allclose(float(out), KLDivergence()(np.float32(0.5), files["p"]), rtol=1e-6)


# -- exit status: 2 for bad files or arguments, 1 for a missing backend or device (issue 9, item 12) --


def test_output_directory_exits_2(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run([files["tp"], files["pp"], "--reduction", "none", "--output", str(files["dir"])], capsys)
    assert rc == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and "is a directory" in err


@pytest.mark.parametrize(("backend", "device"), [("array_api_strict", "cuda"), ("array_api_strict", "gpu:1"),
                                                 ("torch", "nonsense"), ("jax", "tpu")])
def test_unavailable_device_exits_1(files: dict[str, Any], backend: str, device: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip(backend)
    rc, out, err = _run([files["tp"], files["pp"], "--backend", backend, "--device", device], capsys)
    assert rc == 1, err
    assert out == "" and len(err.strip().splitlines()) == 1 and "no device" in err and device in err


@pytest.mark.parametrize("mode", [[], ["--metric"], ["--reduction", "none", "--output", "OUT"]])
def test_meta_device_is_a_usage_error(files: dict[str, Any], mode: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``--backend torch --device meta`` exited 1 with torch's own "Cannot copy out of meta
    tensor; no data!": the device exists but holds shapes only, so the files' values cannot
    be computed there. A usage error (exit 2), one line naming the device; nothing written."""
    pytest.importorskip("torch")
    out_path = files["dir"] / "o.npy"
    mode = [str(out_path) if m == "OUT" else m for m in mode]
    rc, out, err = _run([files["tp"], files["pp"], "--backend", "torch", "--device", "meta", *mode], capsys)
    assert rc == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "'meta'" in err and "no values" in err and "Cannot copy" not in err
    assert not out_path.exists() and not [p for p in files["dir"].iterdir() if p.name.startswith("o")]


def test_big_endian_and_float16_files(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d = files["dir"]
    np.save(d / "tb.npy", files["t"].astype(">f4"))
    np.save(d / "pb.npy", files["p"].astype(">f4"))
    np.save(d / "th.npy", files["t"].astype(np.float16))
    np.save(d / "ph.npy", files["p"].astype(np.float16))
    for member in CPU_MEMBERS:
        pytest.importorskip(member.modname)
        backend = member.library
        rc, out, err = _run([str(d / "tb.npy"), str(d / "pb.npy"), "--backend", backend, "--batch-rows", "50"], capsys)
        assert rc == 0, (backend, err)
        np.testing.assert_allclose(float(out), KLDivergence()(files["t"], files["p"]), rtol=1e-6)
        rc, out, err = _run([str(d / "th.npy"), str(d / "ph.npy"), "--backend", backend], capsys)
        assert rc == 0, (backend, err)
        np.testing.assert_allclose(float(out), KLDivergence()(files["t"], files["p"]), rtol=2e-3)


def test_tensorflow_backend(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tensorflow")
    for reduction in ("auto", "sum"):
        rc, out, err = _run([files["tp"], files["pp"], "--backend", "tensorflow", "--reduction", reduction,
                             "--sample-weight", files["wp"], "--batch-rows", "64"], capsys)
        assert rc == 0, err
        expected = KLDivergence(reduction=reduction)(files["t"], files["p"], sample_weight=files["w"])
        np.testing.assert_allclose(float(out), expected, rtol=1e-6)


def test_tensorflow_missing_exits_1(files: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    if "tensorflow" in sys.modules:
        monkeypatch.delitem(sys.modules, "tensorflow")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # "import tensorflow" raises ImportError
    rc, out, err = _run([files["tp"], files["pp"], "--backend", "tensorflow"], capsys)
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "pip install tensorflow" in err


# -- the top-level command: help, version, TensorFlow (issue 10, item 5) ------------------------------


def _main(argv: list[str], argv0: str, monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from kldiv.__main__ import main

    monkeypatch.setattr(sys, "argv", [argv0, *argv])
    rc = main()
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize(("argv0", "prog"), [("/usr/local/bin/kldiv", "kldiv"),
                                             (str(Path(kldiv.__file__).parent / "__main__.py"), "python -m kldiv")])
def test_help_names_the_command_as_invoked(argv0: str, prog: str, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _main(["--help"], argv0, monkeypatch, capsys)
    assert rc == 0
    assert out.startswith(f"usage: {prog} ")
    assert "``" not in out and ":func:" not in out  # no RST markup
    other = "python -m kldiv" if prog == "kldiv" else "kldiv "
    assert other not in out.replace(prog, "")  # the other spelling never shows
    for word in ("show", "compute", "--version", "tensorflow"):
        assert word in out.lower()
    rc, out, _ = _main(["compute", "--help"], argv0, monkeypatch, capsys)
    assert rc == 0 and out.startswith(f"usage: {prog} compute ")
    assert f"{prog} compute y_true.npy y_pred.npy" in out  # the examples use the same name
    assert "``" not in out
    rc, _, err = _main(["compute", "x.npy"], argv0, monkeypatch, capsys)
    assert rc == 2 and f"see '{prog} compute --help'" in err


def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _main(["--version"], "/usr/bin/kldiv", monkeypatch, capsys)
    assert rc == 0 and out.strip() == f"kldiv {kldiv.__version__}"


def test_unknown_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _main(["frobnicate"], "/usr/bin/kldiv", monkeypatch, capsys)
    assert rc == 2 and out == ""
    assert "frobnicate" in err and "kldiv --help" in err


def test_console_script_help() -> None:
    """The installed ``kldiv`` script (where pip made one) says ``kldiv``, not ``python -m kldiv``."""
    script = Path(sys.executable).parent / "kldiv"
    if not script.exists():
        pytest.skip("no kldiv console script beside this interpreter (package not pip-installed)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: kldiv ")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"kldiv {kldiv.__version__}"


def test_main_job_has_tensorflow() -> None:
    """With TensorFlow installed, the main job shows the seed examples on it too."""
    pytest.importorskip("tensorflow")
    import io

    from kldiv.__main__ import show

    buf = io.StringIO()
    assert show(buf) == 0, buf.getvalue()
    text = buf.getvalue()
    section = text[text.index("- tensorflow ("):]
    assert "0.11891246" in section and "0.45814306" in section and "0.3665154" in section
    assert "float32 on" in section and "CPU:0" in section


def test_main_job_without_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TensorFlow the main job still works and says how to install it."""
    import io

    from kldiv import __main__ as main_module

    real = main_module._installed
    monkeypatch.setattr(main_module, "_installed", lambda name: name != "tensorflow" and real(name))
    buf = io.StringIO()
    assert main_module.show(buf) == 0, buf.getvalue()
    lines = buf.getvalue().splitlines()
    assert any(line.startswith("- tensorflow ") and "not available: pip install tensorflow" in line
               for line in lines), buf.getvalue()


def test_reduction_choices_are_what_streaming_supports() -> None:
    """'batchmean' is a loss-class reduction that streaming refuses: the CLI does not offer it."""
    out = _cli._parser().format_help()
    assert "sum_over_batch_size" in out and "batchmean" not in out
