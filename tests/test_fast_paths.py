"""The native fast paths agree with the generic array-API kernel (values and gradients).

Every test runs the same random inputs through the fast path and through the generic kernel
(``kldiv.use_generic()``) and checks that the fast path really ran, so that none of them can
pass vacuously. NumPy must agree to the last bit; the others to a tight tolerance. Speed is
measured by ``benchmarks/run.py``, never here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc
import types
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, oracle
from kldiv import backends
from kldiv.backends import numpy_
from kldiv.backends import numpy_engine as engine  # blocks, threads, scratch

RNG_SEED = 20240601


def _inputs(shape_t: tuple[int, ...], shape_p: tuple[int, ...], dtype: Any = np.float64,
            seed: int = 0, special: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs with values outside [0, 1], exact zeros, exact bounds and (optionally) NaN."""
    rng = np.random.default_rng(RNG_SEED + seed)
    t = rng.uniform(-0.2, 1.2, shape_t).astype(dtype)
    p = rng.uniform(-0.2, 1.2, shape_p).astype(dtype)
    if special:
        t.reshape(-1)[::7] = 0.0
        p.reshape(-1)[::11] = 0.0
        t.reshape(-1)[3::13] = 1.0
        p.reshape(-1)[5::17] = 1e-7
    return t, p


def _generic(y_true: Any, y_pred: Any) -> Any:
    with kldiv.use_generic():
        return kldiv.kl_divergence(y_true, y_pred)


# ----------------------------------------------------------------------------------- registry
def test_registry_lists_every_fast_path() -> None:
    reg = backends.registered()
    for name in ("numpy", "torch", "jax", "cupy"):
        assert reg[name] == f"kldiv.backends.{name}_"


def test_use_generic_switches_fast_paths_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backends.fast_path("numpy") is not None
    with kldiv.use_generic():
        assert backends.fast_path("numpy") is None
    monkeypatch.setenv("KLDIV_GENERIC", "1")
    assert backends.fast_path("numpy") is None


@pytest.mark.parametrize("attr", ["keras_kl", "kl_divergence"])
def test_register_a_third_party_module(monkeypatch: pytest.MonkeyPatch, attr: str) -> None:
    """``register`` takes a module with the op-named kernel or the pre-engine name."""
    calls = []

    def kernel(t: Any, p: Any) -> Any:
        calls.append(1)
        return NotImplemented  # declines: the generic kernel runs

    mod = types.ModuleType("kldiv_test_third_party")
    setattr(mod, attr, kernel)
    monkeypatch.setitem(sys.modules, "kldiv_test_third_party", mod)
    try:
        backends.register("numpy", "kldiv_test_third_party")
        assert backends.registered()["numpy"] == "kldiv_test_third_party"
        assert backends.fast_path("numpy") is kernel
        out = kldiv.kld(np.array([.4, .9, .2]), np.array([.5, .8, .12]))
        assert calls == [1] and float(out) == pytest.approx(0.11891246, rel=1e-6)
    finally:
        backends.register("numpy", "kldiv.backends.numpy_")
    assert backends.fast_path("numpy") is not kernel
    assert backends.fast_path("numpy").__module__ == "kldiv.backends.numpy_"


def test_register_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match="str"):
        backends.register("numpy", None)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- NumPy
