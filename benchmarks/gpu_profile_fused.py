"""Where the time of the fused linear divergence goes on a CUDA GPU (issue 13).

``python benchmarks/gpu_profile_fused.py [--out profile.json]``: at Liger's shape (N=8192,
H=4096, V=128256, bfloat16) times, with ``triton.testing.do_bench``, the pieces of one chunk
(1024 rows) as :mod:`kldiv.backends.torch_fused_chunks` runs them (the logits product with
bfloat16 or float32 output, the Triton chunk kernel, the gradient's rounding, the two gradient
products, the weight gradient accumulated in place or through a temporary), checks that the
in-place mixed-precision accumulation equals the temporary's, then profiles one whole
``fused_linear_divergence`` forward+backward per divergence (``torch.profiler``, the kernels
by CUDA time) and times it beside its peak memory. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from triton.testing import do_bench

import kldiv
from kldiv._fused_linear_math import Plan
from kldiv.backends import triton_fused

N, H, V, ROWS = 8192, 4096, 128256, 1024


def pieces(res: dict[str, Any], h: Any, W: Any, th: Any, tw: Any) -> dict[str, Any]:
    """The pieces of one chunk, each timed alone."""
    n, hid = h.shape
    v = W.shape[0]
    dt, f32 = torch.bfloat16, torch.float32
    hc = h[:ROWS]

    def bench(name: str, fn: Any) -> None:
        try:
            ms = do_bench(fn, warmup=5, rep=40)
        except Exception as exc:  # an op this torch lacks: say so, go on
            res[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(f"{name}: {res[name]}", flush=True)
            return
        res[name] = ms
        print(f"{name}: {ms:.3f} ms", flush=True)

    for rows in (512, 2048):  # the product's speed against the chunk's height
        bench(f"logits mm -> f32 (out_dtype), {rows} rows",
              lambda rows=rows: torch.mm(h[:rows], W.T, out_dtype=f32))
    bench("logits mm -> bf16", lambda: hc @ W.T)
    bench("logits mm -> f32 (out_dtype)", lambda: torch.mm(hc, W.T, out_dtype=f32))
    s = torch.mm(hc, W.T, out_dtype=f32)
    t = torch.mm(th[:ROWS], tw.T, out_dtype=f32)
    bench("logits mm -> f32 into buffer", lambda: torch.mm(hc, W.T, out_dtype=f32, out=s))
    sc = torch.ones(ROWS, device="cuda")
    for div in ("kl", "js"):
        plan = Plan(div, 0.5, 1.0, ROWS)
        bench(f"triton chunk kernel {div} (grad)",
              lambda plan=plan: triton_fused.chunk(s, t, None, None, sc, plan, True))
        bench(f"triton chunk kernel {div} (no grad)",
              lambda plan=plan: triton_fused.chunk(s, t, None, None, None, plan, False))
    g = torch.randn(ROWS, v, device="cuda") * 1e-5
    bench("grad f32 -> bf16", lambda: g.to(dt))
    g_lo = g.to(dt)
    dh = torch.empty(n, hid, device="cuda")
    bench("dh mm -> f32 into slice", lambda: torch.mm(g_lo, W, out_dtype=f32, out=dh[:ROWS]))
    bench("dh mm -> bf16", lambda: g_lo @ W)
    dW = torch.zeros(v, hid, device="cuda")
    bench("dW mm -> f32 temp + add_", lambda: dW.add_(torch.mm(g_lo.T, hc, out_dtype=f32)))
    bench("dW addmm -> f32 in place", lambda: torch.addmm(dW, g_lo.T, hc, out_dtype=f32, out=dW))
    dWb = torch.zeros(v, hid, device="cuda", dtype=dt)
    bench("dW addmm_ bf16 (Liger)", lambda: dWb.addmm_(g_lo.T, hc))
    try:  # the in-place accumulation equals the temporary's
        a = torch.zeros(v, hid, device="cuda")
        b = torch.zeros(v, hid, device="cuda")
        for _ in range(3):
            torch.addmm(a, g_lo.T, hc, out_dtype=f32, out=a)
            b.add_(torch.mm(g_lo.T, hc, out_dtype=f32))
        res["addmm in place vs temp: max abs diff"] = float((a - b).abs().max())
        res["addmm: max abs"] = float(b.abs().max())
        print("in place vs temp", res["addmm in place vs temp: max abs diff"], flush=True)
    except Exception as exc:
        res["addmm in place vs temp"] = f"{type(exc).__name__}: {exc}"[:300]
    return res


def whole(res: dict[str, Any], h: Any, W: Any, th: Any, tw: Any) -> None:
    """One whole forward+backward per divergence: time, peak memory, the kernels' profile."""
    def bench(name: str, fn: Any) -> None:
        res[name] = ms = do_bench(fn, warmup=3, rep=40)
        print(f"{name}: {ms:.3f} ms", flush=True)


    hs = h.clone().requires_grad_()
    Ws = W.clone().requires_grad_()
    for div in ("js", "kl"):
        def step(div: str = div) -> None:
            hs.grad = Ws.grad = None
            kldiv.fused_linear_divergence(hs, Ws, teacher_hidden=th, teacher_weight=tw,
                                          divergence=div).backward()
        step()
        torch.cuda.synchronize()
        hs.grad = Ws.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        res[f"kldiv {div} peak extra MiB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        bench(f"kldiv {div} fwd+bwd", step)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=14,
                                          max_name_column_width=70)
        res[f"kldiv {div} profile"] = table
        print(table, flush=True)
        print(f"kldiv {div} peak extra {res[f'kldiv {div} peak extra MiB']:.0f} MiB", flush=True)



def run(args: Any) -> int:
    n, hid, v = (int(x) for x in args.shape.split("x"))
    dt = torch.bfloat16
    torch.manual_seed(0)
    h = (torch.randn(n, hid, device="cuda") * 0.5).to(dt)
    W = (torch.randn(v, hid, device="cuda") * 0.05).to(dt)
    th = (torch.randn(n, hid, device="cuda") * 0.5).to(dt)
    tw = (torch.randn(v, hid, device="cuda") * 0.05).to(dt)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "shape": [n, hid, v]}
    pieces(res, h, W, th, tw)
    torch.cuda.empty_cache()
    whole(res, h, W, th, tw)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--shape", default=f"{N}x{H}x{V}")
    return run(ap.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
