"""The divergence family's Triton kernels (:mod:`kldiv.backends.triton_family`) and their
wiring in :mod:`kldiv.backends.torch_family`.

The kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported, hence a subprocess), against a float64 oracle written from the
definitions and against torch autograd of the generic formula. The wiring tests run in
process with a stand-in module: the route is only taken on a Triton device (CUDA).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kldiv

ROOT = Path(__file__).resolve().parents[1]

_ORACLE64 = r"""
def log_softmax64(x, T):  # the definition, shifted by the row maximum before the division
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(m == -INF, 0.0, m)
    with np.errstate(invalid="ignore"):
        z = (x - m) / T
    s = np.sum(np.exp(z), axis=-1, keepdims=True)
    return z - np.log(np.where(s == 0.0, 1.0, s))

def kl64(lp, lq):  # sum over p > 0 of p (lp - lq): 0 log 0 = 0
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)

def oracle(op, a, b, kind, T):
    lp, lq = (log_softmax64(x, T) if kind == "logits" else x for x in (a, b))
    if op == "kl":
        return kl64(lp, lq)
    if op == "reverse_kl":
        return kl64(lq, lp)
    with np.errstate(divide="ignore"):
        lm = np.log(BETA * np.exp(lp) + (1 - BETA) * np.exp(lq))
    return BETA * kl64(lp, lm) + (1 - BETA) * kl64(lq, lm)
