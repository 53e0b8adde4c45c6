"""Backend fixtures in the array-api-extra style: one ``Backend`` enum, one member per array
library on one device, and the fixtures built on it.

- ``backend``: every test that takes it runs once per member of ``SUITE_BACKENDS`` (the CPU
  libraries always, the GPU ones where a GPU is present); it yields an ``ArrayBackend`` handle
  (``asarray``, ``to_numpy``, ``is_native``, ``dtype``, ``module``, ``device``, ``name``,
  ``differentiable``, ``float_dtypes``, ``member``, ``xp``).
- ``diff_backend``: the members with automatic differentiation (torch, JAX, their GPU ones).
- ``xp``: the array-API namespace of ``backend``'s arrays (array_api_compat's wrapper where
  the library needs one), as array-api-extra's ``xp`` fixture.

Test IDs are the members' values (``numpy``, ``torch-cuda``, ...). GPU members carry the
``gpu`` mark (``-m "not gpu"`` deselects them). A library that is not installed, or a GPU that
is not present, is a clean skip with the reason when the fixture is set up; never a failure
and never a silent pass. A test that picks its own members parametrizes over them the same way
(``[b.pytest_param() for b in Backend if ...]``) and builds a handle with ``member.handle()``
(``Backend.TORCH.handle()``, ``Backend("dask").handle()``).

Import style of the test suite: the public API through the package (``import kldiv``, then
``kldiv.kld``, ``kldiv.KLDivergence``, ``kldiv.losses.KLDivergence``); a private module as
``from kldiv import _module`` (then ``_module.name``), never ``from kldiv._module import
name``; this file's names as ``from conftest import Backend, ArrayBackend, oracle`` (never
``tests.conftest``: that imports this file a second time, as another module).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import ModuleType
from typing import Any

import numpy as np
import pytest

# TensorFlow and Triton each bundle LLVM: with TensorFlow loaded first, importing Triton (as
# torch.compile and kldiv's CUDA route do) aborts the whole process ("Option ... registered
# more than once"). Triton first is fine, so the test session imports it before any test can
# import TensorFlow, whatever the test order.
if importlib.util.find_spec("triton") is not None:
    with contextlib.suppress(Exception):
        import triton  # noqa: F401


class Backend(Enum):
    """Every array library/device the test suite runs on.

    A member's value is its test ID; ``library`` is kldiv's name of the array library (the
    ``--backend`` of the CLI), ``modname`` the module the tests use as ``module``, ``device``
    the device kind and ``differentiable`` whether the library has automatic differentiation.
    """

    NUMPY = "numpy", "numpy", "numpy", "cpu", False
    ARRAY_API_STRICT = "array_api_strict", "array_api_strict", "array_api_strict", "cpu", False
    TORCH = "torch", "torch", "torch", "cpu", True
    JAX = "jax", "jax", "jax.numpy", "cpu", True
    DASK = "dask", "dask", "dask.array", "cpu", False
    TENSORFLOW = "tensorflow", "tensorflow", "tensorflow", "cpu", False
    TORCH_CUDA = "torch-cuda", "torch", "torch", "cuda", True
    JAX_GPU = "jax-gpu", "jax", "jax.numpy", "gpu", True
    CUPY = "cupy", "cupy", "cupy", "cuda", False

    def __new__(cls, value: str, *_fields: object) -> Backend:
        obj = object.__new__(cls)
        obj._value_ = value
        return obj

    def __init__(self, _value: str, library: str, modname: str, device: str, differentiable: bool) -> None:
        self.library = library
        self.modname = modname
        self.device_kind = device
        self.differentiable = differentiable

    def __str__(self) -> str:
        """The test ID."""
        return str(self.value)

    @property
    def gpu(self) -> bool:
        return self.device_kind != "cpu"

    def like(self, other: Backend) -> bool:
        """Same array library (``TORCH_CUDA.like(TORCH)``), whatever the device."""
        return self.library == other.library

    def pytest_param(self) -> Any:
        """This member as a ``pytest.param``: its value as ID, the ``gpu`` mark on GPU members
        (their skip reason, when no GPU is present, comes from ``handle()``)."""
        return pytest.param(self, id=str(self), marks=[pytest.mark.gpu] if self.gpu else [])

    def handle(self) -> ArrayBackend:
        """The handle the ``backend`` fixture yields; a clean skip, with the reason, when the
        library is not installed or the device is not present."""
        return _BUILDERS[self.library](self)


# The ``backend`` fixture's members: TensorFlow is covered by its own test files (and the
# property tests' ``cpu_backend``), not by every backend test.
SUITE_BACKENDS = tuple(b for b in Backend if b is not Backend.TENSORFLOW)


@dataclass
class ArrayBackend:
    """One array library on one device (a ``Backend`` member, built), with converters to
    and from NumPy."""

    member: Backend
    module: Any  # the native module (numpy, torch, jax.numpy, dask.array, ...)
    device: Any
    _asarray: Callable[[np.ndarray], Any]
    _to_numpy: Callable[[Any], np.ndarray]
    _is_native: Callable[[Any], bool]
    float_dtypes: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.member)

    @property
    def differentiable(self) -> bool:
        return self.member.differentiable

    @property
    def xp(self) -> ModuleType:
        """The array-API namespace of this backend's arrays."""
        if self.member is Backend.TENSORFLOW:
            pytest.skip("tensorflow: no array API namespace (array_api_compat has none)")
        import array_api_compat as aac

        return aac.array_namespace(self.asarray(np.zeros(1, np.float32)))

    def asarray(self, x: Any, dtype: str | None = None) -> Any:
        arr = np.asarray(x)
        if dtype is not None:
            arr = arr.astype(dtype)
        elif arr.dtype == np.float64 and not isinstance(x, np.ndarray):
            arr = arr.astype(np.float32)
        return self._asarray(arr)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(self._to_numpy(x))

    def is_native(self, x: Any) -> bool:
        """True when ``x`` is an array of this backend's library on its device."""
        return self._is_native(x)

    def dtype(self, name: str) -> Any:
        return self.float_dtypes[name]

    def __repr__(self) -> str:
        return self.name


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} is not installed ({exc}); install it to run this backend's tests")


