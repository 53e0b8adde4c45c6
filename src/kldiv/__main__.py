"""``python -m kldiv``: the seed examples on every installed backend and device.

Sub-commands:

- ``python -m kldiv`` (or ``python -m kldiv show``): the seed examples' values, dtype and
  device on each installed backend/device, and how to install each missing backend.
- ``python -m kldiv compute y_true.npy y_pred.npy [...]``: the loss over two ``.npy`` files
  (see ``python -m kldiv compute --help``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np

SEED_1 = ([0.4, 0.9, 0.2], [0.5, 0.8, 0.12])
SEED_2 = ([[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]])

INSTALL_HINTS = {
    "numpy": "pip install numpy",
    "array_api_strict": "pip install array-api-strict",
    "torch": "pip install 'kldiv[torch]'  (CPU build: pip install torch --index-url https://download.pytorch.org/whl/cpu)",
    "jax": "pip install 'kldiv[jax]'  (GPU: pip install 'jax[cuda12]')",
    "cupy": "pip install 'kldiv[cupy]'  (needs an NVIDIA GPU and CUDA 12)",
    "dask": "pip install 'kldiv[dask]'",
}

Converter = Callable[[Any], Any]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _targets() -> Iterator[tuple[str, str, Converter | None, str]]:
    """(backend, device, converter from nested lists, reason-if-unavailable)."""
    yield "numpy", "cpu", lambda v: np.asarray(v, dtype=np.float32), ""
    if _installed("array_api_strict"):
        xps = importlib.import_module("array_api_strict")
        yield "array_api_strict", "CPU_DEVICE", lambda v: xps.asarray(v, dtype=xps.float32), ""
    else:
        yield "array_api_strict", "-", None, INSTALL_HINTS["array_api_strict"]
    if _installed("torch"):
        torch = importlib.import_module("torch")
        yield "torch", "cpu", lambda v: torch.tensor(v, dtype=torch.float32), ""
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                dev = f"cuda:{i}"
                yield "torch", dev, partial(torch.tensor, dtype=torch.float32, device=dev), ""
        else:
            yield "torch", "cuda", None, "no CUDA device visible to torch"
    else:
        yield "torch", "-", None, INSTALL_HINTS["torch"]
    if _installed("jax"):
        jax = importlib.import_module("jax")
        jnp = importlib.import_module("jax.numpy")
        for jdev in jax.devices():

            def to_jax(v: Any, d: Any = jdev) -> Any:
                return jax.device_put(jnp.asarray(v, dtype=jnp.float32), d)

            yield "jax", str(jdev), to_jax, ""
    else:
        yield "jax", "-", None, INSTALL_HINTS["jax"]
    if _installed("cupy"):
        try:
            cp = importlib.import_module("cupy")
            n = cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # installed, but no driver / GPU
            yield "cupy", "-", None, f"installed but unusable here: {type(exc).__name__}: {exc}"
        else:
            for i in range(n):
                def conv(v: Any, i: int = i) -> Any:
                    with cp.cuda.Device(i):
                        return cp.asarray(v, dtype=cp.float32)
                yield "cupy", f"cuda:{i}", conv, ""
    else:
        yield "cupy", "-", None, INSTALL_HINTS["cupy"]
    if _installed("dask"):
        da = importlib.import_module("dask.array")
        yield "dask", "cpu (lazy)", lambda v: da.from_array(np.asarray(v, dtype=np.float32)), ""
    else:
        yield "dask", "-", None, INSTALL_HINTS["dask"]


def _fmt(x: Any) -> str:
    import array_api_compat

    from ._namespace import get_device

    if array_api_compat.is_dask_array(x):
        x = x.compute()
    dev = get_device(x)
    arr = np.asarray(x.cpu() if hasattr(x, "cpu") and not isinstance(x, np.ndarray) else x) \
        if not array_api_compat.is_cupy_array(x) else x.get()
    vals = np.array2string(np.asarray(arr), precision=8, separator=", ")
    dtype = str(x.dtype).rsplit(".", 1)[-1]
    return f"{vals}  [{dtype} on {dev}]"


def show(out: Any = None) -> int:
    """Print the seed examples on every installed backend; return the number of failures."""
    import kldiv

    out = out or sys.stdout
    failures = 0
    out.write(f"kldiv {kldiv.__version__}: Keras KL divergence on every installed backend\n")
    out.write("  loss = sum(t * log(t / p), axis=-1),  t, p clipped to [1e-7, 1]\n\n")
    for name, device, conv, reason in _targets():
        header = f"{name} ({device})"
        if conv is None:
            out.write(f"- {header}: not available: {reason}\n")
            continue
        out.write(f"- {header}\n")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yt2, yp2 = conv(SEED_2[0]), conv(SEED_2[1])
                rows = [
                    ("KLD([.4, .9, .2], [.5, .8, .12])", kldiv.KLD(conv(SEED_1[0]), conv(SEED_1[1]))),
                    ("KLD([[0, 1], [0, 0]], [[.6, .4], [.4, .6]])", kldiv.KLD(yt2, yp2)),
                    ("KLDivergence()(...)", kldiv.KLDivergence()(yt2, yp2)),
                    ("KLDivergence()(..., sample_weight=[.8, .2])",
                     kldiv.KLDivergence()(yt2, yp2, sample_weight=[0.8, 0.2])),
                    ("KLDivergence(reduction='sum')(...)", kldiv.KLDivergence(reduction="sum")(yt2, yp2)),
                    ("KLDivergence(reduction='none')(...)", kldiv.KLDivergence(reduction="none")(yt2, yp2)),
                ]
            for label, value in rows:
                out.write(f"    {label:<46} = {_fmt(value)}\n")
        except Exception as exc:  # report, keep going with the other backends
            failures += 1
            out.write(f"    FAILED: {type(exc).__name__}: {exc}\n")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "compute":
        from ._cli import compute_main

        return compute_main(args[1:])
    if args and args[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    if args and args[0] != "show":
        print(f"kldiv: unknown command {args[0]!r}; try 'python -m kldiv --help'", file=sys.stderr)
        return 2
    return 1 if show() else 0


if __name__ == "__main__":
    sys.exit(main())