"""
"""The float64 oracle of both interpreted-kernel scripts, from the definitions (NumPy)."""

_KERNEL_SCRIPT = r'''
import math, types
import numpy as np, torch, kldiv
from kldiv.backends import torch_family
from kldiv.backends import triton_family as tf  # decorated under TRITON_INTERPRET=1
from kldiv._divergence import MEMBERS
from kldiv._spaces import to_log_space
from kldiv._libraries.torch_traced import array_api

INF = math.inf
BETA = 0.3
R, C = 6, 37


# ---- float64 oracle from the definitions (NumPy)
{oracle64}

# ---- torch autograd of the generic formula (float64)
def generic(op, a, b, kinds, T):
    lp = to_log_space(array_api, a, kinds[0], T)
    lq = to_log_space(array_api, b, kinds[1], T)
    return MEMBERS[op].generic(array_api, lp, lq, **({"beta": BETA} if op == "js" else {}))

def generic_grads(op, a, b, kind, T, w):
    x = a.detach().double().requires_grad_()
    y = b.detach().double().requires_grad_()
    val = generic(op, x, y, (kind, kind), T)
    gx, gy = torch.autograd.grad(val, (x, y), w.double())
    return val.detach(), gx, gy


rng = np.random.default_rng(0)

def rows_with_masks(kind):
    """(R, C) float64 pairs: row 0 plain, 1 a shared masked vocabulary, 2 P zero where Q is
    not, 3 Q zero where P is not (KL infinite), 4 P all -inf (the zero measure), 5 both."""
    a, b = rng.normal(0, 2, (R, C)), rng.normal(0, 2, (R, C))
    if kind == "log_probs":
        a, b = log_softmax64(a, 1.0), log_softmax64(b, 1.0)
    a[1, ::5] = b[1, ::5] = -INF
    a[2, 1::6] = -INF
    b[3, 2::7] = -INF
    a[4] = -INF
    a[5] = b[5] = -INF
    return a, b

def strided(x, dtype, how):
    """x as a non-contiguous (R, C) tensor: column-major, or every other column of a wider
    tensor."""
    if how == "T":
        t = torch.tensor(np.ascontiguousarray(x.T)).to(dtype).T
    else:
        wide = torch.zeros((x.shape[0], 2 * x.shape[1]), dtype=torch.float64)
        wide[:, ::2] = torch.tensor(x)
        t = wide.to(dtype)[:, ::2]
    assert not t.is_contiguous()
    return t

def check(x, ref, tol, what):
    x = x.double()
    assert x.shape == ref.shape, what
    torch.testing.assert_close(x, ref, rtol=tol, atol=tol * max(1.0, float(ref.abs().max())),
                               msg=lambda m: f"{what}: {m}")

# rows with a finite value (KL(P||Q) is infinite where Q is 0 and P is not)
FINITE = {"kl": [True, True, True, False, True, True],
          "reverse_kl": [True, True, False, True, False, True], "js": [True] * R}
cases = 0
for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)):
    for kind in ("logits", "log_probs"):
        a64, b64 = rows_with_masks(kind)
        a, b = strided(a64, dtype, "T"), strided(b64, dtype, "cols")
        # the oracle sees the values the kernel reads (bfloat16-rounded)
        a64, b64 = a.double().numpy(), b.double().numpy()
        for T in ((1.0, 2.5) if dtype != torch.float64 else (2.5,)):
            for op in ("kl", "reverse_kl", "js"):
                what = f"{op} {kind} T={T} {dtype}"
                val, state = tf.forward(op, a, b, (kind, kind), T, BETA, block=16)
                assert val.dtype == dtype, what
                ref = torch.tensor(oracle(op, a64, b64, kind, T))
                check(val, ref, tol, what + " value vs oracle")
                w = torch.linspace(0.5, 2.0, R, dtype=torch.float64)
                gval, gx, gy = generic_grads(op, a, b, kind, T, w)
                check(val, gval, tol, what + " value vs generic")
                ga, gb = tf.backward(a, b, state, w.to(dtype).expand(R), True, True, block=16)
                fin = torch.isfinite(gval)  # gradients of an infinite KL are not compared
                assert fin.tolist() == FINITE[op], what
                for g, ref_g, side in ((ga, gx, "a"), (gb, gy, "b")):
                    assert g.dtype == dtype and g.is_contiguous(), what
                    assert bool(torch.isfinite(g[fin].float()).all()), what + " " + side
                    check(g[fin], ref_g[fin], tol, f"{what} grad {side}")
                # only the gradients asked for are written
                ga1, gb1 = tf.backward(a, b, state, w.to(dtype), True, False, block=16)
                ga2, gb2 = tf.backward(a, b, state, w.to(dtype), False, True)
                assert gb1 is None and ga2 is None, what
                torch.testing.assert_close(ga1, ga, rtol=0, atol=0, equal_nan=True)
                check(gb2[fin], gb[fin].double(), tol, what + " grad b (one block)")
                cases += 1

# a broadcast row (stride 0) against full rows, float32, default block
a = torch.randn(1, C, dtype=torch.float64).expand(R, C)
b = torch.randn(R, C, dtype=torch.float64)
for op in ("kl", "reverse_kl", "js"):
    val, state = tf.forward(op, a.float(), b.float(), ("logits", "logits"), 2.5, BETA)
    w = torch.ones(R, dtype=torch.float64)
    gval, gx, gy = generic_grads(op, a, b, "logits", 2.5, w)
    check(val, gval, 2e-5, op + " broadcast row")
    ga, gb = tf.backward(a.float(), b.float(), state, w.float(), True, True)
    check(ga, gx, 2e-5, op + " broadcast row grad a")
    check(gb, gy, 2e-5, op + " broadcast row grad b")

# ---- the wiring, end to end: the route forced onto CPU tensors (interpreted kernels)
calls = []
spy = types.ModuleType("spy")
spy.forward = lambda *args, **kw: (calls.append("fwd"), tf.forward(*args, **kw))[1]
spy.backward = lambda *args, **kw: (calls.append("bwd"), tf.backward(*args, **kw))[1]
torch_family._TRITON_DEVICES = ("cuda", "cpu")
torch_family._triton = spy
fns = {"kl": kldiv.kl_divergence, "reverse_kl": kldiv.reverse_kl_divergence,
       "js": lambda x, y, **kw: kldiv.js_divergence(x, y, beta=BETA, **kw)}
x0, y0 = torch.randn(4, 3, C), torch.randn(4, 3, C)
for op, fn in fns.items():
    for inputs, temp in (("logits", 2.5), ("log_probs", 1.0)):
        res = []
        for route in ("triton", "generic"):
            xl, yl = x0.clone().requires_grad_(), y0.clone().requires_grad_()
            x, y = (xl.log_softmax(-1), yl.log_softmax(-1)) if inputs == "log_probs" else (xl, yl)
            del calls[:]
            if route == "generic":
                with kldiv.use_generic():
                    out = fn(x, y, inputs=inputs, temperature=temp)
            else:
                out = fn(x, y, inputs=inputs, temperature=temp)
                assert calls == ["fwd"], (op, inputs, calls)
            (out * torch.linspace(0.5, 2, 3)).sum().backward()
            if route == "triton":
                assert calls == ["fwd", "bwd"], (op, inputs, calls)
            res.append((out.detach(), xl.grad, yl.grad))
        for u, v in zip(*res, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
# no gradient needed: the forward kernel alone
del calls[:]
with torch.no_grad():
    kldiv.js_divergence(x0, y0, inputs="logits", beta=BETA)
assert calls == ["fwd"], calls
# create_graph=True: the backward is differentiable (autograd through the generic formula)
x = x0.clone().requires_grad_()
(g,) = torch.autograd.grad(kldiv.kl_divergence(x, y0, inputs="logits").sum(), x,
                           create_graph=True)
(h,) = torch.autograd.grad(g.square().sum(), x)
with kldiv.use_generic():
    x2 = x0.clone().requires_grad_()
    (g2,) = torch.autograd.grad(kldiv.kl_divergence(x2, y0, inputs="logits").sum(), x2,
                                create_graph=True)
    (h2,) = torch.autograd.grad(g2.square().sum(), x2)
torch.testing.assert_close(h, h2)
# what the kernels do not take keeps the blocks
del calls[:]
kldiv.kl_divergence(x0.softmax(-1), y0, inputs=("probs", "logits"))
kldiv.js_divergence(x0.softmax(-1), y0.softmax(-1), inputs="probs", beta=BETA)
kldiv.kl_divergence(x0.log_softmax(-1), y0, inputs=("log_probs", "logits"))
kldiv.kl_divergence(x0[..., :1], y0, inputs="log_probs")  # a broadcast class axis
assert calls == [], calls
print("TRITON-FAMILY-OK", cases)
'''



# --------------------------------------------- Triton's interpreter: a loop bound it cannot run
# Triton's interpreter holds every scalar kernel argument as a 1-element NumPy array. In
# Triton 3.6.0 its ``tl.tensor.__index__`` (which Python's ``range`` calls on a runtime loop
# bound: ``for c0 in range(0, n_cols, BLOCK)``, in every kldiv kernel) is
# ``int(self.handle.data)``: NumPy 2.4 turned that conversion of an ``ndim > 0`` array into a
# TypeError ("only 0-dimensional arrays can be converted to Python scalars"; deprecated since
# NumPy 1.25). Upstream: triton-lang/triton#9171, fixed by ``int(self.handle.data.squeeze())``
# (Triton 3.9.0 has it). Any kernel with a runtime loop bound hits it, and kldiv cannot avoid it
# without changing the compiled kernels (a ``tl.constexpr`` bound compiles once per row length;
# a ``while`` loop is not an ``scf.for``), so the interpreted tests skip where a probe kernel
# of that shape fails in exactly that way, and run everywhere else.
_PROBE_SCRIPT = r"""
import torch, triton
import triton.language as tl

