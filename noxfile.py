"""Developer sessions. CI (``.ci/run``) runs ``nox -s tests peers docs lint typecheck``.

- ``tests``: the light core suite (NumPy, array-api-strict, torch CPU, JAX, Dask) and the
  README's code blocks. Tests that need TensorFlow, tf-keras, Keras 3 or Triton skip there,
  one line per reason.
- ``peers``: the same suite again with those heavy optional peers installed, so their tests
  (TensorFlow tensors, Keras training, tf.keras, Triton kernels, the README's Keras blocks)
  run too; then the tf.keras parity suite in the same virtualenv.
- ``parity``: the parity suite alone (kldiv against tf.keras on a few hundred random cases),
  in a virtualenv of its own.
- ``docs``: the docstring examples as doctests, then the documentation site, warnings as
  errors.
- ``lint``, ``typecheck``: ruff and mypy.
- ``gpu`` (a machine with an NVIDIA GPU), ``bench``: not run by CI.

The disk and install time of each session's virtualenv are in the README ("Run the tests").
"""

from __future__ import annotations

import os
import socket
import urllib.parse

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "peers", "docs", "lint", "typecheck"]

# ci/constraints-cpu.txt pins torch==2.13.0: this project's machines hold its CPU wheel on disk
# and reach no index but PyPI.
CPU_CONSTRAINTS = ("-c", "ci/constraints-cpu.txt")
CORE = ".[test,torch,jax,dask]"  # + array-api-strict, pytest, hypothesis, tqdm from [test]
PEERS = ["tensorflow-cpu", "tf-keras", "keras", "triton"]
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYTEST_ENV = {"JAX_PLATFORMS": "cpu", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")}
PARITY_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
              "KLDIV_REQUIRE_PARITY": "1"}


def _torch_cpu_index(session: nox.Session) -> list[str]:
    """pip options for torch's CPU build (PyPI's Linux torch is a multi-GB CUDA build).

    PyTorch's CPU index is added when its host resolves; on a network that reaches PyPI only
    (this project's CI) pip takes torch from its configured sources. ``KLDIV_TORCH_INDEX``
    names another index, or ``KLDIV_TORCH_INDEX=`` (empty) turns this off.
    """
    url = os.environ.get("KLDIV_TORCH_INDEX", TORCH_CPU_INDEX)
    if not url:
        return []
    try:
        socket.getaddrinfo(urllib.parse.urlsplit(url).hostname, 443)
    except (OSError, UnicodeError):
        session.log(f"torch: {url} cannot be reached; pip's own sources and the constraints")
        return []
    session.log(f"torch: CPU wheels from {url}")
    return ["--extra-index-url", url]


def _install_core(session: nox.Session, *more: str) -> None:
    session.install(*CPU_CONSTRAINTS, *_torch_cpu_index(session), "-e", CORE, *more)


def _pytest_args(session: nox.Session, *default: str) -> list[str]:
    return list(session.posargs) or list(default)


@nox.session
def tests(session: nox.Session) -> None:
    """Light core suite: numpy, array-api-strict, torch (CPU), jax, dask; README blocks."""
    _install_core(session)
    session.run(
        "python", "-m", "pytest", *_pytest_args(session, "-m", "not parity and not gpu", "tests"),
        env=PYTEST_ENV,
    )


@nox.session
def peers(session: nox.Session) -> None:
    """The suite with TensorFlow, tf-keras, Keras 3 and Triton too (what ``tests`` skips),
    then the tf.keras parity suite. Positional arguments replace the first run's."""
    _install_core(session, *PEERS)
    session.run(
        "python", "-m", "pytest", *_pytest_args(session, "-m", "not parity and not gpu", "tests"),
        env=PYTEST_ENV,
    )
    if not session.posargs:
        session.run("python", "-m", "pytest", "-m", "parity", "tests/test_parity.py", env=PARITY_ENV)


@nox.session
def parity(session: nox.Session) -> None:
    """Parity with tf.keras (Keras 2 through tf-keras) on a few hundred random cases."""
    session.install(*CPU_CONSTRAINTS, "-e", ".[test]", "tensorflow-cpu", "tf-keras")
    session.run(
        "python", "-m", "pytest", *_pytest_args(session, "-m", "parity", "tests/test_parity.py"),
        env=PARITY_ENV,
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Docstring examples as doctests, then the site (docs/_build/html), warnings as errors."""
    session.install(*CPU_CONSTRAINTS, "-e", ".[docs]", "pytest")
    # Backend modules import their framework at the top, which this light virtualenv lacks;
    # they hold no examples (kldiv's examples need NumPy only). A module kldiv itself imports
    # that fails to import breaks the site's API pages below (autodoc), and the test suite.
    session.run("python", "-m", "pytest", "--doctest-modules", "--doctest-ignore-import-errors",
                "-p", "no:cacheprovider", "src/kldiv")
    session.run("sphinx-build", "-W", "--keep-going", "-n", "-q", "-b", "html",
                "docs", "docs/_build/html", *session.posargs)
    session.run("python", "docs/check_api.py", "docs/_build/html")  # every public name is there


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU suite (cupy, torch CUDA, JAX GPU) and the README's GPU blocks: needs an NVIDIA GPU."""
    session.install("-e", ".[test,dask]", "cupy-cuda12x", "torch", "jax[cuda12]", "dask-cuda",
                    "array-api-strict", "triton")
    session.run("python", "-m", "pytest", *_pytest_args(session, "-m", "not parity", "tests"),
                # JAX preallocates 75% of the GPU per process, starving torch, CuPy and other
                # test processes (pytest -n) beside it: on an H200 with 12 workers 611 GPU tests
                # failed; with this set, the same selection passed (benchmarks/GPU.md)
                env={"KLDIV_README_GPU": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, benchmarks, docs and this file."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "docs", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    session.install(*CPU_CONSTRAINTS, "-e", ".", "mypy", "numpy")
    session.run("mypy", "src/kldiv")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers; writes benchmarks/RESULTS.md and a PNG plot."""
    _install_core(session, *PEERS, "optax", "scipy", "matplotlib")
    session.run("python", "benchmarks/run.py", *session.posargs,
                env={"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
