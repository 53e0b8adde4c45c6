"""Packaging: a light import, the main job, and the docstring examples."""

from __future__ import annotations

import doctest
import importlib
import os
import subprocess
import sys

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


@pytest.mark.parametrize(
    "module", ["kldiv._functional", "kldiv.losses", "kldiv._reduction", "kldiv.backends", "kldiv.metrics"]
)
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_version() -> None:
    assert isinstance(kldiv.__version__, str)
