"""Benchmark the divergence family on logits: ``python benchmarks/family.py [--quick]``.

For each member (forward KL, reverse KL, generalized JSD with beta=0.5) on teacher and
student logits of shape ``--shape`` (default 8192x32768, float32, CPU; temperature 2), the
forward pass and the forward+backward pass (gradient w.r.t. the student only, the teacher
detached, as in distillation) of:

- ``kldiv``: the fast path (torch ``autograd.Function`` / JAX jit);
- ``kldiv-generic``: the generic array-API kernel (``kldiv.use_generic()``);
- ``torch-eager``: the usual formula, ``log_softmax`` of each side then ``F.kl_div(...,
  log_target=True)`` summed over the classes (TRL's mixture ``logsumexp`` for the JSD);
- ``torch-compile``: ``torch.compile`` of that formula (inductor);
- ``jax-jit``: the same formula with ``jax.nn.log_softmax`` under ``jax.jit``;
- ``optax``: ``optax.losses.kl_divergence_with_log_targets`` under ``jax.jit`` (forward and
  reverse KL only).

Each library runs in its own subprocess, one after the other (they would compete for cores
and memory). Reported: the median time of one call, its ratio to torch eager (``x eager``:
> 1 is faster) and to torch.compile, and the peak extra memory of one call: the process'
resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` before each
measurement, glibc told to return large blocks at once) minus the resident set before the
call, in units of one input's size. The issue's targets: forward+backward >= 2x torch eager,
within 1.2x of torch.compile, peak extra memory <= one input.

``--quick`` runs a tiny shape once, to check that the script works (numbers meaningless).
Prints a Markdown table and writes ``benchmarks/FAMILY.json`` (``--out`` to change the file;
nothing is written with ``--quick`` unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MEMBERS = ["kl", "reverse_kl", "js"]
TEMPERATURE = 2.0
BETA = 0.5


# ------------------------------------------------------------------------------ measuring
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


def measure(fn: Callable[[], Any], budget_s: float, reps: int | None) -> dict[str, Any]:
    """Median seconds of one call (after a warm-up), and the peak extra memory in MiB."""
    t0 = time.perf_counter()
    fn()  # warm-up: compilation, thread pools
    first = time.perf_counter() - t0
    n = reps if reps is not None else max(3, min(10, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    gc.collect()
    before = _rss_kib("VmRSS:")
    peak = None
    if _reset_hwm():
        fn()
        peak = max(0, _rss_kib("VmHWM:") - before) / 1024
    return {"median_s": statistics.median(times), "min_s": min(times), "n": n,
            "peak_extra_mib": peak}


# -------------------------------------------------------------------------------- torch
def _torch_group(shape: tuple[int, int], budget: float, reps: int | None) -> list[dict[str, Any]]:
    import math

    import torch
    import torch.nn.functional as F

    import kldiv
    from kldiv import _family

    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(shape, generator=gen) * 3
    student0 = torch.randn(shape, generator=gen) * 3

    def eager(member: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ls = F.log_softmax(s / TEMPERATURE, dim=-1)
        lt = F.log_softmax(t / TEMPERATURE, dim=-1)
        if member == "kl":
            return F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
        if member == "reverse_kl":
            return F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
        lm = torch.logsumexp(torch.stack([ls + math.log(1 - BETA), lt + math.log(BETA)]), dim=0)
        return (BETA * F.kl_div(lm, lt, reduction="none", log_target=True)
                + (1 - BETA) * F.kl_div(lm, ls, reduction="none", log_target=True)).sum(-1)

    def ours(member: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        fn = {"kl": _family.kl_divergence_family, "reverse_kl": _family.reverse_kl_divergence,
              "js": _family.js_divergence}[member]
        kw = {"beta": BETA} if member == "js" else {}
        out: torch.Tensor = fn(t, s, inputs="logits", temperature=TEMPERATURE, **kw)
        return out

    def generic(member: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with kldiv.use_generic():
            return ours(member, s, t)

    compiled: dict[str, Callable[..., torch.Tensor]] = {}

    def compiled_fn(member: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if member not in compiled:
            compiled[member] = torch.compile(lambda s, t, m=member: eager(m, s, t))
        return compiled[member](s, t)

    impls = {"kldiv": ours, "kldiv-generic": generic, "torch-eager": eager,
             "torch-compile": compiled_fn}
    impls = {k: v for k, v in impls.items() if k not in _skipped()}
    rows = []
    for member in MEMBERS:
        for name, impl in impls.items():
            for mode in ("forward", "forward+backward"):
                student = student0.clone().requires_grad_(mode != "forward")

                def call(impl: Any = impl, member: str = member, student: Any = student,
                         mode: str = mode) -> None:
                    if mode == "forward":
                        with torch.no_grad():
                            impl(member, student, teacher).sum().item()
                    else:
                        student.grad = None
                        impl(member, student, teacher).sum().backward()
                        student.grad = None

                try:
                    res = measure(call, budget, reps)
                except Exception as exc:  # a peer that cannot run here: say so, go on
                    res = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                rows.append({"member": member, "impl": name, "mode": mode, **res})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _skipped() -> set[str]:
    """Implementations left out (``--skip``, passed to the child processes by environment)."""
    return {x for x in os.environ.get("KLDIV_BENCH_SKIP", "").split(",") if x}


# ---------------------------------------------------------------------------------- jax
def _jax_group(shape: tuple[int, int], budget: float, reps: int | None) -> list[dict[str, Any]]:
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kldiv import _family

    rng = np.random.default_rng(0)
    teacher = jnp.asarray(rng.normal(0, 3, shape).astype(np.float32))
    student = jnp.asarray(rng.normal(0, 3, shape).astype(np.float32))

    def formula(member: str, s: Any, t: Any) -> Any:
        ls = jax.nn.log_softmax(s / TEMPERATURE, axis=-1)
        lt = jax.nn.log_softmax(t / TEMPERATURE, axis=-1)
        if member == "kl":
            return jnp.sum(jnp.exp(lt) * (lt - ls), -1)
        if member == "reverse_kl":
            return jnp.sum(jnp.exp(ls) * (ls - lt), -1)
        lm = jnp.logaddexp(lt + math.log(BETA), ls + math.log1p(-BETA))
        return jnp.sum(BETA * jnp.exp(lt) * (lt - lm) + (1 - BETA) * jnp.exp(ls) * (ls - lm), -1)

    def optax_fn(member: str, s: Any, t: Any) -> Any:
        import optax

        ls = jax.nn.log_softmax(s / TEMPERATURE, axis=-1)
        lt = jax.nn.log_softmax(t / TEMPERATURE, axis=-1)
        if member == "kl":
            return optax.losses.kl_divergence_with_log_targets(ls, lt)
        if member == "reverse_kl":
            return optax.losses.kl_divergence_with_log_targets(lt, ls)
        raise NotImplementedError("optax has no generalized JSD")

    def ours(member: str, s: Any, t: Any) -> Any:
        fn = {"kl": _family.kl_divergence_family, "reverse_kl": _family.reverse_kl_divergence,
              "js": _family.js_divergence}[member]
        kw = {"beta": BETA} if member == "js" else {}
        return fn(t, s, inputs="logits", temperature=TEMPERATURE, **kw)

    impls = {"kldiv": ours, "jax-jit": formula, "optax": optax_fn}
    impls = {k: v for k, v in impls.items() if k not in _skipped()}
    rows = []
    for member in MEMBERS:
        for name, impl in impls.items():
            for mode in ("forward", "forward+backward"):
                if mode == "forward":
                    fn = jax.jit(lambda s, t, impl=impl, m=member: jnp.sum(impl(m, s, t)))
                else:
                    fn = jax.jit(jax.grad(lambda s, t, impl=impl, m=member: jnp.sum(impl(m, s, t))))
                try:
                    res = measure(lambda fn=fn: fn(student, teacher).block_until_ready(), budget, reps)
                except Exception as exc:
                    res = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                rows.append({"member": member, "impl": name, "mode": mode, **res})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


GROUPS = {"torch": _torch_group, "jax": _jax_group}


# ------------------------------------------------------------------------------- driving
def _child(group: str, shape: tuple[int, int], budget: float, reps: int | None) -> None:
    rows = GROUPS[group](shape, budget, reps)
    print(json.dumps(rows))


def _table(rows: list[dict[str, Any]], input_mib: float) -> str:
    ref = {(r["member"], r["mode"], r["impl"]): r.get("median_s") for r in rows}
    lines = ["| member | mode | implementation | median | x eager | x compile | peak extra (inputs) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        head = f"| {r['member']} | {r['mode']} | {r['impl']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | |")
            continue
        t = r["median_s"]
        ratios = []
        for peer in ("torch-eager", "torch-compile"):
            other = ref.get((r["member"], r["mode"], peer))
            ratios.append("" if other is None else f"{other / t:.2f}")
        peak = r.get("peak_extra_mib")
        peak_s = "" if peak is None else f"{peak / input_mib:.2f}"
        lines.append(f"{head} {t * 1e3:.1f} ms | {ratios[0]} | {ratios[1]} | {peak_s} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape, once: checks the script")
    parser.add_argument("--shape", default="8192x32768", help="rows x classes (default 8192x32768)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--groups", default=",".join(GROUPS), help="torch,jax")
    parser.add_argument("--out", help="JSON results file (default benchmarks/FAMILY.json; "
                        "none with --quick)")
    parser.add_argument("--skip", default="", help="implementations to leave out, e.g. "
                        "kldiv-generic (comma-separated)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.skip:
        os.environ["KLDIV_BENCH_SKIP"] = args.skip
    shape_s = "64x1024" if args.quick else args.shape
    rows_n, cols_n = (int(v) for v in shape_s.lower().split("x"))
    reps = 1 if args.quick else None
    if args.child:
        _child(args.child, (rows_n, cols_n), args.budget, reps)
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    rows: list[dict[str, Any]] = []
    for group in args.groups.split(","):
        cmd = [sys.executable, __file__, "--child", group, "--shape", shape_s,
               "--budget", str(args.budget)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{group}: failed ({proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    input_mib = rows_n * cols_n * 4 / 2**20
    print(f"shape {rows_n}x{cols_n} float32 (one input: {input_mib:.1f} MiB), CPU, "
          f"temperature {TEMPERATURE}, beta {BETA}\n")
    print(_table(rows, input_mib))
    out = args.out or (None if args.quick else str(HERE / "FAMILY.json"))
    if out:
        Path(out).write_text(json.dumps({"shape": [rows_n, cols_n], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
