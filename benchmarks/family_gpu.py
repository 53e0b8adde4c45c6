"""The divergence family on a CUDA GPU, beside torch eager, ``torch.compile`` and Liger-Kernel.

``python benchmarks/family_gpu.py [--shape 8192x32768] [--out results.json]``: for each member
(KL, reverse KL, Jensen-Shannon with beta 0.5) on float32 logits of the given shape, the
median time of the forward and of forward + backward (gradient of the student's logits, the
teacher a constant, as in distillation), measured with ``triton.testing.do_bench``, and the
peak extra GPU memory of one forward + backward (``torch.cuda.max_memory_allocated`` above the
inputs and the student's gradient). Rows:

- ``kldiv``: ``kldiv.<member>(teacher, student, inputs="logits")`` (on CUDA with Triton: the
  fused Triton kernels of ``kldiv.backends.triton_family``);
- ``kldiv (torch blocks)``: the same with the Triton route refused (the blocked torch path);
- ``eager``: ``log_softmax`` + ``F.kl_div(..., log_target=True)`` (JS: the ``logaddexp`` formula);
- ``compile``: ``torch.compile`` of the eager formula;
- ``liger``: Liger-Kernel's ``LigerKLDIVLoss`` / ``LigerJSD`` on ``log_softmax`` outputs (where
  installed; beta 0.5 is the same JSD in every convention).

Needs a CUDA GPU; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import kldiv

BETA = 0.5


def _eager(op: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        lp, lq = F.log_softmax(t, -1), F.log_softmax(s, -1)
        if op == "kl":  # KL(P || Q), P the teacher
            return F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
        if op == "reverse_kl":
            return F.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
        lm = torch.logaddexp(lp + math.log(BETA), lq + math.log(1 - BETA))
        return (BETA * F.kl_div(lm, lp, log_target=True, reduction="none").sum(-1)
                + (1 - BETA) * F.kl_div(lm, lq, log_target=True, reduction="none").sum(-1))

    return kl


def _kldiv(op: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    fn = {"kl": kldiv.kl_divergence, "reverse_kl": kldiv.reverse_kl_divergence}.get(op)
    if fn is not None:
        return lambda t, s: fn(t, s, inputs="logits")
    return lambda t, s: kldiv.js_divergence(t, s, beta=BETA, inputs="logits")


def _liger(op: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception:
        return None
    if op == "kl":
        loss = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda t, s: loss(F.log_softmax(s, -1), F.log_softmax(t, -1))
    if op == "js":
        jsd = LigerJSD(beta=BETA)
        return lambda t, s: jsd(F.log_softmax(s, -1), F.log_softmax(t, -1))
    return None


def _measure(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], t: torch.Tensor,
             s: torch.Tensor) -> dict[str, Any]:
    from triton.testing import do_bench

    def fwd() -> Any:
        with torch.no_grad():
            return fn(t, s)

    def fwd_bwd() -> Any:
        s.grad = None
        fn(t, s).sum().backward()

    fwd_bwd()  # compile / autotune / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {"fwd_ms": do_bench(fwd, warmup=5, rep=60), "fwd_bwd_ms": do_bench(fwd_bwd, warmup=5, rep=60),
            "peak_extra_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8192x32768")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, cols = (int(x) for x in args.shape.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(rows, cols, device="cuda", generator=gen) * 2
    s = torch.randn(rows, cols, device="cuda", generator=gen).mul_(2).requires_grad_(True)
    from kldiv.backends import torch_family

    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, shape {rows}x{cols} float32 logits; one input "
          f"{t.numel() * 4 / 2**20:.0f} MiB")
    results = []
    for op in ("kl", "reverse_kl", "js"):
        impls: dict[str, Any] = {"kldiv": _kldiv(op), "kldiv (torch blocks)": None,
                                 "eager": _eager(op), "compile": torch.compile(_eager(op)),
                                 "liger": _liger(op)}
        for impl, fn in impls.items():
            saved = torch_family._triton
            try:
                if impl == "kldiv (torch blocks)":
                    torch_family._triton = None  # the Triton route refused
                    fn = _kldiv(op)
                if fn is None:
                    continue
                r = {"op": op, "impl": impl, **_measure(fn, t, s)}
            except Exception as exc:  # a peer that fails here is reported, not fatal
                r = {"op": op, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:200]}
            finally:
                torch_family._triton = saved
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| member | implementation | fwd | fwd+bwd | peak extra (fwd+bwd) | fwd+bwd vs eager |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        if "error" in r:
            print(f"| {r['op']} | {r['impl']} | {r['error']} | | | |")
            continue
        eager = next(x for x in results if x["op"] == r["op"] and x["impl"] == "eager")
        ratio = eager.get("fwd_bwd_ms", float("nan")) / r["fwd_bwd_ms"]
        print(f"| {r['op']} | {r['impl']} | {r['fwd_ms']:.2f} ms | {r['fwd_bwd_ms']:.2f} ms | "
              f"{r['peak_extra_mib']:.0f} MiB | {ratio:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "shape": [rows, cols],
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
