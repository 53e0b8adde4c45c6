"""Backend fixtures: every test that takes ``backend`` runs once per array library/device.

A backend that is not installed, or a GPU that is not present, is a clean skip with the
reason; never a failure and never a silent pass.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
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


@dataclass
class Backend:
    """One array library on one device, with converters to and from NumPy."""

    name: str
    module: Any  # the native module (numpy, torch, jax.numpy, dask.array, ...)
    device: Any
    _asarray: Callable[[np.ndarray], Any]
    _to_numpy: Callable[[Any], np.ndarray]
    differentiable: bool = False
    float_dtypes: dict[str, Any] = field(default_factory=dict)

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
        return _is_native(self, x)

    def dtype(self, name: str) -> Any:
        return self.float_dtypes[name]

    def __repr__(self) -> str:
        return self.name


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} is not installed ({exc}); install it to run this backend's tests")


def _numpy() -> Backend:
    return Backend("numpy", np, "cpu", lambda a: a, lambda a: a,
                   float_dtypes={"float32": np.float32, "float64": np.float64, "float16": np.float16})


def _strict() -> Backend:
    xps = _import("array_api_strict")
    return Backend(
        "array_api_strict", xps, xps.Device("CPU_DEVICE") if hasattr(xps, "Device") else None,
        lambda a: xps.asarray(a), lambda a: np.asarray(a),
        float_dtypes={"float32": xps.float32, "float64": xps.float64},
    )


def _torch(device: str) -> Backend:
    torch = _import("torch")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch-cuda: no CUDA GPU on this machine")
    return Backend(
        f"torch-{device}" if device != "cpu" else "torch", torch, torch.device(device),
        lambda a: torch.as_tensor(a, device=device),
        lambda a: a.detach().cpu().float().numpy() if a.dtype == torch.bfloat16 else a.detach().cpu().numpy(),
        differentiable=True,
        float_dtypes={"float32": torch.float32, "float64": torch.float64,
                      "float16": torch.float16, "bfloat16": torch.bfloat16},
    )


def _jax(platform: str) -> Backend:
    jax = _import("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = importlib.import_module("jax.numpy")
    try:
        dev = jax.devices(platform)[0]
    except RuntimeError:
        pytest.skip(f"jax-{platform}: no {platform.upper()} device for JAX on this machine")
    return Backend(
        "jax" if platform == "cpu" else f"jax-{platform}", jnp, dev,
        lambda a: jax.device_put(jnp.asarray(a), dev), lambda a: np.asarray(a),
        differentiable=True,
        float_dtypes={"float32": jnp.float32, "float64": jnp.float64,
                      "float16": jnp.float16, "bfloat16": jnp.bfloat16},
    )


def _dask() -> Backend:
    da = _import("dask.array")
    return Backend(
        "dask", da, "cpu", lambda a: da.from_array(a, chunks=tuple(max(1, (s + 1) // 2) for s in a.shape) or ()),
        lambda a: np.asarray(a.compute()),
        float_dtypes={"float32": np.float32, "float64": np.float64},
    )


def _cupy() -> Backend:
    cp = _import("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as exc:
        pytest.skip(f"cupy: no CUDA GPU on this machine ({type(exc).__name__})")
    return Backend("cupy", cp, cp.cuda.Device(0), lambda a: cp.asarray(a), lambda a: cp.asnumpy(a),
                   float_dtypes={"float32": cp.float32, "float64": cp.float64, "float16": cp.float16})


BACKEND_FACTORIES: dict[str, Callable[[], Backend]] = {
    "numpy": _numpy,
    "array_api_strict": _strict,
    "torch": lambda: _torch("cpu"),
    "jax": lambda: _jax("cpu"),
    "dask": _dask,
    "torch-cuda": lambda: _torch("cuda"),
    "jax-gpu": lambda: _jax("gpu"),
    "cupy": _cupy,
}
CPU_BACKENDS = ["numpy", "array_api_strict", "torch", "jax", "dask"]
GPU_BACKENDS = ["torch-cuda", "jax-gpu", "cupy"]
DIFF_BACKENDS = ["torch", "jax", "torch-cuda", "jax-gpu"]


def _is_native(b: Backend, x: Any) -> bool:
    import array_api_compat as aac

    base = b.name.split("-")[0]
    if base == "numpy":
        return isinstance(x, (np.ndarray, np.generic))
    if base == "torch":
        return isinstance(x, b.module.Tensor) and x.device.type == b.device.type
    if base == "jax":
        return aac.is_jax_array(x) and (not hasattr(x, "devices") or b.device in x.devices())
    if base == "dask":
        return aac.is_dask_array(x)
    if base == "cupy":
        return aac.is_cupy_array(x)
    return type(x).__module__.startswith("array_api_strict")


@pytest.fixture(params=CPU_BACKENDS + GPU_BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend: CPU ones always, GPU ones where a GPU is present (else skipped)."""
    return BACKEND_FACTORIES[request.param]()


@pytest.fixture(params=DIFF_BACKENDS)
def diff_backend(request: pytest.FixtureRequest) -> Backend:
    """Backends with automatic differentiation (torch, JAX; CUDA variants where present)."""
    return BACKEND_FACTORIES[request.param]()


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