@pytest.fixture
def numpy_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records which NumPy fast-path kernel ran: "blocked" (``_run``), "small" or "as_written"."""
    calls: list[str] = []
    real_run, real_small, real_written = engine.row_sums, numpy_._small, numpy_._as_written

    def written_spy(*args: Any) -> Any:
        out = real_written(*args)
        if out is not NotImplemented:
            calls.append("as_written")
        return out

    def run_spy(*args: Any) -> Any:
        calls.append("blocked")
        return real_run(*args)

    def small_spy(*args: Any) -> Any:
        out = real_small(*args)
        if out is not NotImplemented:
            calls.append("small")
        return out

    monkeypatch.setattr(engine, "row_sums", run_spy)
    monkeypatch.setattr(numpy_, "_small", small_spy)
    monkeypatch.setattr(numpy_, "_as_written", written_spy)
    monkeypatch.setattr(numpy_, "SMALL_ELEMENTS", 0)  # the blocked kernel, unless a test says
    return calls


NUMPY_CASES = {
    "1d": ((37,), (37,)),
    "small": ((256, 10), (256, 10)),
    "odd": ((333, 129), (333, 129)),
    "3d": ((5, 7, 129), (5, 7, 129)),
    "bcast-row": ((1, 50), (400, 50)),
    "bcast-rank": ((50,), (6, 40, 50)),
    "bcast-pred": ((6, 40, 50), (1, 50)),
    "bcast-middle": ((6, 1, 50), (6, 40, 50)),
    "long-rows": ((3, 70001), (3, 70001)),
    "one-col": ((100, 1), (100, 1)),
}


@pytest.mark.parametrize("kernel", ["blocked", "small"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(NUMPY_CASES))
def test_numpy_bitwise_equal_to_generic(case: str, dtype: Any, kernel: str,
                                        numpy_spy: list[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # a small block and thread threshold, so the blocking, the threads and the pairwise
    # column split all run on inputs this small
    monkeypatch.setattr(engine, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(engine, "MIN_PARALLEL", 1000)
    if kernel == "small":
        monkeypatch.setattr(numpy_, "SMALL_ELEMENTS", 10**9)
    t, p = _inputs(*NUMPY_CASES[case], dtype=dtype)
    t.reshape(-1)[::29] = np.nan
    t.flags.writeable = False
    t_copy, p_copy = t.copy(), p.copy()
    fast = kldiv.kl_divergence(t, p)
    assert numpy_spy and set(numpy_spy) == {kernel}, "the NumPy fast path did not run"
    gen = _generic(t, p)
    assert type(fast) is type(gen)
    assert fast.dtype == gen.dtype == dtype
    assert np.shape(fast) == np.shape(gen)
    assert np.array_equal(fast, gen, equal_nan=True)
    np.testing.assert_array_equal(t, t_copy)  # inputs untouched
    np.testing.assert_array_equal(p, p_copy)


@pytest.mark.parametrize("kernel", ["blocked", "small"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["transposed", "strided", "reversed"])
def test_numpy_non_contiguous(layout: str, dtype: Any, kernel: str, numpy_spy: list[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "BLOCK_BYTES", 2048)
    monkeypatch.setattr(engine, "MIN_PARALLEL", 1000)
    if kernel == "small":
        monkeypatch.setattr(numpy_, "SMALL_ELEMENTS", 10**9)
    t, p = _inputs((300, 400), (300, 400), dtype=dtype)
    if layout == "transposed":
        t, p = t.T, p.T
    elif layout == "strided":
        t, p = t[::2, 1::3], p[1::2, 2::3]
    else:
        t, p = t[::-1, ::-1], p[:, ::-1]
    fast = kldiv.kl_divergence(t, p)
    if layout == "transposed":
        # Fortran-ordered rows: the formula exactly as written (SPEC §1's float64 example
        # holds for any layout), not the C-ordered blocked kernels
        assert numpy_spy == ["as_written"]
        tc, pc = np.clip(t, 1e-7, 1), np.clip(p, 1e-7, 1)
        assert np.array_equal(fast, np.sum(tc * np.log(tc / pc), axis=-1))
        return
    assert numpy_spy and set(numpy_spy) == {kernel}
    assert np.array_equal(fast, _generic(t, p))


def test_numpy_default_settings_large_input(numpy_spy: list[str]) -> None:
    """The production block size and thread count, on rows longer than one block."""
    for shape in [(2048, 1000), (2, engine.BLOCK_BYTES // 4 + 12345)]:
        t, p = _inputs(shape, shape, dtype=np.float32, special=False)
        assert np.array_equal(kldiv.kl_divergence(t, p), _generic(t, p))
    assert numpy_spy == ["blocked", "blocked"]


def test_numpy_seed_float64_example_exact() -> None:
    yt = np.array([[0.0, 1.0], [0.0, 0.0]])
    yp = np.array([[0.6, 0.4], [0.4, 0.6]])
    t, p = np.clip(yt, 1e-7, 1), np.clip(yp, 1e-7, 1)
    assert numpy_.keras_kl(yt, yp) is not NotImplemented
    assert np.array_equal(kldiv.kld(yt, yp), np.sum(t * np.log(t / p), axis=-1))


def test_numpy_declines_empty_and_other_dtypes() -> None:
    assert numpy_.keras_kl(np.ones((0, 3)), np.ones((0, 3))) is NotImplemented
    assert numpy_.keras_kl(np.ones((2, 0)), np.ones((2, 0))) is NotImplemented
    half = np.ones((2, 3), np.float16)
    assert numpy_.keras_kl(half, half) is NotImplemented
    np.testing.assert_array_equal(kldiv.kld(np.ones((2, 0)), np.ones((2, 0))), [0.0, 0.0])


def test_numpy_scratch_memory_is_bounded() -> None:
    """Extra peak memory is the scratch (a few MiB), not a multiple of the input size."""
    t, p = _inputs((1024, 8192), (1024, 8192), dtype=np.float64, special=False)  # 64 MiB each
    numpy_.keras_kl(t[:8], p[:8])  # thread pool and imports exist already
    tracemalloc.start()
    try:
        out = numpy_.keras_kl(t, p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    budget = 2 * engine.BLOCK_BYTES * (engine._n_threads() + 1) + (1 << 20)
    assert peak - out.nbytes <= budget
    assert peak - out.nbytes <= 64 << 20


def _threaded_inputs(monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """Inputs that take the threaded path (4 threads, whatever the number of CPUs)."""
    monkeypatch.setattr(engine, "_n_threads", lambda: 4)
    t, p = _inputs((600, 300), (600, 300))
    assert t.size >= engine.MIN_PARALLEL
    return t, p


def test_numpy_threaded_call_needs_no_live_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool whose workers never run (what a forked child inherits): the calling thread does
    every chunk itself instead of waiting forever."""
    t, p = _threaded_inputs(monkeypatch)
    dead = engine._Pool()
    dead.threads = [object()] * 3  # type: ignore[list-item]  # "workers" that never take a job
    monkeypatch.setattr(engine, "_pool", dead)
    assert np.array_equal(kldiv.kl_divergence(t, p), _generic(t, p))
    assert dead.jobs.qsize() == 3  # the job was offered to the three "workers"


