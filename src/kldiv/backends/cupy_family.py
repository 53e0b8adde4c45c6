"""CuPy fast path of the divergence family: one CUDA kernel per call, one thread block per row.

The generic kernel, run on CuPy arrays, launches a few dozen elementwise and reduction
kernels, each with a full-size result (the log-softmax of each side, the masks, the terms).
Here one ``cupy.RawKernel`` (:data:`SOURCE`, templated on the dtype, each side's input space
and the member) reads the inputs and writes one value per row. Each block of
:data:`THREADS` threads takes a row (a grid-stride loop over the rows), its threads stride
over the class axis, and:

1. for each ``"logits"`` side, finds the row's maximum and the log-sum-exp of
   ``(x - max) / T`` online (a running maximum of the raw logits and a sum of ``exp`` rescaled
   as the maximum grows, per thread, then merged across the block with warp shuffles and
   shared memory; the shift comes before the division, so a tiny temperature gives the
   one-hot limit instead of overflowing ``x / T``);
2. brings each side to log space as :func:`kldiv._spaces.to_log_space` does (``"probs"``:
   ``log(clip(x, 1e-7, 1))``; ``"log_probs"``: ``x``; ``"logits"``: ``(x - max) / T -
   log(sum)``) and sums the member's terms over the row (block reduction), once.

The terms are the generic kernels' (:func:`kldiv._divergence.kl_terms`,
:func:`kldiv._divergence.js_parts`), element by element, so that every edge case comes out
the same: an entry with ``lp = -inf`` contributes 0 (``0 log 0 = 0``), ``lq = -inf`` where
``lp > -inf`` gives ``+inf`` (also when ``exp(lp)`` underflows), the JS mixture is CuPy's
``logaddexp`` on safe operands, a row of all ``-inf`` logits is the zero measure (its
log-normaliser 0), and a NaN or ``+inf`` logit makes its whole row NaN (the generic
max-shift gives ``NaN - NaN`` or ``inf - inf`` there); NaN inputs elsewhere propagate
through the same arithmetic. Values agree with the generic kernel to rounding (the row sums
are taken in another order, and the compiler may contract a product into an addition).

Inputs are read where they lie through a row and a column stride (a broadcast row or class
axis has stride 0: no copy); only a side whose broadcast cannot be viewed as ``(rows,
classes)`` (e.g. ``(B, 1, V)`` against ``(B, S, V)``), whose class axis is not unit-strided or
whose data is misaligned is copied once, contiguous: one full-size temporary at most per
side, where the generic kernel makes several. CuPy has no autograd, so there is no backward
pass. Kernels are compiled lazily, the first time each (dtype, spaces, member) combination
runs, and kept for the process (and in CuPy's on-disk kernel cache).

Every function takes arrays already converted by the dispatch (:mod:`kldiv._dispatch`: one
device, one dtype, float32 or float64 -- float16/bfloat16 arrive as float32 -- and
broadcastable shapes) and returns the per-row divergence over the last axis, leading axes
kept, in that dtype; or ``NotImplemented`` (the generic kernel then runs) for anything else:
other array types, dtypes or devices, 0-d or empty results, and a ``"logits"`` side whose
class axis is broadcast (the dispatch refuses those with a ``ValueError`` first).
"""

from __future__ import annotations

import math
from typing import Any

import cupy as cp
import numpy as np

from .._kernel import EPSILON
from .._spaces import broadcast_shapes
from .._temperature import temperature_flat, temperature_limit

__all__ = ["MAX_BLOCKS", "SOURCE", "THREADS", "js", "kl", "reverse_kl"]

THREADS = 256
"""Threads of a block (a row); fewer, a multiple of 32, for rows of fewer classes."""
MAX_BLOCKS = 1 << 20
"""Blocks of one launch at most; each takes every ``MAX_BLOCKS``-th row after its first."""

_KINDS = {"probs": 0, "log_probs": 1, "logits": 2}
_OPS = {"kl": 0, "js": 1}
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

