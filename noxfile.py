"""Developer sessions: ``nox -s tests parity lint typecheck`` is what CI runs."""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "parity", "lint", "typecheck"]

CPU_CONSTRAINTS = ("-c", "ci/constraints-cpu.txt")
CPU_BACKENDS = ["torch==2.13.0", "jax", "dask[array,distributed]", "array-api-strict", "triton"]
TF = ["tensorflow-cpu", "tf-keras", "keras"]


def _pytest_args(session: nox.Session, *default: str) -> list[str]:
    return list(session.posargs) or list(default)


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite: numpy, array-api-strict, torch 2.13.0 (CPU), jax, dask, tensorflow."""
    session.install(*CPU_CONSTRAINTS, "-e", ".[test]", *CPU_BACKENDS, *TF)
    session.run(
        "python", "-m", "pytest", *_pytest_args(session, "-m", "not parity and not gpu", "tests"),
        env={"JAX_PLATFORMS": "cpu", "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")},
    )


@nox.session
def parity(session: nox.Session) -> None:
    """Parity with tf.keras (Keras 2 through tf-keras) on a few hundred random cases."""
    session.install(*CPU_CONSTRAINTS, "-e", ".[test]", "tensorflow-cpu", "tf-keras")
    session.run(
        "python", "-m", "pytest", *_pytest_args(session, "-m", "parity", "tests/test_parity.py"),
        env={"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
             "KLDIV_REQUIRE_PARITY": "1"},
    )


@nox.session
def gpu(session: nox.Session) -> None:
    """GPU suite (cupy, torch CUDA, JAX GPU): for a machine with an NVIDIA GPU."""
    session.install("-e", ".[test]", "cupy-cuda12x", "torch", "jax[cuda12]", "dask[array]",
                    "array-api-strict", "triton")
    session.run("python", "-m", "pytest", *_pytest_args(session, "-m", "not parity", "tests"))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the package, tests, benchmarks and this file."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    session.install(*CPU_CONSTRAINTS, "-e", ".", "mypy", "numpy")
    session.run("mypy", "src/kldiv")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks against the peers; writes benchmarks/RESULTS.md and a PNG plot."""
    session.install(*CPU_CONSTRAINTS, "-e", ".", *CPU_BACKENDS, *TF, "optax", "scipy",
                    "matplotlib")
    session.run("python", "benchmarks/run.py", *session.posargs,
                env={"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