def _numpy(member: Backend) -> ArrayBackend:
    return ArrayBackend(member, np, "cpu", lambda a: a, lambda a: a,
                        lambda x: isinstance(x, (np.ndarray, np.generic)),
                        float_dtypes={"float32": np.float32, "float64": np.float64, "float16": np.float16})


def _strict(member: Backend) -> ArrayBackend:
    xps = _import(member.modname)
    return ArrayBackend(
        member, xps, xps.Device("CPU_DEVICE") if hasattr(xps, "Device") else None,
        lambda a: xps.asarray(a), lambda a: np.asarray(a),
        lambda x: type(x).__module__.startswith("array_api_strict"),
        float_dtypes={"float32": xps.float32, "float64": xps.float64},
    )


def _torch(member: Backend) -> ArrayBackend:
    torch = _import(member.modname)
    device = member.device_kind
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{member}: no CUDA GPU on this machine")
    dev = torch.device(device)
    return ArrayBackend(
        member, torch, dev,
        lambda a: torch.as_tensor(a, device=device),
        lambda a: a.detach().cpu().float().numpy() if a.dtype == torch.bfloat16 else a.detach().cpu().numpy(),
        lambda x: isinstance(x, torch.Tensor) and x.device.type == dev.type,
        float_dtypes={"float32": torch.float32, "float64": torch.float64,
                      "float16": torch.float16, "bfloat16": torch.bfloat16},
    )


def _jax(member: Backend) -> ArrayBackend:
    import array_api_compat as aac

    jax = _import(member.library)
    jax.config.update("jax_enable_x64", True)
    jnp = importlib.import_module(member.modname)
    platform = member.device_kind
    try:
        dev = jax.devices(platform)[0]
    except RuntimeError:
        pytest.skip(f"jax-{platform}: no {platform.upper()} device for JAX on this machine")
    return ArrayBackend(
        member, jnp, dev,
        lambda a: jax.device_put(jnp.asarray(a), dev), lambda a: np.asarray(a),
        lambda x: aac.is_jax_array(x) and (not hasattr(x, "devices") or dev in x.devices()),
        float_dtypes={"float32": jnp.float32, "float64": jnp.float64,
                      "float16": jnp.float16, "bfloat16": jnp.bfloat16},
    )


