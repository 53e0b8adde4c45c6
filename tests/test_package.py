"""Packaging: a light import, the main job, and the docstring examples."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kldiv

HEAVY = ("torch", "jax", "jaxlib", "cupy", "dask", "tensorflow", "keras", "tf_keras", "tqdm", "scipy")


def test_import_and_numpy_call_import_no_framework() -> None:
    code = (
        "import sys, numpy as np, kldiv\n"
        "kldiv.kld(np.array([[0., 1.]]), np.array([[.6, .4]]))\n"
        "kldiv.KLDivergence(reduction='sum')([[0., 1.]], [[.6, .4]], sample_weight=[2.])\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import kldiv pulled in: {out.stdout.strip()}"


def test_main_job_prints_every_backend() -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "kldiv"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in ("numpy (cpu)", "array_api_strict", "torch", "jax", "cupy", "dask"):
        assert name in text
    assert "0.11891246" in text
    assert "0.45814306" in text and "0.3665154" in text
    assert "float32 on cpu" in text
    # a missing backend says how to get it (on a fully equipped machine nothing is missing)
    import importlib.util
    missing = [m for m in ("array_api_strict", "torch", "jax", "cupy", "dask")
               if importlib.util.find_spec(m) is None]
    lines = text.splitlines()
    for m in missing:
        assert any(line.startswith(f"- {m} ") and "not available: pip install" in line
                   for line in lines), (m, text)


def test_main_help_and_unknown_command() -> None:
    from kldiv.__main__ import main

    assert main(["--help"]) == 0
    assert main(["frobnicate"]) == 2


def _modules_with_examples() -> list[str]:
    """Every kldiv module whose docstrings hold examples (found, not listed by hand)."""
    import pkgutil

    names = ["kldiv", *(m.name for m in pkgutil.walk_packages(kldiv.__path__, "kldiv."))]
    found = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec and spec.origin and ">>>" in Path(spec.origin).read_text(encoding="utf-8"):
            found.append(name)
    return found


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples(module: str) -> None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:  # a backend module whose framework is not installed
        pytest.skip(f"{module} needs {exc.name}, which is not installed")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module}: no example ran"
    assert result.failed == 0


def test_examples_are_found() -> None:
    assert {"kldiv._functional", "kldiv.losses", "kldiv.metrics", "kldiv._files"} <= set(
        _modules_with_examples()
    )


def test_version() -> None:
    assert isinstance(kldiv.__version__, str)


ROOT = Path(__file__).resolve().parents[1]


def _pytest_in(tmp_path: Path, test_code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run pytest on one test file with this project's configuration and conftest."""
    (tmp_path / "test_it.py").write_text(textwrap.dedent(test_code))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(ROOT),
         "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path / "test_it.py"), *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )


SKIPPING_TESTS = """
    import pytest

    @pytest.mark.parametrize("i", range(3))
    def test_no_gpu(i):
        pytest.skip("torch-cuda: no CUDA GPU on this machine")

    @pytest.mark.parametrize("i", range(2))
    def test_no_peer(i):
        pytest.importorskip("kldiv_no_such_module_here")

    def test_runs():
        pass
"""


def test_skips_are_summarised_one_line_per_reason(tmp_path: Path) -> None:
    out = _pytest_in(tmp_path, SKIPPING_TESTS)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "SKIPPED [" not in text, text  # no line per skipped test ...
    assert "5 skipped, 2 reasons" in text, text  # ... but one per reason, with its count
    assert "3 x torch-cuda: no CUDA GPU on this machine" in text, text
    assert re.search(r"2 x could not import 'kldiv_no_such_module_here'", text), text


def test_skip_details_on_request(tmp_path: Path) -> None:
    out = _pytest_in(tmp_path, SKIPPING_TESTS, "-rs")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SKIPPED [3]" in out.stdout and "SKIPPED [2]" in out.stdout, out.stdout
    assert "2 reasons" not in out.stdout


def test_torch_jit_deprecation_is_filtered_only_in_torch(tmp_path: Path) -> None:
    """torch.compile imports torch/utils/mkldnn.py, whose ``@torch.jit.script_method`` warns
    14 times (torch 2.13): pyproject filters that warning there, and only there."""
    pytest.importorskip("torch")
    out = _pytest_in(tmp_path, """
        import sys, warnings

        def test_torch_own_code():
            sys.modules.pop("torch.utils.mkldnn", None)
            import torch.utils.mkldnn  # noqa: F401

        def test_same_message_elsewhere_still_warns():
            warnings.warn("`torch.jit.script_method` is deprecated.", DeprecationWarning)
    """)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "torch/jit/_script.py" not in text, text
    assert "1 warning" in text and "test_it.py" in text.split("warnings summary")[1], text