def test_numpy_threaded_call_when_no_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter shutdown (no thread can be started): the call runs serially."""
    t, p = _threaded_inputs(monkeypatch)
    monkeypatch.setattr(engine, "_pool", None)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", refuse)
        out = kldiv.kl_divergence(t, p)
    assert np.array_equal(out, _generic(t, p))
    assert engine._pool is not None and engine._pool.threads == []


def test_numpy_threaded_call_reports_worker_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    t, p = _threaded_inputs(monkeypatch)
    real = engine._sum_rows
    caller = threading.get_ident()

    def flaky(terms: Any, full: list[Any], rows: list[Any], r0: int, r1: int) -> None:
        if threading.get_ident() != caller:
            raise MemoryError("from a worker")
        real(terms, full, rows, r0, r1)

    monkeypatch.setattr(engine, "_sum_rows", flaky)
    monkeypatch.setattr(engine, "_pool", None)
    engine._get_pool(3)
    for _ in range(20):  # until a worker has taken a chunk (the caller may take them all)
        try:
            kldiv.kl_divergence(t, p)
        except MemoryError as exc:
            assert "from a worker" in str(exc)
            break
    else:
        pytest.fail("no worker ever ran a chunk")
    monkeypatch.setattr(engine, "_sum_rows", real)
    assert np.array_equal(kldiv.kl_divergence(t, p), _generic(t, p))  # the pool still works


def test_numpy_reentrant_call_gets_fresh_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call made while this thread's scratch is in use (a signal handler, ``__del__``)
    allocates its own buffers instead of overwriting the outer frame's."""
    t, p = _inputs((64, 1000), (64, 1000), seed=1)
    t2, p2 = _inputs((64, 1000), (64, 1000), seed=2)
    monkeypatch.setattr(engine, "BLOCK_BYTES", 64 * 1000 * 8)  # one block: one scratch set
    want, want2 = _generic(t, p), _generic(t2, p2)
    inner: list[Any] = []
    real_terms = numpy_._terms

    def reenter(*args: Any) -> Any:
        terms = real_terms(*args)  # in the scratch buffers
        if not inner:  # between the outer frame's terms and its row sums: call again
            inner.append(None)
            inner[0] = kldiv.kl_divergence(t2, p2)
        return terms

    monkeypatch.setattr(numpy_, "_terms", reenter)
    out = kldiv.kl_divergence(t, p)
    assert np.array_equal(inner[0], want2)
    assert np.array_equal(out, want)


