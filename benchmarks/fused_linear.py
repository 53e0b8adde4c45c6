"""Large-vocabulary divergence from hidden states (issue 13): memory and time, side by side.

    python benchmarks/fused_linear.py            # the full run (quiet machine: ~15-25 min)
    python benchmarks/fused_linear.py --quick    # small shapes, to check the script (~1 min)

Implementations (torch, CPU, float32, forward + backward, teacher given as hidden states and
its own weight, reduced to the mean over tokens):

- ``plain``: the formula with the logits materialised (``h @ W.T``, ``log_softmax`` on both
  sides, the divergence, ``.mean()``), autograd doing the rest;
- ``kldiv``: :func:`kldiv.fused_linear_divergence` with its automatic chunk size
  (gradients computed in the forward pass);
- ``kldiv-recompute``: the same with the backward recomputing every chunk instead
  (``torch_fused.GRAD_MODE = "recompute"``): the measurement behind the default;
- ``kldiv-chunks`` / ``kldiv-slabs``: ``kldiv`` with the weight gradient accumulated over
  token chunks or formed by vocabulary slabs (``torch_fused_slabs.WEIGHT_GRAD``; ``kldiv``
  itself uses ``auto``: for bfloat16 weights on CUDA ``lowp`` over at most 16 token chunks,
  else slabs; chunks elsewhere);
- ``kldiv-lowp``: ``kldiv`` with the weight gradient accumulated over token chunks in the
  weight's own dtype (``"lowp"``: Liger's accumulation, one rounding per chunk);
- ``liger`` / ``liger-eager``: Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` (its
  ``chunked_loss``, which runs on CPU) with ``weight_hard_loss=0, weight_soft_loss=1``, its
  default ``chunk_size=1024``, with and without its default ``torch.compile`` of the chunk
  step; for ``"kl"`` with ``beta=0``, which Liger computes as ``KL(teacher || student)``
  (Liger has no separate fused-linear KL loss).

Every case runs in a fresh subprocess (``--worker``), one after the other. Peak extra memory
is the process' resident-set high-water mark (``VmHWM``) during one forward+backward call
minus the resident set just before it, after a warm-up call (compilation, thread pools) and
with the high-water mark reset through ``/proc/self/clear_refs``. ``MALLOC_MMAP_THRESHOLD_``
makes glibc serve every block of 64 KiB or more by ``mmap`` and return it on ``free``, so the
high-water mark sees every temporary as it lives and dies (``tracemalloc`` does not see
torch's allocations). Gradients are reset to ``None`` before each call, so every
implementation's peak includes its gradient tensors. Time is the median of ``--reps`` calls.

Writes ``benchmarks/fused_linear.json`` and ``benchmarks/fused_linear.png`` (the peak memory
over N = 1k..32k tokens) and prints a summary with the issue's targets, met or missed.

``--gpu`` (written without a GPU at hand, not yet run): CUDA, bfloat16, Liger's benchmark
shape (BT=8192, H=4096, V=128256), adding ``plain-compile`` (``torch.compile`` of the plain
formula) and ``liger-triton`` (Liger's Triton ``LigerFusedLinearJSD``; ``jsd_beta=0`` for
"kl"); peak memory from ``torch.cuda.max_memory_allocated``; writes
``benchmarks/fused_linear_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FULL = {"n": 4096, "h": 256, "v": 32768, "curve": [1024, 2048, 4096, 8192, 16384, 32768],
        "plain_curve_max": 8192, "reps": 5}
QUICK = {"n": 1024, "h": 64, "v": 16384, "curve": [256, 512, 1024, 2048],
         "plain_curve_max": 2048, "reps": 2}  # automatic chunks of 512 rows: a flat curve
GPU = {"n": 8192, "h": 4096, "v": 128256, "reps": 5}  # Liger's benchmark shape
BETA = 0.5


# ------------------------------------------------------------------------------ the worker
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _make_step(impl: str, div: str, n: int, h: int, v: int, device: str = "cpu",
               dtype: str = "float32") -> tuple[Any, list[Any]]:
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)

    def rand(*shape: int, scale: float) -> Any:
        return (torch.randn(*shape, device=device) * scale).to(dt)

    sh = rand(n, h, scale=0.5).requires_grad_()
    sw = rand(v, h, scale=0.05).requires_grad_()
    th = rand(n, h, scale=0.5)
    tw = rand(v, h, scale=0.05)
    params = [sh, sw]
    if impl in ("plain", "plain-compile"):
        def step() -> Any:
            lq = torch.log_softmax((sh @ sw.T).float(), -1)
            with torch.no_grad():
                lp = torch.log_softmax((th @ tw.T).float(), -1)
            if div == "kl":
                per = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
            else:
                lm = torch.logaddexp(lp + math.log(BETA), lq + math.log1p(-BETA))
                per = BETA * (lp.exp() * (lp - lm)).sum(-1) + (1 - BETA) * (lq.exp() * (lq - lm)).sum(-1)
            return per.mean()

        if impl == "plain-compile":
            step = torch.compile(step)
    elif impl.startswith("kldiv"):
        sys.path.insert(0, str(ROOT / "src"))
        from kldiv._fused_linear import fused_linear_divergence
        from kldiv.backends import torch_fused, torch_fused_slabs

        torch_fused.GRAD_MODE = "recompute" if impl == "kldiv-recompute" else "forward"
        # the weight gradient: by chunks or by vocabulary slabs (default: auto)
        torch_fused_slabs.WEIGHT_GRAD = {"kldiv-chunks": "chunks",
                                         "kldiv-slabs": "slabs",
                                         "kldiv-lowp": "lowp"}.get(impl, "auto")

        def step() -> Any:
            return fused_linear_divergence(sh, sw, teacher_hidden=th, teacher_weight=tw,
                                           divergence=div, beta=BETA)
    elif impl == "liger-triton":  # Liger's Triton fused linear JSD (CUDA only)
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        loss = LigerFusedLinearJSD(jsd_beta=0.0 if div == "kl" else BETA)

        def step() -> Any:
            return loss(sh, sw, th, tw, None)
    else:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                       beta=0.0 if div == "kl" else BETA,
                                       compiled=impl == "liger")
        labels = torch.zeros(n, dtype=torch.long, device=device)

        def step() -> Any:
            return loss(sh, sw, th, tw, labels)
    return step, params


def worker(impl: str, div: str, n: int, h: int, v: int, reps: int, device: str = "cpu",
           dtype: str = "float32") -> dict[str, Any]:
    import gc

    import torch

    step, params = _make_step(impl, div, n, h, v, device, dtype)
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def call() -> float:
        for p in params:
            p.grad = None
        out = step()
        out.backward()
        sync()
        return float(out.detach())

    t0 = time.perf_counter()
    value = call()  # warm-up: compilation, thread pools, first-touch of the weights
    first = time.perf_counter() - t0
    for p in params:
        p.grad = None
    gc.collect()
    if cuda:  # the caching allocator's high-water mark, beyond what is allocated now
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        _reset_hwm()
        before = _rss_kib("VmRSS")
        call()
        peak = (_rss_kib("VmHWM") - before) / 1024
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"impl": impl, "div": div, "n": n, "h": h, "v": v, "device": device, "dtype": dtype,
            "loss": value, "peak_mib": peak,
            "median_s": statistics.median(times) if times else None,
            "first_s": first, "reps": reps, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ the driver
def run_case(impl: str, div: str, n: int, h: int, v: int, reps: int, timeout: float,
             device: str = "cpu", dtype: str = "float32") -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, div, str(n), str(h),
           str(v), str(reps), device, dtype]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "div": div, "n": n, "h": h, "v": v, "error": "timeout"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"impl": impl, "div": div, "n": n, "h": h, "v": v,
                "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    row: dict[str, Any] = json.loads(lines[-1])
    return row


def _has_liger() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception:
        return False
    return True


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def targets(rows: list[dict[str, Any]], n: int) -> list[str]:
    """The issue's targets at the headline shape, met or missed, with the numbers."""
    out = []
    for div in ("js", "kl"):
        get = {r["impl"]: r for r in rows if r["div"] == div and r["n"] == n and
               "error" not in r and not r.get("curve") and r.get("median_s") is not None}
        k, p = get.get("kldiv"), get.get("plain")
        if k and p:
            mem = p["peak_mib"] / max(k["peak_mib"], 1e-9)
            out.append(f"[{div}] peak extra memory: plain {p['peak_mib']:.0f} MiB / kldiv "
                       f"{k['peak_mib']:.0f} MiB = {mem:.1f}x (target >= 10x: "
                       f"{'met' if mem >= 10 else 'MISSED'})")
            out.append(f"[{div}] time: plain {p['median_s']:.3f} s, kldiv {k['median_s']:.3f} s "
                       f"(speed-up {_ratio(p['median_s'], k['median_s'])}; target > 1x: "
                       f"{'met' if k['median_s'] < p['median_s'] else 'MISSED'})")
        for lig in ("liger", "liger-eager", "liger-triton", "plain-compile"):
            g = get.get(lig)
            if k and g:
                ok_t, ok_m = k["median_s"] <= g["median_s"], k["peak_mib"] <= g["peak_mib"]
                out.append(f"[{div}] vs {lig}: time {g['median_s']:.3f} s / kldiv "
                           f"{k['median_s']:.3f} s = {_ratio(g['median_s'], k['median_s'])} "
                           f"({'met' if ok_t else 'MISSED'}), memory {g['peak_mib']:.0f} / "
                           f"{k['peak_mib']:.0f} MiB ({'met' if ok_m else 'MISSED'})")
        r = get.get("kldiv-recompute")
        if k and r:
            out.append(f"[{div}] gradients in the forward pass vs recomputed in the backward: "
                       f"{k['median_s']:.3f} s vs {r['median_s']:.3f} s, {k['peak_mib']:.0f} vs "
                       f"{r['peak_mib']:.0f} MiB")
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    if not any(r.get("curve") and "error" not in r for r in rows):
        return False  # --no-curve: nothing to draw
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in ("plain", "kldiv", "liger", "liger-eager"):
        pts = sorted((r["n"], r["peak_mib"]) for r in rows if r.get("curve") and
                     r["impl"] == impl and "error" not in r)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("peak extra memory, forward+backward (MiB)")
    v, h = rows[0]["v"], rows[0]["h"]
    ax.set_title(f"JSD from hidden states, V={v}, H={h}, float32, CPU")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (checks the script)")
    ap.add_argument("--gpu", action="store_true",
                    help="CUDA, bfloat16, Liger's shape (BT=8192, H=4096, V=128256), with "
                         "torch.compile and Liger's Triton kernel; no curve")
    ap.add_argument("--no-curve", action="store_true", help="skip the memory curve over N")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (PNG beside it)")
    ap.add_argument("--divs", default="js,kl", help="divergences, comma-separated")
    ap.add_argument("--impls", default=None,
                    help="implementations, comma-separated (default: all that apply)")
    ap.add_argument("--worker", nargs=8,
                    metavar=("IMPL", "DIV", "N", "H", "V", "REPS", "DEVICE", "DTYPE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        impl, div, n, h, v, reps, device, dtype = args.worker
        print(json.dumps(worker(impl, div, int(n), int(h), int(v), int(reps), device, dtype)),
              flush=True)
        return 0
    cfg = GPU if args.gpu else QUICK if args.quick else FULL
    device, dtype = ("cuda", "bfloat16") if args.gpu else ("cpu", "float32")
    name = "fused_linear_gpu" if args.gpu else "fused_linear_quick" if args.quick else "fused_linear"
    out = args.out or HERE / f"{name}.json"
    impls = ["plain", "kldiv", "kldiv-recompute"]
    if args.gpu:
        # kldiv is auto: lowp at this shape (8 chunks); the other two weight-gradient modes
        impls = ["plain", "plain-compile", "kldiv", "kldiv-chunks", "kldiv-slabs"]
    if _has_liger():
        impls += ["liger", "liger-triton"] if args.gpu else ["liger", "liger-eager"]
    else:
        print("liger-kernel is not installed: its rows are left out "
              "(pip install liger-kernel -c ci/constraints-cpu.txt)")
    if args.impls:
        impls = [i for i in args.impls.split(",") if i]
    n, h, v = cfg["n"], cfg["h"], cfg["v"]
    rows = []
    for div in [d for d in args.divs.split(",") if d]:
        for impl in impls:
            row = run_case(impl, div, n, h, v, cfg["reps"], 1800, device, dtype)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if not (args.no_curve or args.gpu):
        for size in cfg["curve"]:
            for impl in ("plain", "kldiv", "liger"):
                if impl == "plain" and size > cfg["plain_curve_max"]:
                    continue
                if impl.startswith("liger") and not _has_liger():
                    continue
                row = run_case(impl, "js", size, h, v, 0, 3600, device, dtype)
                row["curve"] = True
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "quick": args.quick, "gpu": args.gpu, "beta": BETA,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "method": ("torch.cuda.max_memory_allocated - memory_allocated around one "
                       "forward+backward call after a warm-up" if args.gpu else
                       "VmHWM - VmRSS around one forward+backward call after a warm-up, "
                       "MALLOC_MMAP_THRESHOLD_=65536") + ", a fresh subprocess per case"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")  # first: kept
    summary = targets(rows, n)
    if args.quick:
        summary.insert(0, "(quick shapes: they check the script; the targets are for the full run)")
    out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.gpu and plot(rows, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
