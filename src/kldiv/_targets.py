"""Where :func:`kldiv.evaluate_files` runs: a backend on a device, and the moves there.

A :class:`Target` moves one batch, a NumPy array (a memory-mapped window of a file) or an
array of any library, to the backend's device. NumPy data is first converted on the host
(:func:`kldiv._npyio.host_ready`) to the machine's byte order and to a dtype the backend has
on that device, so big-endian files and dtypes a library lacks (float16 on
array-api-strict, float64 on a device without it) arrive as the values of the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._npyio import host_ready, to_host

__all__ = ["BACKENDS", "Target", "backend_name", "target"]

BACKENDS = ("numpy", "torch", "jax", "cupy", "dask", "array_api_strict", "tensorflow")
"""Backends :func:`evaluate_files` can run on (``backend=`` names)."""

_INSTALL = {
    "torch": "pip install 'kldiv[torch]'",
    "jax": "pip install 'kldiv[jax]'",
    "cupy": "pip install 'kldiv[cupy]'",
    "dask": "pip install 'kldiv[dask]'",
    "array_api_strict": "pip install array-api-strict",
    "tensorflow": "pip install tensorflow",
}

def backend_name(backend: Any) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {', '.join(BACKENDS)}; got {backend!r}.")
    name = backend.lower().replace("-", "_")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}.")
    return name


@dataclass(frozen=True)
class Target:
    """Moves a batch (a NumPy array, or an array of any library) to the backend's device."""

    backend: str
    from_numpy: Callable[[np.ndarray], Any]  # native byte order, a dtype the target has
    from_native: Callable[[Any], Any]  # an array of the target library, to the device
    is_native: Callable[[Any], bool]
    supported: Callable[[np.dtype[Any]], bool] | None = None

    def __call__(self, x: Any) -> Any:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return x  # a scalar weight: broadcast by the loss
        if isinstance(x, np.ndarray):
            return self.from_numpy(host_ready(np.asarray(x), self.supported))
        if self.is_native(x):
            return self.from_native(x)
        return self.from_numpy(host_ready(to_host(x), self.supported))


def _numpy_target(backend: str, device: str | None) -> Target:
    if device not in (None, "cpu"):
        raise ValueError(f"backend {backend!r} runs on the CPU; got device {device!r} "
                         "(use backend='cupy', 'torch', 'jax' or 'tensorflow' for a GPU).")
    return Target(backend, np.asarray, np.asarray, lambda x: isinstance(x, np.ndarray))


def _torch_target(device: str | None) -> Target:
    import torch

    tdev = torch.device(device or "cpu")
    ok: dict[np.dtype[Any], bool] = {}

    def supported(dt: np.dtype[Any]) -> bool:
        if dt not in ok:
            try:
                torch.from_numpy(np.empty(0, dtype=dt))
                ok[dt] = not (tdev.type == "mps" and dt == np.float64)  # MPS has no float64
            except TypeError:  # a torch without this dtype (unsigned 16-64 bit before 2.3)
                ok[dt] = False
        return ok[dt]

    def from_numpy(a: np.ndarray) -> Any:
        if not a.flags.writeable or not a.flags.c_contiguous:
            a = np.array(a)  # torch wants a writable buffer; a memory-mapped window is not
        return torch.from_numpy(a).to(tdev)

    return Target("torch", from_numpy, lambda x: x.detach().to(tdev),
                   lambda x: isinstance(x, torch.Tensor), supported)


def _jax_target(device: str | None) -> Target:
    import jax
    import jax.numpy as jnp

    jdev: Any = None
    if device is not None:
        platform, _, index = device.partition(":")
        platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform.lower(), platform.lower())
        jdev = jax.devices(platform)[int(index or 0)]
    # float16 is not in the array API's list, but every JAX backend has it
    names = {"float16", *jnp.__array_namespace_info__().dtypes(device=jdev)}

    def put(x: Any) -> Any:
        return jax.device_put(x, jdev)

    return Target("jax", put, put, lambda x: isinstance(x, jax.Array), lambda dt: dt.name in names)


def _cupy_target(device: str | None) -> Target:
    import cupy as cp

    platform, _, index = (device or "cuda:0").partition(":")
    if platform.lower() not in ("cuda", "gpu"):
        raise RuntimeError(f"CuPy runs on CUDA devices ('cuda', 'cuda:1'), not {platform!r}")
    gpu = int(index or 0)

    def to_cupy(x: Any) -> Any:
        with cp.cuda.Device(gpu):
            return cp.asarray(x)

    return Target("cupy", to_cupy, to_cupy, lambda x: isinstance(x, cp.ndarray))


def _strict_target(device: str | None) -> Target:
    import array_api_strict as xps

    sdev = xps.Device(device) if device is not None else None
    info = xps.__array_namespace_info__()
    names = set(info.dtypes(device=sdev))  # no float16; no float64 on "no_float64" devices

    def from_numpy(a: np.ndarray) -> Any:
        return xps.asarray(a, device=sdev)

    def from_native(x: Any) -> Any:
        return x if sdev is None or x.device == sdev else x.to_device(sdev)

    return Target("array_api_strict", from_numpy, from_native,
                   lambda x: type(x).__module__.startswith("array_api_strict"), lambda dt: dt.name in names)


def _tensorflow_target(device: str | None) -> Target:
    import tensorflow as tf

    name = None
    if device is not None:
        kind, _, index = device.lstrip("/").removeprefix("device:").partition(":")
        kind = {"cuda": "GPU", "rocm": "GPU"}.get(kind.lower(), kind.upper())
        name = f"/device:{kind}:{int(index or 0)}"
        if name not in {d.name for d in tf.config.list_logical_devices()}:
            raise RuntimeError(f"TensorFlow lists {', '.join(d.name for d in tf.config.list_logical_devices())}")

    def place(make: Callable[[], Any]) -> Any:
        if name is None:
            return make()
        with tf.device(name):
            return tf.identity(make())

    return Target("tensorflow", lambda a: place(lambda: tf.convert_to_tensor(a)),
                   lambda x: place(lambda: x), lambda x: isinstance(x, tf.Tensor))


def target(backend: str, device: str | None) -> Target:
    """The :class:`Target` for ``backend`` on ``device``, checked by moving a tiny array there.

    Raises ``ImportError`` (with the install command) if the backend is missing and
    ``RuntimeError`` if the device is not there (exit status 1 of ``kldiv compute``).
    """
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cuda:1', 'gpu' or 'cpu'; got {device!r}.")
    if backend in ("numpy", "dask"):
        return _numpy_target(backend, device)
    makers: dict[str, Callable[[str | None], Target]] = {
        "torch": _torch_target, "jax": _jax_target, "cupy": _cupy_target,
        "array_api_strict": _strict_target, "tensorflow": _tensorflow_target,
    }
    try:
        made = makers[backend](device)
        _wait(made(np.zeros((1,), dtype=np.float32)))
    except ImportError as exc:
        raise ImportError(f"backend {backend!r} is not installed ({exc}): {_INSTALL[backend]}") from None
    except Exception as exc:
        what = f"no device {device!r}" if device is not None else "no usable default device"
        raise RuntimeError(f"{backend} has {what} here ({type(exc).__name__}: {exc})") from None
    return made


def _wait(x: Any) -> None:
    ready = getattr(x, "block_until_ready", None)
    if ready is not None:
        ready()