# -------------------------------------------------------------------------------------- torch
def _torch() -> Any:
    return pytest.importorskip("torch")


@pytest.fixture
def torch_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records the route of every fused torch call that returned a tensor."""
    _torch()
    from kldiv.backends import torch_

    calls: list[str] = []
    real = torch_.fused

    def spy(y_true: Any, y_pred: Any, route: str) -> Any:
        out = real(y_true, y_pred, route)
        if out is not None:
            calls.append(route)
        return out

    monkeypatch.setattr(torch_, "fused", spy)
    return calls


TORCH_CASES = {
    "same": ((64, 100), (64, 100)),
    "bcast-true": ((1, 100), (64, 100)),
    "bcast-rank": ((100,), (3, 64, 100)),
    "bcast-middle": ((5, 1, 300), (5, 20, 300)),
    "bcast-pred": ((64, 100), (100,)),
}


def _torch_run(torch: Any, t: np.ndarray, p: np.ndarray, w: np.ndarray,
               device: Any = "cpu", fn: Any = None) -> tuple[Any, Any, Any]:
    yt = torch.tensor(t, device=device, requires_grad=True)
    yp = torch.tensor(p, device=device, requires_grad=True)
    out = (fn or kldiv.kl_divergence)(yt, yp)
    (out * torch.as_tensor(w, device=device)).sum().backward()
    return (out.detach().cpu().numpy(), yt.grad.cpu().numpy(), yp.grad.cpu().numpy())


def _analytic(t: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/dt and d/dp of sum(w * loss), reduced to the shapes of t and p (float64)."""
    shape = np.broadcast_shapes(t.shape, p.shape)
    t64, p64 = np.broadcast_to(t, shape).astype(np.float64), np.broadcast_to(p, shape).astype(np.float64)
    tc, pc = np.clip(t64, 1e-7, 1), np.clip(p64, 1e-7, 1)
    wc = np.asarray(w, np.float64)[..., None]
    gt = np.where(tc == t64, np.log(tc / pc) + 1, 0) * wc
    gp = np.where(pc == p64, -tc / pc, 0) * wc

    def reduce_to(g: np.ndarray, s: tuple[int, ...]) -> np.ndarray:
        g = g.sum(axis=tuple(range(g.ndim - len(s))))
        return g.sum(axis=tuple(i for i, n in enumerate(s) if n == 1), keepdims=True)

    return reduce_to(gt, t.shape), reduce_to(gp, p.shape)


