"""Output files of ``evaluate_files`` / ``evaluate_batches`` / ``kldiv compute``: never a lost file.

The per-sample losses go to a temporary file beside the target, renamed into place only on
success. So: an output that is (or links to) an input is refused before anything is written;
a run that fails part way (an exception, a ``KeyboardInterrupt``) leaves a file that already
stood at the output path untouched; no temporary file and no open handle is left behind.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kldiv
from kldiv import KLDivergence, _cli, _npy_writer, _npyio

PRECIOUS = b"an earlier result, which must survive a failed run"


def _data(rows: int = 20, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.dirichlet(np.ones(classes), size=rows).astype(np.float32)
    p = rng.dirichlet(np.ones(classes), size=rows).astype(np.float32)
    w = rng.random(rows).astype(np.float32)
    return t, p, w


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Any]:
    t, p, w = _data()
    out: dict[str, Any] = {"dir": tmp_path, "t": t, "p": p, "w": w}
    for k in ("t", "p", "w"):
        np.save(tmp_path / f"{k}.npy", out[k])
        out[k + "p"] = tmp_path / f"{k}.npy"
        out[k + "bytes"] = (tmp_path / f"{k}.npy").read_bytes()
    return out


def _open_paths(directory: Path) -> list[str]:
    """Files under ``directory`` this process holds open (file descriptors and mappings)."""
    try:
        import psutil
    except ImportError:  # Linux without psutil: read /proc directly
        if not os.path.isdir("/proc/self/fd"):
            pytest.skip("needs psutil or /proc to list open files")
        paths = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue
    else:
        paths = [f.path for f in psutil.Process().open_files()]
    root = os.path.realpath(directory)
    return [p for p in paths if p.startswith(root + os.sep)]


def _leftovers(directory: Path, expected: set[str]) -> set[str]:
    """Names in ``directory`` other than ``expected`` (temporary files left behind)."""
    return {p.name for p in directory.iterdir()} - expected


def _assert_clean(files: dict[str, Any], extra: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    d = files["dir"]
    assert _leftovers(d, {"t.npy", "p.npy", "w.npy", *extra}) == set()
    assert _open_paths(d) == []
    for k in ("t", "p", "w"):  # every input byte for byte as it was
        assert (d / f"{k}.npy").read_bytes() == files[k + "bytes"]


# -- an output that is an input --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["y_true", "y_pred", "sample_weight"])
@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "relative"])
def test_output_that_is_an_input_is_refused(files: dict[str, Any], which: str, link: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    d = files["dir"]
    target = {"y_true": files["tp"], "y_pred": files["pp"], "sample_weight": files["wp"]}[which]
    extra: set[str] = set()
    if link == "same":
        out: Any = target
    elif link == "relative":  # the same file, spelled another way
        monkeypatch.chdir(d)
        out = os.path.join(".", "sub", "..", target.name)
        (d / "sub").mkdir()
        extra = {"sub"}
    elif link == "symlink":
        out = d / "link.npy"
        os.symlink(target, out)
        extra = {"link.npy"}
    else:
        out = d / "hard.npy"
        os.link(target, out)
        extra = {"hard.npy"}
    with pytest.raises(ValueError, match=rf"same file as {which}.*overwrite an input"):
        kldiv.evaluate_files(files["tp"], files["pp"], sample_weight=files["wp"], reduction="none",
                             out=out, batch_rows=3)
    _assert_clean(files, extra)
    if link == "symlink":
        assert os.path.islink(out) and os.path.samefile(out, target)


def test_output_that_is_a_memory_mapped_input_is_refused(files: dict[str, Any]) -> None:
    mm = np.load(files["pp"], mmap_mode="r")
    with pytest.raises(ValueError, match=r"same file as y_pred.*overwrite an input"):
        kldiv.evaluate_files(files["t"], mm, reduction="none", out=files["pp"])
    batches = [mm[:10], mm[10:]]
    with pytest.raises(ValueError, match=r"same file as a y_pred batch.*overwrite an input"):
        kldiv.evaluate_batches([files["t"][:10], files["t"][10:]], batches, reduction="none",
                               out=files["pp"])
    del mm, batches
    _assert_clean(files)


def test_cli_output_that_is_an_input_exits_2(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d = files["dir"]
    os.symlink(files["tp"], d / "link.npy")
    for out in (files["pp"], d / "link.npy"):
        rc = _cli.compute_main([str(files["tp"]), str(files["pp"]), "--reduction", "none", "--output", str(out)])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "overwrite an input" in err and len(err.strip().splitlines()) == 1
    _assert_clean(files, {"link.npy"})


# -- a failed run keeps the file that was there ----------------------------------------------------


def _failing(batches: list[np.ndarray], exc: BaseException, after: int = 1) -> Iterator[np.ndarray]:
    for i, b in enumerate(batches):
        if i == after:
            raise exc
        yield b


@pytest.mark.parametrize("failure", ["exception", "keyboard_interrupt", "bad_batch", "mismatch"])
def test_failed_evaluate_batches_keeps_the_existing_output(files: dict[str, Any], failure: str) -> None:
    out = files["dir"] / "loss.npy"
    out.write_bytes(PRECIOUS)
    t, p = files["t"], files["p"]
    tb = [t[:10], t[10:]]
    pb: Any = [p[:10], p[10:]]
    expected: type[BaseException] = ValueError
    if failure == "exception":
        pb, expected = _failing(pb, RuntimeError("disk gone")), RuntimeError
    elif failure == "keyboard_interrupt":
        pb, expected = _failing(pb, KeyboardInterrupt()), KeyboardInterrupt
    elif failure == "bad_batch":  # the second batch has another number of classes
        pb = [p[:10], np.ones((10, 3), np.float32)]
    else:  # the iterables differ in length
        pb = [p[:10]]
    with pytest.raises(expected):
        kldiv.evaluate_batches(tb, pb, reduction="none", out=out)
    assert out.read_bytes() == PRECIOUS
    _assert_clean(files, {"loss.npy"})


@pytest.mark.parametrize("failure", [RuntimeError("read error"), KeyboardInterrupt()])
def test_failed_evaluate_files_keeps_the_existing_output(files: dict[str, Any], failure: BaseException,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = files["dir"] / "loss.npy"
    out.write_bytes(PRECIOUS)
    real_rows = _npyio.Source.rows  # the reader of .npy windows
    calls = []

    def rows(self: Any, start: int, stop: int) -> np.ndarray:
        calls.append(start)
        if len(calls) == 4:  # part way: after some batches were written
            raise failure
        return real_rows(self, start, stop)

    monkeypatch.setattr(_npyio.Source, "rows", rows)
    with pytest.raises(type(failure)):
        kldiv.evaluate_files(files["tp"], files["pp"], reduction="none", out=out, batch_rows=3)
    assert len(calls) == 4
    assert out.read_bytes() == PRECIOUS
    _assert_clean(files, {"loss.npy"})


def test_failed_dask_run_keeps_the_existing_output(files: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("dask.array")
    out = files["dir"] / "loss.npy"
    out.write_bytes(PRECIOUS)
    real_rows = _npyio.Source.rows  # the reader of .npy windows
    calls = []

    def rows(self: Any, start: int, stop: int) -> np.ndarray:
        calls.append(start)
        if start >= 9:
            raise RuntimeError("worker lost")
        return real_rows(self, start, stop)

    monkeypatch.setattr(_npyio.Source, "rows", rows)
    with pytest.raises(RuntimeError, match="worker lost"):
        kldiv.evaluate_files(files["tp"], files["pp"], reduction="none", out=out, batch_rows=3,
                             backend="dask")
    assert calls
    assert out.read_bytes() == PRECIOUS
    _assert_clean(files, {"loss.npy"})


def test_cli_interrupted_run_keeps_the_existing_output(files: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = files["dir"] / "loss.npy"
    out.write_bytes(PRECIOUS)
    real_rows = _npyio.Source.rows  # the reader of .npy windows
    calls = []

    def rows(self: Any, start: int, stop: int) -> np.ndarray:
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_rows(self, start, stop)

    monkeypatch.setattr(_npyio.Source, "rows", rows)
    rc = _cli.compute_main([str(files["tp"]), str(files["pp"]), "--reduction", "none", "--output", str(out),
                       "--batch-rows", "4"])
    assert rc == 130
    assert "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == PRECIOUS
    _assert_clean(files, {"loss.npy"})


def test_failing_progress_bar_leaves_nothing(files: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """An error raised before the first batch (here: no progress-bar library) writes nothing."""
    for mod in ("tqdm", "tqdm.auto", "rich", "rich.progress", "rich.console"):
        monkeypatch.setitem(sys.modules, mod, None)
    out = files["dir"] / "loss.npy"
    out.write_bytes(PRECIOUS)
    with pytest.raises(ImportError, match="progress"):
        kldiv.evaluate_files(files["tp"], files["pp"], reduction="none", out=out, progress=True)
    assert out.read_bytes() == PRECIOUS
    _assert_clean(files, {"loss.npy"})


# -- success: replaced in place, atomically --------------------------------------------------------


def test_success_replaces_the_existing_output(files: dict[str, Any]) -> None:
    out = files["dir"] / "loss.npy"
    out.write_bytes(PRECIOUS)
    os.chmod(out, 0o640)
    got = kldiv.evaluate_files(files["tp"], files["pp"], sample_weight=files["wp"], reduction="none",
                               out=out, batch_rows=7)
    expected = KLDivergence(reduction="none")(files["t"], files["p"], sample_weight=files["w"])
    assert isinstance(got, np.memmap) and not got.flags.writeable
    assert np.array_equal(got, expected)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640  # the old file's permissions
    del got
    assert np.array_equal(np.load(out), expected)
    _assert_clean(files, {"loss.npy"})


def test_new_output_gets_the_usual_permissions(files: dict[str, Any]) -> None:
    out = files["dir"] / "new.npy"
    kldiv.evaluate_batches([files["t"]], [files["p"]], reduction="none", out=out)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~umask  # not mkstemp's 0o600
    _assert_clean(files, {"new.npy"})


def test_output_through_a_symlink_writes_the_linked_file(files: dict[str, Any]) -> None:
    """A link to a file that is not an input: the file it names gets the result."""
    d = files["dir"]
    (d / "real.npy").write_bytes(PRECIOUS)
    os.symlink(d / "real.npy", d / "link.npy")
    kldiv.evaluate_batches([files["t"]], [files["p"]], reduction="none", out=d / "link.npy")
    assert os.path.islink(d / "link.npy")
    assert np.array_equal(np.load(d / "real.npy"), kldiv.kld(files["t"], files["p"]))
    _assert_clean(files, {"real.npy", "link.npy"})


def test_header_overflow(files: dict[str, Any]) -> None:
    """A per-sample loss of many axes: the header is NumPy's own (was a fixed 128 bytes)."""
    shape = (6, *([1] * 40), 3)
    rng = np.random.default_rng(1)
    t = rng.random(shape).astype(np.float32)
    p = rng.random(shape).astype(np.float32)
    out = files["dir"] / "deep.npy"
    out.write_bytes(PRECIOUS)
    got = kldiv.evaluate_batches([t[:4], t[4:]], [p[:4], p[4:]], reduction="none", out=out)
    assert got.shape == shape[:-1]
    assert np.array_equal(got, kldiv.kld(t, p))
    del got
    assert np.array_equal(np.load(out), kldiv.kld(t, p))
    _assert_clean(files, {"deep.npy"})


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_written_file_is_a_standard_npy(files: dict[str, Any], rows: int) -> None:
    """Readable by NumPy's own reader (header, alignment), for empty and short outputs too."""
    t, p = files["t"][:rows], files["p"][:rows]
    out = files["dir"] / "o.npy"
    kldiv.evaluate_batches([t[:2], t[2:]], [p[:2], p[2:]], reduction="none", out=out)
    with open(out, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        assert f.tell() % 64 == 0  # the data is aligned, as NumPy writes it
    assert (shape, fortran, dtype) == ((rows,), False, np.dtype(np.float32))
    assert np.array_equal(np.load(out), kldiv.kld(t, p).reshape(rows))
    _assert_clean(files, {"o.npy"})


# -- bad output paths: refused before anything is read or written ---------------------------------


def test_output_that_is_a_directory_is_refused(files: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    d = files["dir"]
    (d / "adir").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        kldiv.evaluate_files(files["tp"], files["pp"], reduction="none", out=d / "adir")
    with pytest.raises(ValueError, match="is a directory"):
        kldiv.evaluate_batches([files["t"]], [files["p"]], reduction="none", out=d / "adir")
    rc = _cli.compute_main([str(files["tp"]), str(files["pp"]), "--reduction", "none", "--output", str(d / "adir")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a directory" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="does not exist"):
        kldiv.evaluate_batches([files["t"]], [files["p"]], reduction="none", out=d / "no" / "x.npy")
    assert list((d / "adir").iterdir()) == []
    _assert_clean(files, {"adir"})


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_output_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """A FIFO (or a device such as /dev/null) is never opened, replaced or removed.

    Run in a subprocess with a timeout: opening a FIFO for writing would block forever.
    """
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    code = textwrap.dedent(
        f"""
        import numpy as np, kldiv
        try:
            kldiv.evaluate_batches([np.ones((2, 3))], [np.ones((2, 3))], reduction="none", out={str(fifo)!r})
        except ValueError as exc:
            print("refused:", exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "not a regular file" in proc.stdout
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert {p.name for p in tmp_path.iterdir()} == {"fifo.npy"}


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_output_in_a_read_only_directory_is_refused(files: dict[str, Any]) -> None:
    ro = files["dir"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write"):
            kldiv.evaluate_files(files["tp"], files["pp"], reduction="none", out=ro / "x.npy")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_header_without_room_for_growth(files: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A NumPy whose headers keep no spare room: when the final shape needs a longer header,
    the data is copied behind it (still in a temporary file, still renamed only at the end)."""
    import importlib
    import importlib.util

    impl = next((m for m in (importlib.import_module(n) for n in ("numpy.lib._format_impl", "numpy.lib.format")
                             if importlib.util.find_spec(n)) if hasattr(m, "GROWTH_AXIS_MAX_DIGITS")), None)
    if impl is None:
        pytest.skip("this NumPy's headers have no growth padding")
    monkeypatch.setattr(impl, "GROWTH_AXIS_MAX_DIGITS", 0)
    _header = _npy_writer._header

    rows = 1000  # '(0, 1, ...)' grows by 3 characters to '(1000, 1, ...)'
    k = next(k for k in range(1, 60)
             if len(_header(np.dtype(np.float32), (0, *[1] * k))) != len(_header(np.dtype(np.float32), (rows, *[1] * k))))
    shape = (rows, *[1] * k, 2)
    t = np.random.default_rng(2).random(shape).astype(np.float32)
    out = files["dir"] / "grown.npy"
    out.write_bytes(PRECIOUS)
    got = kldiv.evaluate_batches([t[:400], t[400:]], [t[::-1][:400], t[::-1][400:]], reduction="none", out=out)
    assert np.array_equal(got, kldiv.kld(t, t[::-1]))
    del got
    _assert_clean(files, {"grown.npy"})