SOURCE = r"""
// kldiv: the divergence family on CuPy (kldiv/backends/cupy_family.py). One thread block per
// row (grid-stride over the rows), blockDim.x a multiple of 32, at most 1024.
#define KLDIV_PROBS 0
#define KLDIV_LOG_PROBS 1
#define KLDIV_LOGITS 2
#define KLDIV_KL 0
#define KLDIV_JS 1
#define KLDIV_FULL_MASK 0xffffffffu

// the overloads CuPy's float32 / float64 ufuncs call
__device__ __forceinline__ float kldiv_exp(float x) { return expf(x); }
__device__ __forceinline__ double kldiv_exp(double x) { return exp(x); }
__device__ __forceinline__ float kldiv_log(float x) { return logf(x); }
__device__ __forceinline__ double kldiv_log(double x) { return log(x); }
__device__ __forceinline__ float kldiv_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double kldiv_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float kldiv_inf(float) { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double kldiv_inf(double) {
    return __longlong_as_double(0x7ff0000000000000LL);
}
__device__ __forceinline__ float kldiv_nan(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double kldiv_nan(double) {
    return __longlong_as_double(0x7ff8000000000000LL);
}

// ---- block reductions (every warp full: blockDim.x is a multiple of 32)
template <typename T>
__device__ __forceinline__ T kldiv_warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(KLDIV_FULL_MASK, v, o);
    return v;  // lane 0 holds the warp's sum
}

// The sum of v over the block, returned to every thread. sh: 32 shared elements, free on
// entry and on return.
template <typename T>
__device__ T kldiv_block_sum(T v, T* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = kldiv_warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < n_warps ? sh[lane] : (T)0;
        v = kldiv_warp_sum(v);
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    v = sh[0];
    __syncthreads();  // sh is free again
    return v;
}

// (m, s) += (m2, s2) for the online log-sum-exp: m is a maximum of the raw logits x, s a
// sum of exp((x - m) / t) over x > -inf. Neither m is NaN or +inf; m = -inf only with s = 0
// (no term), kept so (never -inf - -inf).
template <typename T>
__device__ __forceinline__ void kldiv_lse_merge(T& m, T& s, T m2, T s2, T t) {
    const T hi = m > m2 ? m : m2;
    if (hi == -kldiv_inf(hi)) {
        s = (T)0;
    } else {
        s = s * kldiv_exp((m - hi) / t) + s2 * kldiv_exp((m2 - hi) / t);  // exp(-inf) = 0
    }
    m = hi;
}

// One row of logits: log_softmax(x / T) = (x - shift) / T - log_s, as the generic
// kldiv._spaces.log_softmax computes it: shift = max(x) (0 for a row of all -inf),
// log_s = log(sum(exp((x - shift) / T))) (log 1 = 0 for a row of all -inf). The shift
// comes before the division, so a tiny T cannot overflow x / T (inf - inf: NaN). A NaN or
// +inf in x makes both NaN, so the whole row is NaN as in the generic kernel (its max is NaN,
// or +inf and then inf - inf = NaN in its sum). sh: 64 shared elements, free on entry and
// on return. Every thread of the block must call it.
template <typename T>
__device__ void kldiv_row_lse(const T* __restrict__ x, long long n, long long stride,
                              T temperature, T* sh, T& shift, T& log_s) {
    const T inf = kldiv_inf(temperature);
    T m = -inf;
    T s = (T)0;
    int bad = 0;
    for (long long c = threadIdx.x; c < n; c += blockDim.x) {
        const T v = x[c * stride];
        if (v != v || v == inf) {
            bad = 1;
        } else if (v > m) {  // a new maximum (m = -inf before: s = 0 * 0)
            s = s * kldiv_exp((m - v) / temperature) + (T)1;
            m = v;
        } else if (v != -inf) {  // -inf <= v <= m: m is finite
            s += kldiv_exp((v - m) / temperature);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const T m2 = __shfl_down_sync(KLDIV_FULL_MASK, m, o);
        const T s2 = __shfl_down_sync(KLDIV_FULL_MASK, s, o);
        kldiv_lse_merge(m, s, m2, s2, temperature);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    if (lane == 0) {
        sh[warp] = m;
        sh[32 + warp] = s;
    }
    const int any_bad = __syncthreads_or(bad);  // also the barrier for sh
    if (warp == 0) {
        m = lane < n_warps ? sh[lane] : -inf;
        s = lane < n_warps ? sh[32 + lane] : (T)0;
        for (int o = 16; o > 0; o >>= 1) {
            const T m2 = __shfl_down_sync(KLDIV_FULL_MASK, m, o);
            const T s2 = __shfl_down_sync(KLDIV_FULL_MASK, s, o);
            kldiv_lse_merge(m, s, m2, s2, temperature);
        }
        if (lane == 0) {
            sh[0] = m;
            sh[32] = s;
        }
    }
    __syncthreads();
    m = sh[0];
    s = sh[32];
    __syncthreads();  // sh is free again
    if (any_bad) {
        shift = kldiv_nan(m);
        log_s = shift;
    } else {
        shift = m == -inf ? (T)0 : m;
        log_s = kldiv_log(s == (T)0 ? (T)1 : s);
    }
}

// One element in log space (kldiv._spaces.to_log_space).
template <typename T, int K>
__device__ __forceinline__ T kldiv_to_log(T x, T temperature, T shift, T log_s) {
    if (K == KLDIV_PROBS) {
        const T lo = (T)KLDIV_EPSILON;
        x = x < lo ? lo : (x > (T)1 ? (T)1 : x);  // CuPy's clip: NaN passes
        return kldiv_log(x);
    }
    if (K == KLDIV_LOGITS) return (x - shift) / temperature - log_s;
    return x;
}

// exp(la) * (la - lb) with 0 log 0 = 0 (kldiv._divergence.kl_terms, element by element)
template <typename T>
__device__ __forceinline__ T kldiv_kl_term(T la, T lb) {
    const T inf = kldiv_inf(la);
    if (la == -inf) return (T)0;
    const T pa = kldiv_exp(la);
    const T d = la - lb;
    // underflow: 0, or +inf against lb = -inf, NaN against a NaN (P is not 0 there)
    if (pa == (T)0) return d < inf ? (T)0 : d;
    return pa * d;
}

// cupy.logaddexp's formula (what the generic kernel calls on CuPy arrays)
template <typename T>
__device__ __forceinline__ T kldiv_logaddexp(T a, T b) {
    if (a == b) return (T)((double)a + 0.69314718055994530942);  // in0 + log(2.0)
    const T hi = a > b ? a : b;  // with a NaN operand the result is NaN either way
    const T d = a - b;
    return hi + kldiv_log1p(kldiv_exp(-(d < (T)0 ? -d : d)));
}

// the terms of KL(P || M) and KL(Q || M) (kldiv._divergence.js_parts, element by element)
template <typename T>
__device__ __forceinline__ void kldiv_js_terms(T lp, T lq, T log_b, T log_1mb, T& acc_p,
                                               T& acc_q) {
    const T inf = kldiv_inf(lp);
    const bool zp = lp == -inf;
    const bool zq = lq == -inf;
    if (zp) lp = (T)0;
    if (zq) lq = (T)0;
    const T sp = lp + log_b;
    const T sq = lq + log_1mb;
    const T lm = zp ? sq : (zq ? sp : kldiv_logaddexp(sp, sq));
    if (!zp) acc_p += kldiv_exp(lp) * (lp - lm);
    if (!zq) acc_q += kldiv_exp(lq) * (lq - lm);
}

// out[row] = the member's divergence of row `row` of a (side A) and b (side B), read at
// a[row * sa_r + c * sa_c]. OP = KLDIV_KL: KL(A || B); KLDIV_JS: beta KL(A || M) +
// (1 - beta) KL(B || M). Every index is 64-bit.
template <typename T, int KA, int KB, int OP>
__device__ __forceinline__ void kldiv_family_rows(
        const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
        long long n_rows, long long n_cols, long long sa_r, long long sa_c, long long sb_r,
        long long sb_c, T temperature, T beta, T one_m_beta, T log_b, T log_1mb, T* sh) {
    for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {  // uniform per block
        const T* ra = a + row * sa_r;
        const T* rb = b + row * sb_r;
        T shift_a = (T)0, log_s_a = (T)0, shift_b = (T)0, log_s_b = (T)0;
        if (KA == KLDIV_LOGITS) kldiv_row_lse(ra, n_cols, sa_c, temperature, sh, shift_a, log_s_a);
        if (KB == KLDIV_LOGITS) kldiv_row_lse(rb, n_cols, sb_c, temperature, sh, shift_b, log_s_b);
        T acc1 = (T)0, acc2 = (T)0;
        for (long long c = threadIdx.x; c < n_cols; c += blockDim.x) {
            const T la = kldiv_to_log<T, KA>(ra[c * sa_c], temperature, shift_a, log_s_a);
            const T lb = kldiv_to_log<T, KB>(rb[c * sb_c], temperature, shift_b, log_s_b);
            if (OP == KLDIV_KL) {
                acc1 += kldiv_kl_term(la, lb);
            } else {
                kldiv_js_terms(la, lb, log_b, log_1mb, acc1, acc2);
            }
        }
        acc1 = kldiv_block_sum(acc1, sh);
        if (OP == KLDIV_JS) acc2 = kldiv_block_sum(acc2, sh);
        if (threadIdx.x == 0) out[row] = OP == KLDIV_KL ? acc1 : beta * acc1 + one_m_beta * acc2;
    }
}
""".replace("KLDIV_EPSILON", repr(float(EPSILON)))
"""The CUDA C of the kernels, less their entry points (:func:`_entry`)."""