def _dask(member: Backend) -> ArrayBackend:
    import array_api_compat as aac

    da = _import(member.modname)
    return ArrayBackend(
        member, da, "cpu",
        lambda a: da.from_array(a, chunks=tuple(max(1, (s + 1) // 2) for s in a.shape) or ()),
        lambda a: np.asarray(a.compute()),
        aac.is_dask_array,
        float_dtypes={"float32": np.float32, "float64": np.float64},
    )


def _tensorflow(member: Backend) -> ArrayBackend:
    tf = _import(member.modname)  # after Triton: see the top of this file
    return ArrayBackend(member, tf, "cpu", lambda a: tf.constant(a), lambda a: a.numpy(),
                        lambda x: isinstance(x, tf.Tensor),
                        float_dtypes={"float32": tf.float32, "float64": tf.float64, "float16": tf.float16})


def _cupy(member: Backend) -> ArrayBackend:
    import array_api_compat as aac

    cp = _import(member.modname)
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as exc:
        pytest.skip(f"{member}: no CUDA GPU on this machine ({type(exc).__name__})")
    return ArrayBackend(member, cp, cp.cuda.Device(0), lambda a: cp.asarray(a), lambda a: cp.asnumpy(a),
                        aac.is_cupy_array,
                        float_dtypes={"float32": cp.float32, "float64": cp.float64, "float16": cp.float16})


# kldiv's library name -> the builder of its handle (one per library; the member gives the device)
_BUILDERS: dict[str, Callable[[Backend], ArrayBackend]] = {
    "numpy": _numpy, "array_api_strict": _strict, "torch": _torch, "jax": _jax,
    "dask": _dask, "tensorflow": _tensorflow, "cupy": _cupy,
}
assert set(_BUILDERS) == {b.library for b in Backend}, "every Backend library needs a builder"


@pytest.fixture(params=[b.pytest_param() for b in SUITE_BACKENDS])
def backend(request: pytest.FixtureRequest) -> ArrayBackend:
    """Every backend: CPU ones always, GPU ones where a GPU is present (else skipped)."""
    member: Backend = request.param
    return member.handle()


@pytest.fixture(params=[b.pytest_param() for b in SUITE_BACKENDS if b.differentiable])
def diff_backend(request: pytest.FixtureRequest) -> ArrayBackend:
    """Backends with automatic differentiation (torch, JAX; CUDA variants where present)."""
    member: Backend = request.param
    return member.handle()


@pytest.fixture
def torch() -> ModuleType:
    """The torch module for a test that takes it directly, or a skip with the reason (a test
    module may define its own, e.g. to reset dynamo)."""
    mod: ModuleType = pytest.importorskip("torch", reason="torch is not installed: pip install "
                                          "'kldiv[torch]'")
    return mod


@pytest.fixture
def xp(backend: ArrayBackend) -> ModuleType:
    """The array-API namespace of ``backend`` (runs once per backend, like ``backend``)."""
    return backend.xp


def oracle(y_true: Any, y_pred: Any) -> np.ndarray:
    """Float64 NumPy oracle of the kernel: the seed's formula on clipped inputs."""
    t = np.clip(np.asarray(y_true, dtype=np.float64), 1e-7, 1)
    p = np.clip(np.asarray(y_pred, dtype=np.float64), 1e-7, 1)
    return np.sum(t * np.log(t / p), axis=-1)


# ------------------------------------------------------------------ test-run reporting
# pyproject's addopts report failures and errors one per line (-rfExX) but not each skip: on
# a CPU machine more than a hundred tests skip for a few reasons (no GPU, a peer library not
# installed). The summary below gives one line per reason with its count; -rs (or -ra, e.g.
# PYTEST_ADDOPTS=-rs) lists every skipped test instead, as pytest does.


def run_tensorflow_script(tmp_path: Any, name: str, source: str, *args: str,
                          **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``source`` as the file ``tmp_path / name`` in a fresh interpreter with TensorFlow's
    logging quiet (plus ``env``): TensorFlow lives in subprocesses (imported before Triton in
    one process it aborts), and from a file, since autograph skips the code of ``-c``
    strings. Skips where TensorFlow is not installed."""
    pytest.importorskip("tensorflow")
    script = tmp_path / name
    script.write_text(source)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env))


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_summary(reports: list[pytest.TestReport]) -> list[tuple[int, str]]:
    """(count, reason) per distinct skip reason, the most frequent first."""
    counts: dict[str, int] = {}
    for report in reports:
        reason = _skip_reason(report)
        counts[reason] = counts.get(reason, 0) + 1
    return sorted(((n, reason) for reason, n in counts.items()), key=lambda item: (-item[0], item[1]))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    reportchars = getattr(config.option, "reportchars", "") or ""
    if "s" in reportchars or "a" in reportchars or "A" in reportchars:
        return  # pytest lists each skipped test itself
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if r.skipped and not hasattr(r, "wasxfail")]
    if not skipped:
        return
    lines = skip_summary(skipped)
    terminalreporter.write_sep(
        "=", f"{len(skipped)} skipped, {len(lines)} reason{'s' * (len(lines) > 1)} (-rs lists each test)"
    )
    width = len(str(lines[0][0]))
    for n, reason in lines:
        terminalreporter.write_line(f"{n:>{width}} x {reason}")
