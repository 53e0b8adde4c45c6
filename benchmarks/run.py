"""Benchmark kldiv against its peers, in one run: ``python benchmarks/run.py [--quick]``.

Every framework runs in its own subprocess (Keras 3 reads ``KERAS_BACKEND`` at import, so it
needs one per backend anyway), one after the other, so that they do not compete for the two
cores or for memory. For each implementation, size, dtype and mode (forward, or forward and
backward) the script reports the median time of one call, its ratio to the naive NumPy
formula (``np.sum(t * np.log(t / p), -1)`` on ``np.clip``-ed inputs) and the peak extra memory
of one call. Peak memory is the process' resident-set high-water mark (``VmHWM``, reset
before each measurement through ``/proc/self/clear_refs``) minus the resident set before the
call, with glibc told to return large blocks to the system at once
(``MALLOC_MMAP_THRESHOLD_``), so that freed temporaries cannot hide; for NumPy rows the
``tracemalloc`` peak is shown too. Writes ``benchmarks/RESULTS.md`` and
``benchmarks/results.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SIZES = ["256x10", "4096x1000", "4096x4096", "16384x4096"]
DTYPES = ["float32", "float64"]
EPS = 1e-7
GROUPS = ["numpy", "torch", "jax", "tf_keras", "keras3-jax", "keras3-torch", "keras3-tensorflow",
          "gpu"]


# --------------------------------------------------------------------------------- measuring
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], Any], sync: Callable[[Any], Any], budget_s: float,
            numpy_trace: bool = False) -> dict[str, Any]:
    """Median seconds per call, and the peak extra memory (MiB) of one call."""
    t0 = time.perf_counter()
    sync(fn())  # warm-up (compilation, thread pools, caches)
    first = time.perf_counter() - t0
    if first < 0.5:
        t0 = time.perf_counter()
        sync(fn())
        first = time.perf_counter() - t0
    number = max(1, int(0.02 / max(first, 1e-9)))  # calls per sample: >= ~20 ms per sample
    samples = max(3, min(15, int(budget_s / max(first * number, 1e-9))))
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(number):
            r = fn()
        sync(r)
        times.append((time.perf_counter() - t0) / number)
    del r
    res: dict[str, Any] = {"median_s": statistics.median(times), "min_s": min(times),
                           "samples": samples, "number": number}
    import gc

    gc.collect()
    if _reset_hwm():
        before = _rss_kib("VmRSS")
        sync(fn())
        res["peak_mib"] = max(0, _rss_kib("VmHWM") - before) / 1024
    if numpy_trace:
        import tracemalloc

        tracemalloc.start()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res["traced_mib"] = max(0, peak - getattr(out, "nbytes", 0)) / 2**20
    return res


# ------------------------------------------------------------------------------ implementations
def _np_inputs(size: str, dtype: str) -> tuple[Any, Any]:
    import numpy as np

    b, c = (int(x) for x in size.split("x"))
    rng = np.random.default_rng(0)
    t = rng.random((b, c), dtype=np.float64).astype(dtype)
    t /= t.sum(-1, keepdims=True)
    p = rng.random((b, c), dtype=np.float64).astype(dtype)
    p /= p.sum(-1, keepdims=True)
    return t, p


def impls_numpy(t: Any, p: Any, backward: bool) -> dict[str, Any]:
    if backward:
        return {}
    import numpy as np
    import scipy.special

    import kldiv

    def naive() -> Any:
        tc, pc = np.clip(t, EPS, 1), np.clip(p, EPS, 1)
        return np.sum(tc * np.log(tc / pc), axis=-1)

    def generic() -> Any:
        with kldiv.use_generic():
            return kldiv.kld(t, p)

    loss = kldiv.KLDivergence()
    return {
        "naive NumPy formula": naive,
        "kldiv NumPy (fast path)": lambda: kldiv.kld(t, p),
        "kldiv NumPy KLDivergence()": lambda: loss(t, p),
        "naive NumPy formula + mean": lambda: naive().mean(),
        "kldiv NumPy (generic)": generic,
        "scipy rel_entr": lambda: scipy.special.rel_entr(np.clip(t, EPS, 1),
                                                         np.clip(p, EPS, 1)).sum(-1),
    }


def impls_torch(t: Any, p: Any, backward: bool, device: str = "cpu") -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import kldiv

    yt = torch.as_tensor(t, device=device).requires_grad_(backward)
    yp = torch.as_tensor(p, device=device).requires_grad_(backward)

    def formula(a: Any, b: Any) -> Any:
        tc, pc = a.clamp(EPS, 1), b.clamp(EPS, 1)
        return (tc * torch.log(tc / pc)).sum(-1)

    compiled = torch.compile(formula, dynamic=True)
    loss = kldiv.KLDivergence()

    def generic(a: Any, b: Any) -> Any:
        with kldiv.use_generic():
            return kldiv.kld(a, b)

    fns = {
        "torch eager formula": formula,
        f"kldiv torch-{device} (fast path)": kldiv.kld,
        f"kldiv torch-{device} KLDivergence()": loss,
        "torch eager formula + mean": lambda a, b: formula(a, b).mean(),
        f"kldiv torch-{device} (generic)": generic,
        "torch F.kl_div": lambda a, b: F.kl_div(torch.log(b.clamp(EPS, 1)), a.clamp(EPS, 1),
                                                reduction="none").sum(-1),
        "torch.compile formula": compiled,
    }
    def wrap(f: Any) -> Any:
        if not backward:
            def fwd() -> Any:
                with torch.no_grad():
                    return f(yt, yp)
            return fwd

        def fwdbwd() -> Any:
            yt.grad = yp.grad = None
            out = f(yt, yp)
            out.sum().backward()
            return yp.grad

        return fwdbwd

    return {k: wrap(f) for k, f in fns.items()}


def impls_jax(t: Any, p: Any, backward: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    import kldiv

    yt, yp = jnp.asarray(t), jnp.asarray(p)

    def formula(a: Any, b: Any) -> Any:
        tc, pc = jnp.clip(a, EPS, 1), jnp.clip(b, EPS, 1)
        return jnp.sum(tc * jnp.log(tc / pc), axis=-1)

    loss = kldiv.KLDivergence()
    fns = {
        "jax.jit formula": jax.jit(formula),
        "kldiv JAX": kldiv.kld,
        "kldiv JAX KLDivergence()": loss,
        "jax formula (eager) + mean": lambda a, b: formula(a, b).mean(),
        "optax kl_divergence": jax.jit(lambda a, b: optax.losses.kl_divergence(
            jnp.log(jnp.clip(b, EPS, 1)), jnp.clip(a, EPS, 1))),
    }
    if backward:
        grads = {k: jax.jit(jax.grad(lambda a, b, f=f: f(a, b).sum(), argnums=(0, 1)))
                 for k, f in fns.items() if "eager" not in k}
        return {k: (lambda g=g: g(yt, yp)) for k, g in grads.items()}
    return {k: (lambda f=f: f(yt, yp)) for k, f in fns.items()}


def impls_tf_keras(t: Any, p: Any, backward: bool) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf_keras

    yt, yp = tf.constant(t), tf.constant(p)
    loss = tf_keras.losses.KLDivergence()
    fns = {"tf.keras KLD": tf_keras.losses.KLD, "tf.keras KLDivergence()": loss}
    if backward:
        def grad(f: Any) -> Any:
            def run() -> Any:
                with tf.GradientTape() as tape:
                    tape.watch([yt, yp])
                    out = tf.reduce_sum(f(yt, yp))
                return tape.gradient(out, [yt, yp])
            return run
        return {k: grad(f) for k, f in fns.items()}
    return {k: (lambda f=f: f(yt, yp)) for k, f in fns.items()}


def impls_keras3(t: Any, p: Any, backward: bool) -> dict[str, Any]:
    if backward:
        return {}
    import keras

    loss = keras.losses.KLDivergence()
    # a peer at every size (the "KLDivergence()" rows are kldiv's own per-call rows)
    name = f"Keras 3 KLDivergence class [{keras.backend.backend()}]"
    yt, yp = keras.ops.convert_to_tensor(t), keras.ops.convert_to_tensor(p)
    return {name: lambda: loss(yt, yp)}


def _sync(x: Any) -> Any:
    """Wait for asynchronous work (JAX dispatch, CUDA streams) to finish."""
    first = x[0] if isinstance(x, (list, tuple)) and x else x
    if "jax" in sys.modules and type(first).__module__.startswith("jax"):
        import jax

        jax.block_until_ready(x)
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if "cupy" in sys.modules:
        import cupy

        cupy.cuda.Device().synchronize()
    return x


def worker(group: str, sizes: list[str], dtypes: list[str], budget: float) -> None:
    """Run one group in this process; print one JSON line per measurement."""
    if group.startswith("keras3-"):
        os.environ["KERAS_BACKEND"] = group.split("-", 1)[1]
    factories = {"numpy": impls_numpy, "torch": impls_torch, "jax": impls_jax,
                 "tf_keras": impls_tf_keras}
    if group == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    for size in sizes:
        for dtype in dtypes:
            t, p = _np_inputs(size, dtype)
            for backward in (False, True):
                if group.startswith("keras3-"):
                    fns = impls_keras3(t, p, backward)
                elif group == "gpu":
                    fns = impls_gpu(t, p, backward)
                else:
                    fns = factories[group](t, p, backward)
                for name, fn in fns.items():
                    if ("KLDivergence()" in name or "+ mean" in name) and (
                            size != "256x10" or backward):
                        continue  # per-call overhead: the loss class only at 256x10
                    try:
                        res = measure(fn, _sync, budget, numpy_trace=group == "numpy")
                    except Exception as exc:  # a peer that cannot run this case
                        res = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                    res.update(group=group, impl=name, size=size, dtype=dtype,
                               mode="fwd+bwd" if backward else "fwd")
                    print("RESULT " + json.dumps(res), flush=True)
                    fns[name] = None


# ------------------------------------------------------------------------------------------ GPU
def impls_gpu(t: Any, p: Any, backward: bool) -> dict[str, Any]:
    """CUDA rows (only run where a GPU is present): torch CUDA, CuPy, JAX GPU, copy bandwidth."""
    fns: dict[str, Any] = {}
    import torch

    if not torch.cuda.is_available():
        return fns
    fns.update({k: v for k, v in impls_torch(t, p, backward, "cuda").items()
                if "torch.compile" not in k or not backward})
    if not backward:
        src = torch.as_tensor(t, device="cuda")
        dst = torch.empty_like(src)
        fns["device copy (read 1, write 1)"] = lambda: dst.copy_(src)
        try:
            import cupy as cp

            import kldiv

            ct, cpr = cp.asarray(t), cp.asarray(p)
            fns["kldiv CuPy"] = lambda: kldiv.kld(ct, cpr)
        except ImportError:
            pass
    return fns


# ----------------------------------------------------------------------------------- reporting
def _fmt_t(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _baseline(rows: list[dict[str, Any]], size: str, dtype: str, mode: str,
              impl: str = "naive NumPy formula") -> float | None:
    for r in rows:
        if (r["impl"], r["size"], r["dtype"], r["mode"]) == (impl, size, dtype, "fwd") and \
                "median_s" in r:
            return float(r["median_s"])
    return None


def _get(rows: list[dict[str, Any]], impl: str, size: str, dtype: str, mode: str) -> float | None:
    for r in rows:
        if (r["impl"], r["size"], r["dtype"], r["mode"]) == (impl, size, dtype, mode) and \
                "median_s" in r:
            return float(r["median_s"])
    return None


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, checked on the measured numbers (ratios, same run)."""
    out = []

    def ratio_line(label: str, num: float | None, den: float | None, need: float) -> None:
        if num is None or den is None:
            out.append(f"| {label} | n/a (not measured) | >= {need:g}x | - |")
            return
        r = den / num
        out.append(f"| {label} | {r:.1f}x | >= {need:g}x | {'met' if r >= need else 'MISSED'} |")

    s = "4096x4096"
    fast = _get(rows, "kldiv NumPy (fast path)", s, "float32", "fwd")
    ratio_line("NumPy 4096x4096 f32 vs naive NumPy formula", fast,
               _get(rows, "naive NumPy formula", s, "float32", "fwd"), 4)
    ratio_line("NumPy 4096x4096 f32 vs tf.keras KLD", fast,
               _get(rows, "tf.keras KLD", s, "float32", "fwd"), 2)
    for mode, need in (("fwd", 5), ("fwd+bwd", 3)):
        ratio_line(f"torch CPU 4096x4096 f32 {mode} vs torch eager formula",
                   _get(rows, "kldiv torch-cpu (fast path)", s, "float32", mode),
                   _get(rows, "torch eager formula", s, "float32", mode), need)
    peaks = [r.get("traced_mib") for r in rows if r["impl"] == "kldiv NumPy (fast path)"
             and r.get("traced_mib") is not None]
    if peaks:
        worst = max(peaks)
        out.append(f"| NumPy extra peak memory, worst size (tracemalloc) | {worst:.1f} MiB | "
                   f"<= 64 MiB | {'met' if worst <= 64 else 'MISSED'} |")
    for fw, cls, formula in (
        ("NumPy", "kldiv NumPy KLDivergence()", "naive NumPy formula + mean"),
        ("torch", "kldiv torch-cpu KLDivergence()", "torch eager formula + mean"),
        ("JAX", "kldiv JAX KLDivergence()", "jax formula (eager) + mean"),
    ):
        for dt in ("float32", "float64"):
            c, f = _get(rows, cls, "256x10", dt, "fwd"), _get(rows, formula, "256x10", dt, "fwd")
            if c is None or f is None:
                continue
            r = c / f
            out.append(f"| 256x10 {dt} {fw}: KLDivergence() / hand-written formula + mean | "
                       f"{r:.2f}x ({_fmt_t(c)} vs {_fmt_t(f)}) | <= 1.5x | "
                       f"{'met' if r <= 1.5 else 'MISSED'} |")
    copy = _get(rows, "device copy (read 1, write 1)", "16384x4096", "float32", "fwd")
    for impl in ("kldiv torch-cuda (fast path)", "kldiv CuPy"):
        k = _get(rows, impl, "16384x4096", "float32", "fwd")
        if copy is not None and k is not None:
            # copy moves 2N values; the kernel reads 2N and writes N/C
            frac = copy / k
            out.append(f"| GPU {impl} 16384x4096 f32, share of copy bandwidth | {frac:.0%} | "
                       f">= 70% | {'met' if frac >= 0.7 else 'MISSED'} |")
    return out


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Benchmark results", "",
             f"Generated by `python benchmarks/run.py {' '.join(meta['argv'])}` on "
             f"{meta['machine']} ({meta['cpus']} CPUs), {meta['date']}; total "
             f"{meta['elapsed_s']:.0f} s. Median time of one call; *vs naive* is the naive NumPy "
             "formula's forward time (same size and dtype) divided by this row's time (higher "
             "is faster); *peak extra* is the resident-set high-water mark of one call above "
             "the resident set before it (inputs excluded, output included; NumPy rows also "
             "give the tracemalloc peak minus the output). The machine is shared: other jobs ran "
             f"during the run (load average at start {meta['load']}), which inflates some "
             "medians (PyTorch's spinning OpenMP threads suffer most); the *min* column is "
             "the least disturbed sample. Versions: "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", ""]
    lines += ["## Targets (issue #3)", "", "| target | measured | needed | status |",
              "| --- | --- | --- | --- |", *targets(rows), ""]
    keys = sorted({(r["size"], r["dtype"], r["mode"]) for r in rows},
                  key=lambda k: (SIZES.index(k[0]) if k[0] in SIZES else 99, k[1], k[2]))
    for size, dtype, mode in keys:
        base = _baseline(rows, size, dtype, mode)
        sel = [r for r in rows if (r["size"], r["dtype"], r["mode"]) == (size, dtype, mode)]
        sel.sort(key=lambda r: r.get("median_s", float("inf")))
        lines += [f"## {size} {dtype}, {mode}", "",
                  "| implementation | median | min | vs naive | peak extra (RSS) | tracemalloc |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sel:
            if "median_s" not in r:
                lines.append(f"| {r['impl']} | error: {r.get('error', '?')} | | | | |")
                continue
            ratio = f"{base / r['median_s']:.2f}x" if base else "-"
            peak = f"{r['peak_mib']:.0f} MiB" if "peak_mib" in r else "n/a"
            tr = f"{r['traced_mib']:.1f} MiB" if "traced_mib" in r else ""
            lines.append(f"| {r['impl']} | {_fmt_t(r['median_s'])} | {_fmt_t(r['min_s'])} | "
                         f"{ratio} | {peak} | {tr} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("4096x4096", "float32", "fwd"), ("4096x4096", "float32", "fwd+bwd"),
              ("256x10", "float32", "fwd")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5))
    for ax, (size, dtype, mode) in zip(axes, panels, strict=True):
        sel = [r for r in rows if (r["size"], r["dtype"], r["mode"]) == (size, dtype, mode)
               and "median_s" in r]
        sel.sort(key=lambda r: r["median_s"], reverse=True)
        names = [r["impl"] for r in sel]
        vals = [r["median_s"] * 1e3 for r in sel]
        colors = ["tab:green" if n.startswith("kldiv") and "generic" not in n else "tab:gray"
                  for n in names]
        ax.barh(names, vals, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel("median time per call (ms, log scale)")
        ax.set_title(f"{size} {dtype}, {mode}")
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle("kldiv (green) vs peers, lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("numpy", "torch", "jax", "tensorflow-cpu", "tf-keras", "keras", "optax", "scipy",
                "cupy-cuda12x", "triton"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="only 256x10 and 4096x1000, float32, shorter timing budget")
    ap.add_argument("--sizes", default=None, help=f"comma list of BxC (default {','.join(SIZES)})")
    ap.add_argument("--dtypes", default=None, help="comma list (default float32,float64)")
    ap.add_argument("--groups", default=None, help=f"comma list of {','.join(GROUPS)}")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per row")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = args.sizes.split(",") if args.sizes else (["256x10", "4096x1000"] if args.quick
                                                      else SIZES)
    dtypes = args.dtypes.split(",") if args.dtypes else (["float32"] if args.quick else DTYPES)
    budget = args.budget or (0.3 if args.quick else 1.0)
    if args.worker:
        worker(args.worker, sizes, dtypes, budget)
        return 0

    groups = args.groups.split(",") if args.groups else GROUPS
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TF_CPP_MIN_LOG_LEVEL": "2",
           "TORCHINDUCTOR_COMPILE_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    rows: list[dict[str, Any]] = []
    start = time.time()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    for group in groups:
        g_env = dict(env)
        if group != "gpu":
            g_env["CUDA_VISIBLE_DEVICES"] = g_env.get("CUDA_VISIBLE_DEVICES", "")
            g_env.setdefault("JAX_PLATFORMS", "cpu")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", group,
               "--sizes", ",".join(sizes), "--dtypes", ",".join(dtypes), "--budget", str(budget)]
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=g_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                rows.append(r)
                t = _fmt_t(r["median_s"]) if "median_s" in r else r.get("error", "?")
                print(f"{group:18s} {r['size']:>10s} {r['dtype']} {r['mode']:7s} "
                      f"{r['impl']:38s} {t}", flush=True)
        err = proc.stderr.read() if proc.stderr else ""
        if proc.wait() != 0:
            print(f"[{group}] failed or skipped (exit {proc.returncode}): {err.strip()[-300:]}")
        print(f"[{group}] {time.time() - t0:.0f} s", flush=True)
    meta = {"argv": list(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()} {platform.system()}",
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "elapsed_s": time.time() - start, "versions": _versions(), "load": load}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(write_report(rows, meta))
    (out.with_suffix(".json")).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    try:
        plot(rows, out.parent / "results.png")
    except Exception as exc:  # matplotlib missing
        print(f"no plot: {exc}")
    print("\n".join(targets(rows)))
    print(f"wrote {out} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