def _entry(name: str, ctype: str, ka: int, kb: int, op: int) -> str:
    """The ``extern "C"`` entry point of one instantiation (a plain name: no mangling)."""
    return f"""
extern "C" __global__ void __launch_bounds__({THREADS}) {name}(
        const {ctype}* __restrict__ a, const {ctype}* __restrict__ b, {ctype}* __restrict__ out,
        long long n_rows, long long n_cols, long long sa_r, long long sa_c, long long sb_r,
        long long sb_c, {ctype} temperature, {ctype} beta, {ctype} one_m_beta, {ctype} log_b,
        {ctype} log_1mb) {{
    __shared__ {ctype} sh[64];
    kldiv_family_rows<{ctype}, {ka}, {kb}, {op}>(a, b, out, n_rows, n_cols, sa_r, sa_c, sb_r,
                                                  sb_c, temperature, beta, one_m_beta, log_b,
                                                  log_1mb, sh);
}}
"""


_KERNELS: dict[tuple[str, int, int, int], Any] = {}
"""Compiled kernels by ``(ctype, kind of A, kind of B, op)``, made on first use."""


def _kernel(ctype: str, ka: int, kb: int, op: int) -> Any:
    key = (ctype, ka, kb, op)
    kernel = _KERNELS.get(key)
    if kernel is None:
        name = f"kldiv_family_{ctype}_{ka}_{kb}_{op}"
        # compiled by CuPy at the first launch on each device (and cached on disk)
        kernel = cp.RawKernel(SOURCE + _entry(name, ctype, ka, kb, op), name)
        _KERNELS[key] = kernel
    return kernel