@triton.jit
def _probe(out_ptr, n, STEP: tl.constexpr):
    acc = tl.zeros([1], dtype=tl.int32)
    for i in range(0, n, STEP):
        acc += i
    tl.store(out_ptr + tl.arange(0, 1), acc)

@triton.jit
def _probe_constexpr(out_ptr, N: tl.constexpr, STEP: tl.constexpr):
    acc = tl.zeros([1], dtype=tl.int32)
    for i in range(0, N, STEP):
        acc += i
    tl.store(out_ptr + tl.arange(0, 1), acc)

out = torch.full((1,), -1, dtype=torch.int32)
_probe_constexpr[(1,)](out, N=7, STEP=2)  # the interpreter itself runs here
assert out.tolist() == [0 + 2 + 4 + 6], out.tolist()
out.fill_(-1)
try:
    _probe[(1,)](out, 7, STEP=2)  # a bound that is a kernel argument, as in kldiv's kernels
except Exception as exc:  # InterpreterError(s) wrapping the TypeError
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    if isinstance(chain[-1], TypeError) and str(chain[-1]) == DEFECT:
        print("TRITON-PROBE-INDEX-DEFECT")
        raise SystemExit(0)
    raise
assert out.tolist() == [0 + 2 + 4 + 6], out.tolist()
print("TRITON-PROBE-OK")
"""

_INDEX_DEFECT = "only 0-dimensional arrays can be converted to Python scalars"


def _probe_interpreter(prelude: str = "") -> str | None:
    """Run the probe kernels in Triton's interpreter (a subprocess, with ``prelude`` first):
    the skip reason if the interpreter runs a loop with a ``tl.constexpr`` bound but fails on
    the same loop bounded by a kernel argument with exactly the TypeError described above;
    ``None`` otherwise (a failure of another kind is left to the real tests to report)."""
    script = f"DEFECT = {_INDEX_DEFECT!r}\n{prelude}{_PROBE_SCRIPT}"
    proc = subprocess.run([sys.executable, "-c", script],
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0 or "TRITON-PROBE-INDEX-DEFECT" not in proc.stdout:
        return None
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}"
                         for name in ("triton", "numpy"))
    return (f"Triton's interpreter ({versions}) cannot run a loop bounded by a kernel "
            f"argument: its tl.tensor.__index__ calls int() on a 1-element NumPy array, a "
            f"TypeError since NumPy 2.4 ('{_INDEX_DEFECT}'); upstream triton-lang/triton#9171, "
            f"fixed in later Triton (3.9.0 has it)")


@functools.cache
def triton_interpreter_defect() -> str | None:
    """Why Triton's interpreter cannot run kldiv's kernels here (the reason to skip the
    interpreted kernel tests with), or ``None``. Once per test session."""
    return _probe_interpreter()


def skip_if_triton_interpreter_defective() -> None:
    """Skip the calling test, with the exact reason, where Triton's interpreter has the
    ``__index__`` defect; the interpreted kernel tests of test_fast_paths and
    test_fused_linear_triton call it too."""
    reason = triton_interpreter_defect()
    if reason is not None:
        pytest.skip(reason)


# Triton 3.6.0's __index__ put back (and the fixed one) over whichever Triton is installed:
# the probe must tell them apart, so a skip never hides a working interpreter and never misses
# the broken one.
_INDEX_PRELUDE = """
import triton.runtime.interpreter as _interp
_patch_lang_tensor = _interp._patch_lang_tensor
def _with_index(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int({data}))
_interp._patch_lang_tensor = _with_index
"""


def test_interpreter_probe_tells_the_index_defect_apart() -> None:
    pytest.importorskip("torch")
    interp = pytest.importorskip("triton.runtime.interpreter")
    if not hasattr(interp, "_patch_lang_tensor"):
        pytest.skip("this Triton's interpreter has no _patch_lang_tensor to put __index__ back in")
    if np.lib.NumpyVersion(np.__version__) < "2.4.0":
        pytest.skip(f"NumPy {np.__version__} still converts a 1-element array with int() "
                    "(a DeprecationWarning, an error from 2.4)")
    broken = _probe_interpreter(_INDEX_PRELUDE.format(data="self.handle.data"))
    assert broken is not None and _INDEX_DEFECT in broken and "#9171" in broken, broken
    assert _probe_interpreter(_INDEX_PRELUDE.format(data="self.handle.data.squeeze()")) is None


def test_triton_family_kernels_interpreted() -> None:
    """Forward and backward kernels, all three ops, logits and log-probabilities,
    temperatures 1 and 2.5, ``beta=0.3``, masked (``-inf``) entries and rows, strided inputs,
    float32/bfloat16/float64, against the float64 oracle and autograd of the generic formula;
    then the route through ``kldiv``'s public functions (forced onto CPU tensors)."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    skip_if_triton_interpreter_defective()
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _KERNEL_SCRIPT.replace("{oracle64}", _ORACLE64)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "TRITON-FAMILY-OK 30" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-4000:])


