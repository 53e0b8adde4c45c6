"""The divergence family on a GPU: kldiv beside torch, JAX/optax and CuPy peers, and a copy.

``python benchmarks/family_gpu.py [--shape 8192x32768] [--libs torch,jax,cupy] [--device cuda]
[--repeats 10] [--out results.json]``: for each member (KL, reverse KL, Jensen-Shannon with
beta 0.5) on float32 logits of the given shape (teacher and student ~ N(0, 2^2)), the time of
the forward (the per-row divergences) and of forward + backward (the gradient of the summed
divergence with respect to the student's logits, the teacher a constant, as in distillation),
and the extra memory of one call. Each library's section is optional: one that is not
installed, or has no device of the requested kind, prints a line and is skipped.

torch (CUDA only; unchanged from the first GPU run): times from ``triton.testing.do_bench``
(its default: the *mean* of the calls within 60 ms), peak extra memory of one forward +
backward (``torch.cuda.max_memory_allocated`` above the inputs and the student's gradient).
Rows:

- ``kldiv``: ``kldiv.<member>(teacher, student, inputs="logits")`` (on CUDA with Triton: the
  fused Triton kernels of ``kldiv.backends.triton_family``);
- ``kldiv (torch blocks)``: the same with the Triton route refused (the blocked torch path);
- ``eager``: ``log_softmax`` + ``F.kl_div(..., log_target=True)`` (JS: the ``logaddexp`` formula);
- ``compile``: ``torch.compile`` of the eager formula;
- ``liger``: Liger-Kernel's ``LigerKLDIVLoss`` / ``LigerJSD`` on ``log_softmax`` outputs (where
  installed; beta 0.5 is the same JSD in every convention);
- ``copy``: ``t.clone()`` (one input read, one written), same timer.

JAX (the GPU, or the CPU with ``--device cpu``): each function is ``jax.jit``-ed, lowered and
compiled ahead of the timing (the compile time is reported apart, then the first run's time);
the time is the median of ``--repeats`` calls (after 2 warm-up calls) on the host clock around
``jax.block_until_ready``. Forward: ``jax.jit(lambda t, s: f(t, s))``; forward + backward:
``jax.jit(jax.value_and_grad(lambda s, t: f(t, s).sum()))`` (the teacher an argument, not a
closed-over constant, so that it is not baked into the program). Memory: ``xla temp``, the
compiled program's scratch (``memory_analysis().temp_size_in_bytes``: beyond its arguments and
outputs, so the gradient is not counted), and, where the device reports it, the runtime's
``peak_bytes_in_use`` above ``bytes_in_use`` before the forward + backward, less the gradient.
That high-water mark cannot be reset: when this row did not raise it, the value shown is only an
upper bound (``<=``). Rows:

- ``kldiv (jax.jit)``: ``jax.jit`` of the public ``kldiv.<member>(t, s, inputs="logits")``;
- ``kldiv (eager call)``: the public function called on the arrays (forward only; it runs its
  own cached jit, ``kldiv.backends.jax_family``);
- ``jax.jit formula``: ``jax.nn.log_softmax`` of both sides and the definition;
- ``optax``: ``optax.losses.kl_divergence_with_log_targets`` on ``jax.nn.log_softmax`` outputs,
  jitted (KL and reverse KL; optax has no Jensen-Shannon);
- ``copy``: ``x.copy()`` of one input.

CuPy (CUDA only; forward only, CuPy has no autograd): median of ``--repeats`` calls (after 2
warm-up calls), each between two CUDA events on the current stream. Memory: the default memory
pool is emptied of its free blocks (``free_all_blocks``) before one call; the pool keeps every
block it hands out until told otherwise, so ``total_bytes()`` after the call less
``used_bytes()`` before it (the inputs) is the pool's high-water mark for that call: an upper
bound of the live peak (blocks are rounded to 512 bytes; a cached block too small to reuse
counts too), the result included. Rows:

- ``kldiv``: ``kldiv.<member>(t, s, inputs="logits")`` on CuPy arrays (whatever route the
  library takes there: its CuPy fast path where one exists, else the generic kernel; the
  header names it);
- ``kldiv generic``: the same inside ``kldiv.use_generic()`` (the generic array-API kernel);
- ``cupy formula``: log-softmax by max / exp / sum / log, then the definition, in CuPy;
- ``copy``: ``x.copy()`` of one input.

Bandwidth: the forward needs to read both inputs (2N values) and write one value per row; a
copy of one input moves the same 2N values (N read, N written). ``copy/fwd`` is the library's
copy time over the forward's time (1.00: the forward runs at copy bandwidth); ``copy/fwd+bwd``
is 1.5 x the copy time over the forward + backward's (its floor: read 2N, write the N-value
gradient). Each kldiv row of JAX and CuPy also says how far its result is from the library's
plain formula on the same arrays (max abs difference over max abs value; JAX: the gradient
too). Prints a JSON line per row, then a Markdown table; ``--out`` writes all rows as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import kldiv

try:
    import torch
    import torch.nn.functional as F
except Exception:  # the torch section says so and is skipped
    torch = None  # type: ignore[assignment]
    F = None  # type: ignore[assignment]

# torch, CuPy and JAX share the GPU: JAX must not take 75 % of it at start (read when jax is
# first imported, which only its section does).
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

BETA = 0.5
MEMBERS = ("kl", "reverse_kl", "js")
LIBS = ("torch", "jax", "cupy")
WARMUP = 2


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


def _kldiv(op: str) -> Callable[[Any, Any], Any]:
    """``kldiv.<member>(t, s, inputs="logits")``: the public function, for any library."""
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



# --------------------------------------------------------------------------- shared pieces
def _terms(xp: Any, op: str, lp: Any, lq: Any) -> Any:
    """The definition on log-probabilities (P the teacher, Q the student), per row."""
    if op == "kl":
        return xp.sum(xp.exp(lp) * (lp - lq), axis=-1)
    if op == "reverse_kl":
        return xp.sum(xp.exp(lq) * (lq - lp), axis=-1)
    lm = xp.logaddexp(lp + math.log(BETA), lq + math.log1p(-BETA))
    return (BETA * xp.sum(xp.exp(lp) * (lp - lm), axis=-1)
            + (1 - BETA) * xp.sum(xp.exp(lq) * (lq - lm), axis=-1))


def _log_softmax(xp: Any, x: Any) -> Any:
    """Log-softmax over the last axis by max, exp, sum and log (no library helper)."""
    z = x - x.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def _plain(xp: Any, op: str) -> Callable[[Any, Any], Any]:
    return lambda t, s: _terms(xp, op, _log_softmax(xp, t), _log_softmax(xp, s))


def _rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |b|, on the host."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def _route(lib: str, op: str) -> str:
    """Which function ``kldiv`` calls for ``op`` on ``lib`` (its fast path, or the generic)."""
    try:
        from kldiv import _switch

        fn = _switch.library_op(lib, op)
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"[:120]
    return "the generic kernel (no fast path)" if fn is None else f"{fn.__module__}.{fn.__name__}"


def _host_times(call: Callable[[], Any], repeats: int) -> dict[str, float]:
    """First call's seconds, then the median and min ms of ``repeats`` after a warm-up;
    ``call`` must wait for the device itself."""
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"first_s": first, "median_ms": statistics.median(times), "min_ms": min(times)}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


# ----------------------------------------------------------------------------------- torch
def _torch_section(rows_n: int, cols_n: int, device: str, notes: list[str]) -> list[dict[str, Any]]:
    if torch is None:
        notes.append("torch: not importable; torch section skipped")
        return []
    if device != "cuda" or not torch.cuda.is_available():
        notes.append(f"torch: no CUDA device (--device {device}); torch section skipped")
        return []
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(rows_n, cols_n, device="cuda", generator=gen) * 2
    s = torch.randn(rows_n, cols_n, device="cuda", generator=gen).mul_(2).requires_grad_(True)
    from kldiv.backends import torch_family

    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; kldiv route for kl: "
          f"{_route('torch', 'kl')}", flush=True)
    results: list[dict[str, Any]] = []
    try:
        from triton.testing import do_bench

        with torch.no_grad():
            r = {"lib": "torch", "op": "copy", "impl": "copy (t.clone(), one input)",
                 "copy_ms": do_bench(lambda: t.clone(), warmup=5, rep=60)}
    except Exception as exc:
        r = {"lib": "torch", "op": "copy", "impl": "copy (t.clone(), one input)",
             "error": _error(exc)}
    results.append(r)
    print(json.dumps(r), flush=True)
    for op in MEMBERS:
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
                r = {"lib": "torch", "op": op, "impl": impl, **_measure(fn, t, s)}
            except Exception as exc:  # a peer that fails here is reported, not fatal
                r = {"lib": "torch", "op": op, "impl": impl, "error": _error(exc)}
            finally:
                torch_family._triton = saved
            results.append(r)
            print(json.dumps(r), flush=True)
    return results


# ------------------------------------------------------------------------------------- jax
def _jax_device(device: str, notes: list[str]) -> Any:
    try:
        import jax
    except Exception as exc:
        notes.append(f"jax: not importable ({_error(exc)}); JAX section skipped")
        return None
    try:
        return jax.devices("gpu" if device == "cuda" else "cpu")[0]
    except Exception:
        notes.append(f"jax: no {'GPU' if device == 'cuda' else 'CPU'} device (its backend: "
                     f"{jax.default_backend()}); JAX section skipped")
        return None


def _jax_memory(dev: Any) -> dict[str, int] | None:
    try:
        stats = dev.memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return {"in_use": int(stats.get("bytes_in_use", 0)), "peak": int(stats["peak_bytes_in_use"])}


def _jax_run(jitted: Any, args: tuple[Any, ...], repeats: int) -> dict[str, Any]:
    """Compile ``jitted`` for ``args`` ahead of time, then time the compiled program."""
    import jax

    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    out: dict[str, Any] = {"compile_s": time.perf_counter() - t0, "compiled": compiled}
    timed = _host_times(lambda: jax.block_until_ready(compiled(*args)), repeats)
    out.update(timed)
    try:
        mem = compiled.memory_analysis()
        out["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
    except Exception:
        pass
    return out


def _jax_section(rows_n: int, cols_n: int, device: str, repeats: int,
                 notes: list[str]) -> list[dict[str, Any]]:
    dev = _jax_device(device, notes)
    if dev is None:
        return []
    import jax
    import jax.numpy as jnp

    try:
        import optax
    except Exception as exc:
        optax = None
        notes.append(f"jax: optax not importable ({_error(exc)}); its rows skipped")
    with jax.default_device(dev):
        kt, ks = jax.random.split(jax.random.key(0))
        t = jax.random.normal(kt, (rows_n, cols_n), jnp.float32) * 2
        s = jax.random.normal(ks, (rows_n, cols_n), jnp.float32) * 2
        jax.block_until_ready((t, s))
    grad_mib = s.nbytes / 2**20
    print(f"jax {jax.__version__} on {dev.device_kind} ({dev.platform}); kldiv route for kl: "
          f"{_route('jax', 'kl')}", flush=True)
    results: list[dict[str, Any]] = []
    try:
        r = {"lib": "jax", "op": "copy", "impl": "copy (x.copy(), one input)"}
        timed = _host_times(lambda: t.copy().block_until_ready(), repeats)
        r["copy_ms"] = timed["median_ms"]
    except Exception as exc:
        r["error"] = _error(exc)
    results.append(r)
    print(json.dumps(r), flush=True)

    def formula(op: str) -> Callable[[Any, Any], Any]:
        return lambda t, s: _terms(jnp, op, jax.nn.log_softmax(t, axis=-1),
                                   jax.nn.log_softmax(s, axis=-1))

    def optax_fn(op: str) -> Callable[[Any, Any], Any] | None:
        if optax is None or op == "js":
            return None
        kl = optax.losses.kl_divergence_with_log_targets  # sum(exp(targets) * (targets - preds))
        if op == "kl":  # KL(P || Q): the teacher is the target
            return lambda t, s: kl(jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1))
        return lambda t, s: kl(jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1))

    for op in MEMBERS:
        impls: dict[str, Callable[[Any, Any], Any] | None] = {
            "kldiv (jax.jit)": _kldiv(op), "kldiv (eager call)": _kldiv(op),
            "jax.jit formula": formula(op),
            "optax kl_divergence_with_log_targets (jax.jit)": optax_fn(op)}
        op_rows: list[dict[str, Any]] = []
        programs: dict[str, tuple[Any, Any]] = {}  # impl -> compiled forward, value-and-grad
        for impl, fn in impls.items():
            if fn is None:
                continue
            r = {"lib": "jax", "op": op, "impl": impl}
            op_rows.append(r)
            try:
                if impl == "kldiv (eager call)":  # forward only: the public call as users make it
                    timed = _host_times(lambda fn=fn: fn(t, s).block_until_ready(), repeats)
                    r.update(fwd_ms=timed["median_ms"], fwd_min_ms=timed["min_ms"],
                             first_fwd_s=timed["first_s"])
                    continue
                fwd = _jax_run(jax.jit(lambda t, s, fn=fn: fn(t, s)), (t, s), repeats)
                r.update(fwd_ms=fwd["median_ms"], fwd_min_ms=fwd["min_ms"],
                         compile_fwd_s=fwd["compile_s"], first_fwd_s=fwd["first_s"],
                         xla_temp_fwd_mib=fwd.get("xla_temp_mib"))
                vg = jax.jit(jax.value_and_grad(lambda s, t, fn=fn: fn(t, s).sum()))
                gc.collect()
                before = _jax_memory(dev)
                bwd = _jax_run(vg, (s, t), repeats)
                after = _jax_memory(dev)
                r.update(fwd_bwd_ms=bwd["median_ms"], fwd_bwd_min_ms=bwd["min_ms"],
                         compile_fwd_bwd_s=bwd["compile_s"], first_fwd_bwd_s=bwd["first_s"],
                         xla_temp_fwd_bwd_mib=bwd.get("xla_temp_mib"))
                if before is not None and after is not None:
                    r["peak_extra_mib"] = (after["peak"] - before["in_use"]) / 2**20 - grad_mib
                    r["peak_exact"] = after["peak"] > before["peak"]
                programs[impl] = (fwd["compiled"], bwd["compiled"])
            except Exception as exc:  # a peer that fails here is reported, not fatal
                r["error"] = _error(exc)
            finally:
                print(json.dumps(r), flush=True)
        try:  # kldiv against the plain formula on the same arrays: values and gradients
            if "jax.jit formula" in programs:
                ref_fwd, ref_vg = programs["jax.jit formula"]
                ref, ref_grad = ref_fwd(t, s), ref_vg(s, t)[1]
                for r in op_rows:
                    if r["impl"] == "kldiv (eager call)" and "error" not in r:
                        r["diff_fwd"] = _rel_diff(_kldiv(op)(t, s), ref)
                    elif r["impl"] in programs and r["impl"].startswith("kldiv"):
                        fwd_p, vg_p = programs[r["impl"]]
                        r["diff_fwd"] = _rel_diff(fwd_p(t, s), ref)
                        r["diff_grad"] = _rel_diff(vg_p(s, t)[1], ref_grad)
                del ref, ref_grad
        except Exception as exc:
            notes.append(f"jax {op}: the agreement check failed ({_error(exc)})")
        programs.clear()
        results.extend(op_rows)
    return results


# ------------------------------------------------------------------------------------ cupy
def _cupy_section(rows_n: int, cols_n: int, device: str, repeats: int,
                  notes: list[str]) -> list[dict[str, Any]]:
    if device != "cuda":
        notes.append(f"cupy: CUDA only (--device {device}); CuPy section skipped")
        return []
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        notes.append(f"cupy: not usable ({_error(exc)}); CuPy section skipped")
        return []
    pool = cp.get_default_memory_pool()
    rng = cp.random.RandomState(0)
    t = rng.standard_normal((rows_n, cols_n), dtype=cp.float32)
    s = rng.standard_normal((rows_n, cols_n), dtype=cp.float32)
    t *= 2
    s *= 2
    cp.cuda.Device().synchronize()
    print(f"cupy {cp.__version__}; kldiv route for kl: {_route('cupy', 'kl')}, reverse_kl: "
          f"{_route('cupy', 'reverse_kl')}, js: {_route('cupy', 'js')}", flush=True)

    def timed(call: Callable[[], Any]) -> dict[str, float]:
        t0 = time.perf_counter()
        call()
        cp.cuda.Device().synchronize()
        first = time.perf_counter() - t0
        for _ in range(WARMUP):
            call()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(repeats):
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        return {"first_s": first, "median_ms": statistics.median(times), "min_ms": min(times)}

    def pool_peak(call: Callable[[], Any]) -> float:
        gc.collect()
        pool.free_all_blocks()
        used = pool.used_bytes()
        out = call()
        cp.cuda.Device().synchronize()
        peak = pool.total_bytes() - used
        del out
        return peak / 2**20

    results: list[dict[str, Any]] = []
    r: dict[str, Any] = {"lib": "cupy", "op": "copy", "impl": "copy (x.copy(), one input)"}
    try:
        r["copy_ms"] = timed(lambda: t.copy())["median_ms"]
    except Exception as exc:
        r["error"] = _error(exc)
    results.append(r)
    print(json.dumps(r), flush=True)

    def generic(op: str) -> Callable[[Any, Any], Any]:
        def call(t: Any, s: Any) -> Any:
            with kldiv.use_generic():
                return _kldiv(op)(t, s)

        return call

    for op in MEMBERS:
        impls = {"kldiv": _kldiv(op), "kldiv generic (use_generic)": generic(op),
                 "cupy formula": _plain(cp, op)}
        reference = None
        for impl, fn in impls.items():
            r = {"lib": "cupy", "op": op, "impl": impl}
            try:
                res = timed(lambda fn=fn: fn(t, s))
                r.update(fwd_ms=res["median_ms"], fwd_min_ms=res["min_ms"],
                         first_fwd_s=res["first_s"],
                         peak_extra_mib=pool_peak(lambda fn=fn: fn(t, s)), peak_exact=True)
            except Exception as exc:
                r["error"] = _error(exc)
            results.append(r)
        try:  # agreement with the plain formula on the same arrays
            reference = cp.asnumpy(impls["cupy formula"](t, s))
            for r in results[-3:-1]:
                if "error" not in r:
                    r["diff_fwd"] = _rel_diff(cp.asnumpy(impls[r["impl"]](t, s)), reference)
        except Exception as exc:
            notes.append(f"cupy {op}: the agreement check failed ({_error(exc)})")
        for r in results[-3:]:
            print(json.dumps(r), flush=True)
    return results


# ----------------------------------------------------------------------------------- table
BASELINE = {"torch": "eager", "jax": "jax.jit formula", "cupy": "cupy formula"}


def _ms(x: Any) -> str:
    return "" if x is None else f"{x:.2f} ms"


def _dur(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.0f} ms"


def _table(results: list[dict[str, Any]]) -> str:
    copies = {r["lib"]: r.get("copy_ms") for r in results if r.get("op") == "copy"}
    lines = ["| library | member | implementation | fwd | fwd+bwd | first fwd / fwd+bwd "
             "(compile) | peak extra (fwd+bwd; CuPy fwd) | xla temp fwd / fwd+bwd | copy/fwd | "
             "1.5 copy/fwd+bwd | plain/this fwd / fwd+bwd | diff vs plain fwd, grad |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lib = r["lib"]
        head = f"| {lib} | {r['op']} | {r['impl']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | | | | | |")
            continue
        if r["op"] == "copy":
            lines.append(f"{head} {_ms(r['copy_ms'])} (copy) | | | | | | | | |")
            continue
        fwd, fb = r.get("fwd_ms"), r.get("fwd_bwd_ms")
        first = " / ".join(_dur(r[k]) for k in ("first_fwd_s", "first_fwd_bwd_s") if k in r)
        compiles = " / ".join(_dur(r[k]) for k in ("compile_fwd_s", "compile_fwd_bwd_s") if k in r)
        if compiles:
            first += f" ({compiles})"
        peak = r.get("peak_extra_mib")
        peak_s = "" if peak is None else f"{'' if r.get('peak_exact', True) else '<= '}{peak:.{1 if peak < 10 else 0}f} MiB"
        xla = " / ".join(f"{r[k]:.1f}" for k in ("xla_temp_fwd_mib", "xla_temp_fwd_bwd_mib")
                         if r.get(k) is not None)
        xla += " MiB" if xla else ""
        copy = copies.get(lib)
        cf = "" if copy is None or not fwd else f"{copy / fwd:.2f}"
        cfb = "" if copy is None or not fb else f"{1.5 * copy / fb:.2f}"
        base = next((x for x in results if x["lib"] == lib and x["op"] == r["op"]
                     and x["impl"] == BASELINE[lib] and "error" not in x), None)
        vs = ""
        if base is not None:
            vs = " / ".join(f"{b / a:.2f}x" if a and b else "-"
                            for a, b in ((fwd, base.get("fwd_ms")), (fb, base.get("fwd_bwd_ms"))))
        diff = ", ".join(f"{r[k]:.1e}" for k in ("diff_fwd", "diff_grad") if k in r)
        lines.append(f"{head} {_ms(fwd)} | {_ms(fb)} | {first} | {peak_s} | {xla} | {cf} | "
                     f"{cfb} | {vs} | {diff} |")
    return "\n".join(lines)


def _release() -> None:
    """Give a finished section's cached GPU memory back to the device for the next one."""
    gc.collect()
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        if "cupy" in sys.modules:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
    except Exception:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8192x32768", help="rows x classes (default 8192x32768)")
    ap.add_argument("--libs", default=",".join(LIBS), help="sections to run (default all: "
                    "torch,jax,cupy)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: JAX on the CPU, torch and CuPy skipped (a smoke test)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per JAX/CuPy row")
    ap.add_argument("--out", default=None, help="write all rows here as JSON")
    args = ap.parse_args()
    try:
        rows_n, cols_n = (int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape takes ROWSxCLASSES, e.g. 8192x32768; got {args.shape!r}")
    libs = [x.strip() for x in args.libs.split(",") if x.strip()]
    unknown = sorted(set(libs) - set(LIBS))
    if unknown or not libs:
        ap.error(f"--libs takes some of {','.join(LIBS)}; got {args.libs!r}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    print(f"shape {rows_n}x{cols_n} float32 logits, one input {rows_n * cols_n * 4 / 2**20:.1f} "
          f"MiB; --device {args.device}; libraries {','.join(libs)}", flush=True)
    notes: list[str] = []
    results: list[dict[str, Any]] = []
    versions: dict[str, str] = {}
    sections = {"torch": lambda: _torch_section(rows_n, cols_n, args.device, notes),
                "jax": lambda: _jax_section(rows_n, cols_n, args.device, args.repeats, notes),
                "cupy": lambda: _cupy_section(rows_n, cols_n, args.device, args.repeats, notes)}
    for lib in LIBS:
        if lib not in libs:
            continue
        t0 = time.perf_counter()
        try:
            results.extend(sections[lib]())
        except Exception as exc:  # one library's failure never stops the others
            notes.append(f"{lib}: section failed: {_error(exc)}")
        _release()
        if lib in sys.modules:
            versions[lib] = getattr(sys.modules[lib], "__version__", "?")
        print(f"{lib} section: {time.perf_counter() - t0:.1f} s", flush=True)
        for note in notes:
            if note.startswith(lib):
                print(note, flush=True)
    name = args.device
    if args.device == "cuda" and torch is not None and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    print(f"\n{name}; times: torch do_bench mean, JAX/CuPy median of {args.repeats}; plain: "
          f"{', '.join(f'{k} {v!r}' for k, v in BASELINE.items())}")
    print(_table(results))
    if notes:
        print("\n" + "\n".join(notes))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "torch": versions.get("torch"), "versions": versions,
                       "shape": [rows_n, cols_n], "repeats": args.repeats, "notes": notes,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