def _as_rows(x: Any, shape: tuple[int, ...], rows: int, cols: int) -> tuple[Any, int, int]:
    """``x`` broadcast to ``shape`` as ``(rows, cols)`` and its strides in elements: a view
    where one exists (broadcast axes have stride 0), else a contiguous copy."""
    v = cp.broadcast_to(x, shape).reshape(rows, cols)  # CuPy copies where it must
    item = v.itemsize
    sr, sc = v.strides
    if sc not in (0, item) or sr % item or v.data.ptr % item:
        v = cp.ascontiguousarray(v)
        sr, sc = v.strides
    return v, sr // item, sc // item


def _launch(kernel: Any, a: Any, b: Any, rows: int, cols: int, sa: tuple[int, int],
            sb: tuple[int, int], scalars: tuple[float, ...], dtype: Any) -> Any:
    """Run ``kernel`` over the rows; the per-row values, shape ``(rows,)``."""
    out = cp.empty((rows,), dtype=dtype)
    threads = min(THREADS, 32 * -(-cols // 32))
    blocks = min(rows, MAX_BLOCKS)
    i64, t = np.int64, dtype.type
    kernel((blocks,), (threads,),
           (a, b, out, i64(rows), i64(cols), i64(sa[0]), i64(sa[1]), i64(sb[0]), i64(sb[1]),
            *(t(v) for v in scalars)))
    return out


def _run(op: str, y_true: Any, y_pred: Any, spaces: tuple[str, str], temperature: float,
         beta: float) -> Any:
    if not isinstance(y_true, cp.ndarray) or not isinstance(y_pred, cp.ndarray):
        return NotImplemented
    dtype = y_pred.dtype
    ctype = _CTYPES.get(dtype)
    if ctype is None or y_true.dtype != dtype or y_true.device.id != y_pred.device.id:
        return NotImplemented
    if any(s not in _KINDS for s in spaces):
        return NotImplemented
    if "logits" in spaces and (temperature_limit(temperature, dtype)
                               or temperature_flat(temperature, dtype)):
        return NotImplemented  # T (or 1 / T) is 0 in the dtype: the generic kernel's limit
    try:
        # kldiv's own broadcast: NumPy's broadcast_shapes stops at 32 dimensions
        shape = broadcast_shapes(tuple(y_true.shape), tuple(y_pred.shape), what="y_true and y_pred")
    except ValueError:
        return NotImplemented
    if len(shape) == 0 or 0 in shape:
        return NotImplemented  # no class axis, or no row / no class: the generic kernel
    cols = shape[-1]
    for x, space in zip((y_true, y_pred), spaces, strict=True):
        if space == "logits" and cols != 1 and (x.ndim == 0 or x.shape[-1] != cols):
            return NotImplemented  # softmax over a broadcast class axis: refused upstream
    rows = math.prod(shape[:-1])
    with y_pred.device:
        a, sa_r, sa_c = _as_rows(y_true, shape, rows, cols)
        b, sb_r, sb_c = _as_rows(y_pred, shape, rows, cols)
        if op == "reverse_kl":  # KL(Q || P): the forward kernel on the swapped sides
            a, b, (sa_r, sa_c), (sb_r, sb_c) = b, a, (sb_r, sb_c), (sa_r, sa_c)
            spaces = (spaces[1], spaces[0])
        code = _OPS["js" if op == "js" else "kl"]
        kernel = _kernel(ctype, _KINDS[spaces[0]], _KINDS[spaces[1]], code)
        log_b, log_1mb = (math.log(beta), math.log1p(-beta)) if op == "js" else (0.0, 0.0)
        out = _launch(kernel, a, b, rows, cols, (sa_r, sa_c), (sb_r, sb_c),
                      (temperature, beta, 1.0 - beta, log_b, log_1mb), dtype)
    return out.reshape(shape[:-1])


def kl(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float) -> Any:
    """``KL(P || Q)`` per row (P from ``y_true``), or ``NotImplemented``."""
    return _run("kl", y_true, y_pred, spaces, temperature, 0.5)


def reverse_kl(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float) -> Any:
    """``KL(Q || P)`` per row, or ``NotImplemented``."""
    return _run("reverse_kl", y_true, y_pred, spaces, temperature, 0.5)


def js(y_true: Any, y_pred: Any, *, spaces: tuple[str, str], temperature: float,
       beta: float) -> Any:
    """The generalized Jensen-Shannon divergence per row, or ``NotImplemented``."""
    if not 0.0 < beta < 1.0:
        return NotImplemented  # validated upstream; log(beta) / log1p(-beta) need it
    return _run("js", y_true, y_pred, spaces, temperature, beta)