def _close(a: np.ndarray, b: np.ndarray, dtype: Any) -> None:
    rtol = 2e-4 if np.dtype(dtype) == np.float32 else 1e-10
    scale = float(np.nanmax(np.abs(b))) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_values_and_gradients(case: str, dtype: Any, torch_spy: list[str]) -> None:
    torch = _torch()
    t, p = _inputs(*TORCH_CASES[case], dtype=dtype)
    w = np.random.default_rng(1).uniform(0.5, 2.0, np.broadcast_shapes(t.shape, p.shape)[:-1])
    w = w.astype(dtype)
    fast = _torch_run(torch, t, p, w)
    assert torch_spy == ["numpy"], "the torch fast path did not run"
    with kldiv.use_generic():
        gen = _torch_run(torch, t, p, w)
    for a, b in zip(fast, gen, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.isfinite(a).all()
        _close(a, b, dtype)
    _close(fast[0], oracle(t, p), dtype)
    for a, b in zip(fast[1:], _analytic(t, p, w), strict=True):
        _close(a, b, dtype)


def test_torch_nan_gradient_matches_generic(torch_spy: list[str]) -> None:
    torch = _torch()
    t, p = _inputs((64, 100), (64, 100))
    t[0, 3] = np.nan
    p[1, 4] = np.nan
    w = np.ones(64)
    fast = _torch_run(torch, t, p, w)
    gen = _torch_run(torch, t, p, w, fn=_generic)
    assert torch_spy
    for a, b in zip(fast, gen, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)


def test_torch_no_grad_parameter_and_one_sided_grad(torch_spy: list[str]) -> None:
    torch = _torch()
    t, p = _inputs((64, 100), (64, 100), special=False)
    yt, yp = torch.tensor(t), torch.nn.Parameter(torch.tensor(p))
    with torch.no_grad():
        out = kldiv.kld(yt, yp)
    assert not out.requires_grad
    out = kldiv.kld(yt, yp)
    out.sum().backward()
    assert yt.grad is None and yp.grad is not None
    assert torch_spy == ["numpy", "numpy"]
    ref = torch.tensor(p, requires_grad=True)
    _generic(yt, ref).sum().backward()
    _close(yp.grad.numpy(), ref.grad.numpy(), np.float64)


def test_torch_saves_own_tensors_without_copies(torch_spy: list[str]) -> None:
    """Only memory torch does not own is copied for backward; the CPU route reads tensors
    through DLPack, which (unlike ``Tensor.numpy()``) leaves them looking torch-owned, so a
    tensor used again is not copied on every later call."""
    torch = _torch()
    from kldiv.backends import torch_

    t, p = _inputs((64, 100), (64, 100), special=False)
    yt, yp = torch.tensor(t), torch.tensor(p, requires_grad=True)
    for _ in range(2):
        kldiv.kld(yt, yp).sum().backward()
        with torch.no_grad():
            kldiv.kld(yt, yp)
    assert torch_spy == ["numpy"] * 4
    assert torch_._private(yt) is yt and torch_._private(yp) is yp
    external = torch.from_numpy(t)
    copy = torch_._private(external)
    assert copy is not external and copy.data_ptr() != external.data_ptr()
    assert torch.equal(copy, external)


def test_torch_double_backward(torch_spy: list[str]) -> None:
    torch = _torch()
    t, p = _inputs((64, 100), (64, 100), special=False)

    def hvp(fn: Any) -> np.ndarray:
        yp = torch.tensor(p, requires_grad=True)
        (g,) = torch.autograd.grad(fn(torch.tensor(t), yp).sum(), yp, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), yp)
        return h.numpy()

    fast = hvp(kldiv.kld)
    assert torch_spy
    _close(fast, hvp(_generic), np.float64)