# ------------------------------------------------------------------------- wiring, in process
class _Taken(Exception):
    pass


@pytest.fixture
def triton_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[str, str]]]:
    """A stand-in Triton module forced into ``torch_family``: records each forward call (op,
    kinds) and raises :class:`_Taken`, so a call that takes the route cannot pass silently."""
    pytest.importorskip("torch")
    from kldiv.backends import torch_family

    calls: list[tuple[str, tuple[str, str]]] = []

    def forward(op: str, a: Any, b: Any, kinds: tuple[str, str], *args: Any,
                **kwargs: Any) -> Any:
        calls.append((op, kinds))
        raise _Taken(op)

    spy = types.ModuleType("triton_family_spy")
    spy.forward = forward
    monkeypatch.setattr(torch_family, "_triton", spy)
    return calls


_FNS = {"kl": kldiv.kl_divergence, "reverse_kl": kldiv.reverse_kl_divergence,
        "js": lambda x, y, **kw: kldiv.js_divergence(x, y, beta=0.3, **kw)}


@pytest.mark.parametrize("op", sorted(_FNS))
@pytest.mark.parametrize("inputs", ["logits", "log_probs"])
def test_triton_forced_on_cpu_tensors_keeps_blocks(triton_spy: list[Any], op: str,
                                                    inputs: str) -> None:
    """With the Triton module forced (as if Triton were installed) on a CUDA-less machine,
    CPU tensors keep today's blocked path: values and gradients as the generic formula's."""
    import torch

    rng = np.random.default_rng(1)
    x0 = torch.tensor(rng.normal(0, 2, (5, 37)))
    y0 = torch.tensor(rng.normal(0, 2, (5, 37)))
    if inputs == "log_probs":
        x0, y0 = x0.log_softmax(-1), y0.log_softmax(-1)
    x0[:, 3] = y0[:, 3] = -np.inf
    temp = 2.5 if inputs == "logits" else 1.0  # a temperature only applies to logits
    res = []
    for generic in (False, True):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        if generic:
            with kldiv.use_generic():
                out = _FNS[op](x, y, inputs=inputs, temperature=temp)
        else:
            out = _FNS[op](x, y, inputs=inputs, temperature=temp)
        out.sum().backward()
        res.append((out.detach(), x.grad, y.grad))
    assert triton_spy == []
    for u, v in zip(*res, strict=True):
        assert bool(torch.isfinite(u).all())
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_triton_route_taken_on_triton_devices_only(triton_spy: list[Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The route's gate: on a Triton device (CPU declared one here), both sides logits or
    both log-probabilities take the module (reverse KL as the KL of the swapped sides);
    ``"probs"``, mixed pairs and a broadcast class axis do not; a refused module (``None``,
    no Triton) keeps the blocks."""
    import torch

    from kldiv.backends import torch_family

    x, y = torch.randn(4, 37), torch.randn(4, 37)
    kldiv.kl_divergence(x, y, inputs="logits")  # CPU is no Triton device
    assert triton_spy == []
    monkeypatch.setattr(torch_family, "_TRITON_DEVICES", ("cuda", "cpu"))
    for op, inputs, temp, expected in (
            ("kl", "logits", 2.0, ("kl", ("logits", "logits"))),
            ("reverse_kl", "log_probs", 1.0, ("kl", ("log_probs", "log_probs"))),
            ("js", "logits", 2.0, ("js", ("logits", "logits")))):
        with pytest.raises(_Taken):
            _FNS[op](x, y, inputs=inputs, temperature=temp)
        assert triton_spy[-1] == expected
    taken = len(triton_spy)
    _FNS["js"](x.softmax(-1), y.softmax(-1), inputs="probs")
    _FNS["kl"](x.softmax(-1), y, inputs=("probs", "logits"))
    _FNS["kl"](x, y, inputs=("logits", "log_probs"))
    _FNS["kl"](x[:, :1], y, inputs="log_probs")  # a broadcast class axis
    assert len(triton_spy) == taken
    monkeypatch.setattr(torch_family, "_triton", None)  # refused: today's path
    out = _FNS["js"](x, y, inputs="logits")
    with kldiv.use_generic():
        ref = _FNS["js"](x, y, inputs="logits")
    torch.testing.assert_close(out, ref)


_TEMPERATURE_SCRIPT = r'''
import math
import numpy as np, torch
from kldiv.backends import triton_family as tf
from kldiv._divergence import MEMBERS
from kldiv._spaces import to_log_space
from kldiv._libraries.torch_traced import array_api

INF = math.inf
BETA = 0.3

{oracle64}

def generic_grads(op, a, b, T, w):
    x = a.detach().double().requires_grad_()
    y = b.detach().double().requires_grad_()
    lp = to_log_space(array_api, x, "logits", T)
    lq = to_log_space(array_api, y, "logits", T)
    val = MEMBERS[op].generic(array_api, lp, lq, **({"beta": BETA} if op == "js" else {}))
    return torch.autograd.grad(val, (x, y), w)

rng = np.random.default_rng(3)
C = 10
# logits around 10 (x / T overflowed for T <= 1e-38 in float32) spread less than 1.5 below
# each row's maximum (so that (x - max) / T stays finite at T=1e-38 in float32)
a = 10.0 - rng.uniform(0.0, 1.5, (5, C))
b = 10.0 - rng.uniform(0.0, 1.5, (5, C))
a[:, 4] = b[:, 4] = 10.0            # one argmax on both sides...
b[3, 4], b[3, 7] = 9.0, 10.0        # ...but in row 3 (KL huge in the limit)
a[1, ::3] = b[1, ::3] = -INF        # a shared masked vocabulary (the argmax kept)
a[2] = -INF                         # P: the zero measure
a[4] = b[4] = -INF                  # both zero measures
cases = 0
for dtype, temps in ((torch.float32, (1e-38, 1e-30, 1e-3, 1e30)),
                     (torch.float64, (1e-307, 1e-200, 1e300))):
    at, bt = torch.tensor(a).to(dtype), torch.tensor(b).to(dtype)
    a64, b64 = at.double().numpy(), bt.double().numpy()
    for T in temps:
        for op in ("kl", "reverse_kl", "js"):
            what = f"{op} T={T} {dtype}"
            val, state = tf.forward(op, at, bt, ("logits", "logits"), T, BETA, block=16)
            ref = torch.tensor(oracle(op, a64, b64, "logits", T)).to(dtype)  # inf beyond dtype's range
            assert not bool(torch.isnan(val).any()), (what, val)
            torch.testing.assert_close(val, ref, rtol=2e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
            w = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
            gx, gy = generic_grads(op, at, bt, T, w)
            ga, gb = tf.backward(at, bt, state, w.to(dtype), True, True, block=16)
            fin = torch.isfinite(torch.tensor(oracle(op, a64, b64, "logits", T)))
            fin &= torch.isfinite(gx.to(dtype)).all(-1) & torch.isfinite(gy.to(dtype)).all(-1)
            for g, ref_g, side in ((ga, gx, "a"), (gb, gy, "b")):
                assert not bool(torch.isnan(g[fin]).any()), (what, side, g)
                scale = max(1.0, float(ref_g[fin].abs().max())) if bool(fin.any()) else 1.0
                torch.testing.assert_close(g[fin].double(), ref_g[fin], rtol=2e-5,
                                           atol=2e-5 * scale, msg=lambda m: f"{what} {side}: {m}")
            cases += 1
print("TRITON-TEMPERATURE-OK", cases)
'''


def test_triton_family_kernels_extreme_temperatures() -> None:
    """Tiny and huge temperatures (float32 ``T=1e-38``, float64 ``T=1e-307``, ``T=1e30``):
    the kernels shift each row by its maximum before dividing by ``T`` (``x / T`` overflowed
    to ``inf`` and gave NaN where the one-hot limit is finite), values against the float64
    oracle and gradients against autograd of the generic formula, -inf entries and rows
    included."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    skip_if_triton_interpreter_defective()
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _TEMPERATURE_SCRIPT.replace("{oracle64}", _ORACLE64)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "TRITON-TEMPERATURE-OK 21" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-4000:])