def test_torch_declines_when_tracing_or_small(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = _torch()
    from kldiv.backends import torch_

    big = torch.rand(64, 100)
    assert torch_.keras_kl(big, big) is not NotImplemented
    assert torch_.keras_kl(big.half(), big.half()) is NotImplemented
    # below MIN_ELEMENTS, and devices with no fused kernel: the native route (the generic
    # kernel on torch's own functions), with autograd
    small_t, small_p = big[:2].clone(), big[2:4].clone().requires_grad_(True)
    assert torch_._route(small_t, small_p) == "native"
    out = torch_.keras_kl(small_t, small_p)
    with kldiv.use_generic():
        ref = kldiv.kld(small_t, small_p)
    assert torch.equal(out, ref)
    (g,) = torch.autograd.grad(out.sum(), small_p)
    (g_ref,) = torch.autograd.grad(ref.sum(), small_p)
    assert torch.equal(g, g_ref)
    meta = torch_.keras_kl(big.to("meta"), big.to("meta"))
    assert meta.device.type == "meta" and tuple(meta.shape) == (64,)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch_.keras_kl(big, big) is NotImplemented


def test_torch_func_transforms_use_generic(torch_spy: list[str]) -> None:
    torch = _torch()
    t, p = _inputs((64, 100), (64, 100), special=False)
    yt, yp = torch.tensor(t), torch.tensor(p)
    g = torch.func.grad(lambda a: kldiv.kld(yt, a).sum())(yp)
    v = torch.func.vmap(kldiv.kld)(yt, yp)
    assert torch_spy == []  # declined: the transforms trace the generic formula
    ref = yp.clone().requires_grad_()
    _generic(yt, ref).sum().backward()
    _close(g.numpy(), ref.grad.numpy(), np.float64)
    _close(v.numpy(), oracle(t, p), np.float64)


_TRITON_SCRIPT = """
import numpy as np, torch, kldiv
import kldiv.backends.torch_ as torch_
import kldiv.backends.triton_ as triton_  # decorated under TRITON_INTERPRET=1
torch_._triton = triton_
cases = [((64, 37), (64, 37)), ((1, 37), (64, 37)), ((37,), (3, 8, 37)), ((5, 1, 37), (5, 4, 37))]
rng = np.random.default_rng(0)
for dtype, tol in ((torch.float32, 2e-4), (torch.float64, 1e-10)):
    for st, sp in cases:
        t = torch.tensor(rng.uniform(-0.2, 1.2, st), dtype=dtype)
        p = torch.tensor(rng.uniform(-0.2, 1.2, sp), dtype=dtype)
        t.view(-1)[::7] = 0.0; p.view(-1)[::11] = 0.0; t.view(-1)[3::13] = 1.0
        res = []
        for fn in (lambda a, b: torch_.fused(a, b, "triton"), None):
            a, b = t.clone().requires_grad_(), p.clone().requires_grad_()
            if fn is None:
                with kldiv.use_generic():
                    out = kldiv.kld(a, b)
            else:
                out = fn(a, b)
            w = torch.linspace(0.5, 2.0, out.numel(), dtype=dtype).view(out.shape)
            (out * w).sum().backward()
            res.append((out.detach(), a.grad, b.grad))
        for x, y in zip(*res):
            assert x.shape == y.shape and torch.isfinite(x).all()
            torch.testing.assert_close(x, y, rtol=tol, atol=tol * float(y.abs().max()))

# autograd contracts on the Triton route: values at call time, forward AD, batched backward
import torch.autograd.forward_ad as fwad
def gen(a, b):
    with kldiv.use_generic():
        return kldiv.kld(a, b)
t = torch.tensor(rng.uniform(0.0, 1.0, (16, 37))); p = torch.tensor(rng.uniform(0.0, 1.0, (16, 37)))
buf = t.numpy().copy()
yp = p.clone().requires_grad_()
out = torch_.fused(torch.from_numpy(buf), yp, "triton")
buf[:] = 0.5                                     # refilled before backward
(g,) = torch.autograd.grad(out.sum(), yp)
ref = p.clone().requires_grad_()
torch.testing.assert_close(g, torch.autograd.grad(gen(t, ref).sum(), ref)[0])
dp = torch.randn_like(p)
with fwad.dual_level():
    tan = fwad.unpack_dual(torch_.fused(t, fwad.make_dual(p, dp), "triton")).tangent
torch.testing.assert_close(tan, torch.func.jvp(lambda b: gen(t, b), (p,), (dp,))[1])
yp = p.clone().requires_grad_()
eye = torch.eye(16, dtype=torch.float64)
(gb,) = torch.autograd.grad(torch_.fused(t, yp, "triton"), yp, eye, is_grads_batched=True)
torch.testing.assert_close(gb, torch.autograd.functional.jacobian(lambda b: gen(t, b), p))
print("TRITON-OK")
"""


def test_triton_kernels_interpreted() -> None:
    """The Triton kernels (forward and backward) on CPU tensors, in Triton's interpreter.

    A subprocess, because ``TRITON_INTERPRET`` must be set before Triton is imported.
    """
    _torch()
    pytest.importorskip("triton")
    from test_triton_family import skip_if_triton_interpreter_defective

    skip_if_triton_interpreter_defective()  # Triton <= 3.6.0 with NumPy >= 2.4: see there
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------- JAX
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jax_fast_path_bitwise_equal_to_generic_every_row_length(dtype: str) -> None:
    """The jitted Keras KL runs one fused loop for long rows and keeps the terms apart from the
    row sum for short ones (XLA sums rows of 17-32 classes in another order when fused): bit
    for bit the op-by-op generic kernel at every row length, zeros in y_true included."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    if dtype == "float64" and not jax.config.read("jax_enable_x64"):
        pytest.skip("float64 needs jax_enable_x64")
    rng = np.random.default_rng(11)
    for c in [*range(1, 70), 100, 128, 129, 1000, 4096]:
        t = (rng.random((9, c)) * rng.choice([1e-3, 1.0, 10.0])).astype(dtype)
        t[:, ::3] = 0.0 if c % 2 else t[:, ::3]
        p = rng.random((9, c)).astype(dtype)
        yt, yp = jnp.asarray(t), jnp.asarray(p)
        fast = np.asarray(kldiv.kld(yt, yp))
        with kldiv.use_generic():
            generic = np.asarray(kldiv.kld(yt, yp))
        np.testing.assert_array_equal(fast, generic, err_msg=f"{c} classes")


@pytest.mark.parametrize("shape_t", [(5, 1), (1, 26), (1, 1), (26,), (1,)])
def test_jax_fast_path_bitwise_equal_to_generic_with_broadcast_y_true(
        shape_t: tuple[int, ...]) -> None:
    """kldiv promises bitwise equality of JAX's jitted fast path and the generic kernel. A
    y_true broadcast against y_pred (an axis of size 1) must not let XLA hoist it out of the
    row sum (a different rounding: 1 ulp)."""
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(7)
    for _ in range(20):
        t = rng.random(shape_t).astype(np.float32) * rng.choice([1e-3, 1.0, 10.0])
        p = rng.random((5, 26)).astype(np.float32)
        yt, yp = jnp.asarray(t), jnp.asarray(p)
        fast = np.asarray(kldiv.kld(yt, yp))
        with kldiv.use_generic():
            generic = np.asarray(kldiv.kld(yt, yp))
        np.testing.assert_array_equal(fast, generic)


def test_jax_jit_matches_generic_under_transforms(monkeypatch: pytest.MonkeyPatch) -> None:
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = pytest.importorskip("jax.numpy")
    from kldiv.backends import jax_

    calls: list[int] = []
    real = jax_._kld

    def spy(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(jax_, "_kld", spy)
    t, p = _inputs((1, 30), (16, 30))
    yt, yp = jnp.asarray(t), jnp.asarray(p)
    _close(np.asarray(kldiv.kld(yt, yp)), np.asarray(_generic(yt, yp)), np.float64)
    loss = kldiv.KLDivergence()

    def grads(fn: Any) -> Any:
        return jax.jit(jax.grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1)))(yt, yp)

    for a, b in zip(grads(loss), grads(lambda a, b: _generic(a, b).mean()), strict=True):
        _close(np.asarray(a) * 16, np.asarray(b) * 16, np.float64)
    vm = jax.vmap(kldiv.kld, in_axes=(None, 0))(yt[0], yp)
    _close(np.asarray(vm), oracle(t, p), np.float64)
    assert len(calls) >= 3


# ------------------------------------------------------------------------ every backend (+GPU)
def test_every_backend_fast_path_agrees_with_generic(backend: ArrayBackend) -> None:
    """On each installed backend (CuPy, CUDA where there is a GPU), fast == generic."""
    base = backend.name.split("-")[0]
    if base not in backends.registered():
        pytest.skip(f"{backend.name} has no fast path (the generic kernel is the only one)")
    for dtype in ("float32", "float64"):
        t, p = _inputs((64, 130), (64, 130), dtype=dtype)
        yt, yp = backend.asarray(t, dtype), backend.asarray(p, dtype)
        kernel = backends.fast_path(base)
        assert kernel is not None
        direct = kernel(yt, yp)
        assert direct is not NotImplemented, f"{backend.name} fast path declined"
        assert backend.is_native(direct)
        fast = backend.to_numpy(kldiv.kl_divergence(yt, yp))
        gen = backend.to_numpy(_generic(yt, yp))
        np.testing.assert_array_equal(backend.to_numpy(direct), fast)
        if base == "numpy":
            assert np.array_equal(fast, gen)
        else:
            _close(fast, gen, dtype)
        _close(fast, oracle(t, p), dtype)



def test_numpy_large_fortran_input_is_memory_bounded(numpy_spy: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Above AS_WRITTEN_MAX_BYTES a Fortran-ordered input takes the blocked kernel: no
    full-size temporaries, and the rows are summed as for a C-ordered copy."""
    import tracemalloc

    monkeypatch.setattr(numpy_, "AS_WRITTEN_MAX_BYTES", 1 << 16)
    monkeypatch.setattr(engine, "BLOCK_BYTES", 8192)  # scratch far below the input size
    t, p = _inputs((2000, 300), (2000, 300), dtype=np.float64, special=False)
    tf_, pf = np.asfortranarray(t), np.asfortranarray(p)
    kldiv.kl_divergence(tf_, pf)  # warm-up: thread pool, scratch buffers, lazy imports
    numpy_spy.clear()
    tracemalloc.start()
    try:
        out = kldiv.kl_divergence(tf_, pf)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert numpy_spy == ["blocked"]
    assert np.array_equal(out, _generic(np.ascontiguousarray(t), np.ascontiguousarray(p)))
    full = t.nbytes  # one full-size temporary of the formula
    assert peak < full // 4, (peak, full)


_LAYOUTS = {
    # C-like: the strides of the non-broadcast axes do not grow towards the last axis
    "C": (True, lambda t, p: (t, p)),
    "strided": (True, lambda t, p: (t[::2, 1::3], p[1::2, 2::3])),
    "reversed": (True, lambda t, p: (t[::-1, ::-1], p[:, ::-1])),
    "broadcast": (True, lambda t, p: (t, p[0])),
    # other layouts
    "fortran": (False, lambda t, p: (np.asfortranarray(t), np.asfortranarray(p))),
    "transposed": (False, lambda t, p: (np.ascontiguousarray(t.T).T,
                                        np.ascontiguousarray(p.T).T)),
    "mixed": (False, lambda t, p: (t, np.asfortranarray(p))),
    "3d-swapped": (False, lambda t, p: (t.reshape(20, 20, 300).transpose(0, 2, 1),
                                        p.reshape(20, 20, 300).transpose(0, 2, 1))),
}


@pytest.mark.parametrize("kernel", ["blocked", "small"])
@pytest.mark.parametrize("size", ["within", "above"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_numpy_bitwise_statement_per_layout(layout: str, dtype: Any, size: str, kernel: str,
                                            numpy_spy: list[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly what the README's performance table and docs/performance.md state:

    - C-like layouts (C order, row slices, reversed axes, broadcasting): bitwise the generic
      kernel, at any size;
    - other layouts (Fortran order, transposes, mixed, swapped axes) whose full-size
      temporary is at most ``AS_WRITTEN_MAX_BYTES`` (16 MiB): bitwise the generic kernel
      (the formula as written);
    - such layouts above that size: bitwise the generic kernel on C-ordered copies of the
      inputs (rows summed pairwise), which NumPy's own sum of those layouts is not.
    """
    c_like, make = _LAYOUTS[layout]
    monkeypatch.setattr(engine, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(engine, "MIN_PARALLEL", 1000)
    if kernel == "small":
        monkeypatch.setattr(numpy_, "SMALL_ELEMENTS", 10**9)
    if size == "above":
        monkeypatch.setattr(numpy_, "AS_WRITTEN_MAX_BYTES", 1 << 12)
    t, p = make(*_inputs((400, 300), (400, 300), dtype=dtype))
    assert (numpy_._c_like(t) and numpy_._c_like(p)) == c_like
    fast = kldiv.kl_divergence(t, p)
    gen = _generic(t, p)
    if c_like or size == "within":
        assert set(numpy_spy) == ({kernel} if c_like else {"as_written"})
        assert np.array_equal(fast, gen, equal_nan=True)
        return
    assert numpy_spy and set(numpy_spy) == {kernel}  # (one _run per leading index if 3-D)
    assert np.array_equal(fast, _generic(np.ascontiguousarray(t), np.ascontiguousarray(p)),
                          equal_nan=True)
    if layout in ("fortran", "transposed"):
        # the statement is needed: NumPy sums these rows in another order (one by one, not
        # pairwise), so rows differ in the last bits
        assert not np.array_equal(fast, gen, equal_nan=True)


def test_numpy_masked_arrays_keep_numpy_semantics(numpy_spy: list[str]) -> None:
    """np.ma arrays are not plain ndarrays: the in-place fast paths would drop their masking
    rules, so they take the generic kernel and give the same values as under use_generic()."""
    t = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
    p = np.array([[0.6, 0.4], [0.4, 0.6]], np.float32)
    out = kldiv.kld(np.ma.array(t), p)
    assert numpy_spy == []
    with kldiv.use_generic():
        ref = kldiv.kld(np.ma.array(t), p)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(out), [0.9162892, -3.0809e-06], rtol=1e-5)
