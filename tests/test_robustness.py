"""Reliability of the fast paths: fork, interpreter shutdown, re-entry, autograd contracts.

- The thread pool of the NumPy kernels (also used by the torch CPU path) must survive
  ``os.fork`` / ``multiprocessing`` (fork start method) / torch ``DataLoader`` workers, a call
  from an ``atexit`` handler, and re-entry from a signal handler that interrupts a call in the
  same thread. These run in subprocesses with timeouts, so a hang is a failure, never a hung
  test run; each script forces the threaded path whatever the number of CPUs.
- Autograd through the torch fast path must use the values of the inputs *at call time*
  (a NumPy ``y_true`` buffer refilled before ``backward()``), or raise torch's usual in-place
  modification error; forward-mode AD and batched backward must give the generic answer.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import kldiv

posix_only = pytest.mark.skipif(not hasattr(os, "fork"),
                                reason="needs os.fork and SIGALRM (POSIX)")

# Shared prelude of the subprocess scripts: inputs large enough for the threaded path, the
# generic kernel's values to compare with, and a bounded wait for a forked child.
_PRELUDE = """
import json, os, sys, time
import numpy as np
import kldiv
from kldiv.backends import numpy_, numpy_engine
numpy_engine._n_threads = lambda: 4   # the threaded path whatever the number of CPUs
rng = np.random.default_rng(7)
T = rng.uniform(-0.1, 1.1, (600, 300)); P = rng.uniform(-0.1, 1.1, (600, 300))
assert T.size >= numpy_engine.MIN_PARALLEL
with kldiv.use_generic():
    WANT = kldiv.kld(T, P)

def check():
    return bool(np.array_equal(kldiv.kld(T, P), WANT))

def pool_alive():  # live workers (in a forked child: its own, not the parent's dead ones)
    pool = numpy_engine._pool
    return pool is not None and len(pool.threads) >= 3 and all(t.is_alive() for t in pool.threads)

def wait(pid, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hang"

def fork_check(fn):
    pid = os.fork()
    if pid == 0:
        try:
            code = 0 if fn() else 3
        except BaseException:
            import traceback; traceback.print_exc()
            code = 4
        os._exit(code)
    return wait(pid)
"""


def _run_script(body: str, timeout: float = 180) -> dict[str, Any]:
    """Run the prelude + ``body`` in a fresh interpreter; returns its ``RESULT`` JSON line."""
    script = _PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("KLDIV_GENERIC", None)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - the defect this guards
        pytest.fail(f"the script hung (killed after {timeout} s): {exc.stderr!r}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-2000:], proc.stderr[-4000:])
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    return result


def _torch() -> Any:
    return pytest.importorskip("torch")


# ----------------------------------------------------------------------------------- fork
@posix_only
def test_numpy_pool_survives_fork() -> None:
    res = _run_script("""
        import threading, multiprocessing as mp
        out = {}
        assert check()                      # the parent has used (and holds) the pool
        out["os.fork"] = fork_check(lambda: check() and check() and pool_alive())
        # a fork inside a forked child (the child has made its own pool)
        out["nested"] = fork_check(lambda: check() and fork_check(check) == 0)

        def job(_):
            return check() and pool_alive()

        with mp.get_context("fork").Pool(2) as pool:
            try:
                out["mp.Pool"] = all(pool.map_async(job, range(4)).get(timeout=15))
            except mp.TimeoutError:
                out["mp.Pool"] = "hang"
            pool.terminate()
        proc = mp.get_context("fork").Process(target=lambda: sys.exit(0 if check() else 3))
        proc.start(); proc.join(15)
        out["mp.Process"] = proc.exitcode if proc.exitcode is not None else "hang"
        if proc.exitcode is None:
            proc.kill()

        # fork while another thread is inside a threaded call (pool locks/queues held)
        stop = threading.Event()
        def loop():
            while not stop.is_set():
                assert check()
        th = threading.Thread(target=loop); th.start()
        codes = []
        for _ in range(4):
            time.sleep(0.005)
            codes.append(fork_check(check))
            if codes[-1] != 0:
                break
        stop.set(); th.join()
        out["fork-during-call"] = codes
        print("RESULT " + json.dumps(out))
    """)
    assert res == {"os.fork": 0, "nested": 0, "mp.Pool": True, "mp.Process": 0,
                   "fork-during-call": [0] * 4}, res


@posix_only
def test_torch_cpu_survives_fork_and_dataloader_workers() -> None:
    _torch()
    res = _run_script("""
        import torch
        # torch's own intra-op pool (GNU OpenMP) is not fork-safe: once the parent has used
        # it, any torch reduction in a forked child hangs, kldiv or not (torch's DataLoader
        # sets one thread in its workers for this). One thread here, so that what is tested
        # is kldiv's own machinery: the fused CPU path runs on kldiv's NumPy thread pool.
        torch.set_num_threads(1)
        tt, tp = torch.tensor(T), torch.tensor(P)
        small_t, small_p = tt[:4, :100].clone(), tp[:4, :100].clone()
        assert tp.numel() >= 4096 and small_p.numel() < 4096

        def torch_vals():
            yp = tp.clone().requires_grad_()
            out = kldiv.kld(tt, yp)
            out.sum().backward()
            return out.detach(), yp.grad, kldiv.kld(small_t, small_p)

        WANT_T = torch_vals()

        def check_torch():
            return check() and all(torch.equal(a, b) for a, b in zip(torch_vals(), WANT_T))

        assert check_torch()                # the parent has used the pool and torch's threads
        out = {"os.fork": fork_check(check_torch)}

        class DS(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return check_torch()

        loader = torch.utils.data.DataLoader(DS(), batch_size=None, num_workers=2, timeout=15,
                                             multiprocessing_context="fork")
        try:
            out["DataLoader"] = [bool(x) for x in loader]
        except RuntimeError as exc:
            out["DataLoader"] = str(exc)[:200]
        print("RESULT " + json.dumps(out))
    """)
    assert res == {"os.fork": 0, "DataLoader": [True] * 4}, res


# --------------------------------------------------------------------------------- atexit
_ATEXIT_BODY = """
    import atexit
    try:
        import torch                        # (importing torch inside atexit fails on its own)
    except ImportError:
        torch = None
    out = {}
    if {use_first}:
        assert check()                      # pool made (and shut down at exit) before atexit

    @atexit.register
    def at_exit():
        try:
            out["numpy"] = check()
            if torch is None:
                out["torch"] = True
            else:
                yp = torch.tensor(P, requires_grad=True)
                res = kldiv.kld(torch.tensor(T), yp)
                res.sum().backward()
                out["torch"] = bool(np.array_equal(res.detach().numpy(), WANT)
                                    and yp.grad is not None and bool(torch.isfinite(yp.grad).all()))
        except BaseException as exc:
            out["error"] = repr(exc)
        print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("pool_used_before", [True, False])
def test_large_call_inside_atexit_handler(pool_used_before: bool) -> None:
    res = _run_script(_ATEXIT_BODY.replace("{use_first}", str(pool_used_before)))
    assert res == {"numpy": True, "torch": True}, res


def test_backend_first_imported_inside_atexit_handler() -> None:
    """``kldiv.backends.numpy_`` imported for the first time while the interpreter exits
    (``kldiv`` imported as usual, its NumPy backend only on the first NumPy call)."""
    script = textwrap.dedent("""
        import atexit, json, sys, threading
        import kldiv
        assert "kldiv.backends.numpy_" not in sys.modules
        @atexit.register
        def at_exit():
            import numpy as np
            t, p = np.random.rand(600, 300), np.random.rand(600, 300)
            with kldiv.use_generic():
                want = kldiv.kld(t, p)
            print("RESULT " + json.dumps(bool(np.array_equal(kldiv.kld(t, p), want))), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "RESULT true" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------- re-entry
@posix_only
def test_signal_handler_reentry_gets_its_own_scratch() -> None:
    """A SIGALRM handler calls kldiv while the main thread is inside a call (single-threaded
    blocked, threaded, and the torch forward/backward): every result must be exact."""
    res = _run_script("""
        import signal
        try:
            import torch
        except ImportError:
            torch = None
        r2 = np.random.default_rng(8)
        MED = (r2.uniform(-0.1, 1.1, (64, 1000)), r2.uniform(-0.1, 1.1, (64, 1000)))
        HND = (r2.uniform(-0.1, 1.1, (64, 1000)), r2.uniform(-0.1, 1.1, (64, 1000)))
        assert numpy_.SMALL_ELEMENTS < MED[0].size < numpy_engine.MIN_PARALLEL  # blocked, in-thread
        with kldiv.use_generic():
            W_MED, W_HND = kldiv.kld(*MED), kldiv.kld(*HND)

        def torch_call(t, p):
            yp = torch.tensor(p, requires_grad=True)
            out = kldiv.kld(torch.tensor(t), yp)
            out.sum().backward()
            return out.detach().numpy(), yp.grad.numpy()

        W_TORCH = torch_call(*MED) if torch else None
        W_TORCH_H = torch_call(*HND) if torch else None
        stats = {"handler": 0, "handler_in_call": 0, "bad_main": 0, "bad_handler": 0}
        in_call = False

        in_handler = False

        def handler(signum, frame):
            global in_handler
            if in_handler:                  # a tick during the handler itself: skip it
                return
            in_handler = True
            try:
                stats["handler"] += 1
                stats["handler_in_call"] += in_call
                ok = np.array_equal(kldiv.kld(*HND), W_HND)
                if torch is not None:
                    with torch.enable_grad():   # the tick may land inside a backward pass
                        ok = ok and all(np.array_equal(a, b)
                                        for a, b in zip(torch_call(*HND), W_TORCH_H))
                stats["bad_handler"] += not ok
            finally:
                in_handler = False

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.003, 0.003)
        end = time.monotonic() + 2.5
        main_calls = 0
        try:
            while time.monotonic() < end:
                in_call = True
                ok = np.array_equal(kldiv.kld(*MED), W_MED) and check()
                if torch is not None:
                    ok = ok and all(np.array_equal(a, b)
                                    for a, b in zip(torch_call(*MED), W_TORCH))
                in_call = False
                main_calls += 1
                stats["bad_main"] += not ok
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
        stats["main_calls"] = main_calls
        print("RESULT " + json.dumps(stats))
    """)
    assert res["handler_in_call"] >= 20, res  # the handler really interrupted calls
    assert res["bad_main"] == 0 and res["bad_handler"] == 0, res


# -------------------------------------------------------------------- torch saved inputs
def _grads_at(t: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/dt and d/dp of ``sum(w * loss)`` (float64, same shapes), 0 where clipped."""
    t64, p64 = t.astype(np.float64), p.astype(np.float64)
    tc, pc = np.clip(t64, 1e-7, 1), np.clip(p64, 1e-7, 1)
    wc = np.asarray(w, np.float64)[..., None]
    gt = np.where(tc == t64, np.log(tc / pc) + 1, 0) * wc
    gp = np.where(pc == p64, -tc / pc, 0) * wc
    return gt, gp


def _close(a: Any, b: np.ndarray, dtype: Any) -> None:
    rtol = 2e-4 if np.dtype(dtype) == np.float32 else 1e-10
    np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def _fused_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_numpy_y_true_refilled_before_backward(dtype: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A reused loader buffer: gradients use the values of ``y_true`` at call time."""
    torch = _torch()
    spy = _fused_spy(monkeypatch)
    rng = np.random.default_rng(3)
    t1, t2, t3 = (rng.uniform(0.0, 1.0, (200, 32)).astype(dtype) for _ in range(3))
    p = rng.uniform(0.0, 1.0, (200, 32)).astype(dtype)
    buf = t1.copy()
    yp = torch.tensor(p, requires_grad=True)
    loss = kldiv.kld(buf, yp).sum()
    buf[:] = t2                                     # the loader refills its buffer
    loss.backward()
    _close(yp.grad, _grads_at(t1, p, np.ones(200))[1], dtype)
    # gradient accumulation: two calls on one buffer, refilled in between, one backward
    yp.grad = None
    buf[:] = t2
    total = kldiv.kld(buf, yp).sum()
    buf[:] = t3
    total = total + kldiv.kld(buf, yp).sum()
    buf[:] = t1
    total.backward()
    want = _grads_at(t2, p, np.ones(200))[1] + _grads_at(t3, p, np.ones(200))[1]
    _close(yp.grad, want, dtype)
    assert spy == ["numpy"] * 3


def test_torch_external_memory_inputs_refilled_before_backward(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors over NumPy memory (``torch.from_numpy``) as ``y_true`` and as a leaf ``y_pred``:
    writes through NumPy are invisible to autograd's version counter, so the fast path must
    not read them back in ``backward``; first and second derivatives stay right."""
    torch = _torch()
    spy = _fused_spy(monkeypatch)
    rng = np.random.default_rng(4)
    t, p = rng.uniform(0.0, 1.0, (2, 200, 32))
    w = rng.uniform(0.5, 2.0, 200)
    tb, pb = t.copy(), p.copy()
    yt = torch.from_numpy(tb).requires_grad_()
    yp = torch.from_numpy(pb).requires_grad_()
    out = kldiv.kld(yt, yp)
    tb[:] = rng.uniform(0.0, 1.0, tb.shape)
    pb[:] = rng.uniform(0.0, 1.0, pb.shape)
    gt, gp = torch.autograd.grad((out * torch.from_numpy(w)).sum(), (yt, yp), create_graph=True)
    gt_want, gp_want = _grads_at(t, p, w)
    _close(gt.detach(), gt_want, np.float64)
    _close(gp.detach(), gp_want, np.float64)
    # the second derivative d/dp of sum(d loss/dp) = t / p**2 * w (inside the clip range)
    (h,) = torch.autograd.grad(gp.sum(), yp)
    _close(h, t / p**2 * w[:, None], np.float64)
    assert spy == ["numpy"]


@pytest.mark.parametrize("which", ["y_true", "y_pred"])
def test_torch_inplace_change_before_backward_is_never_silent(
        which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch tensors changed in place after the call: torch's in-place error, or the right
    gradient; never a silently wrong one."""
    torch = _torch()
    spy = _fused_spy(monkeypatch)
    rng = np.random.default_rng(5)
    t, p = rng.uniform(0.0, 1.0, (2, 200, 32))
    yt = torch.tensor(t, requires_grad=which == "y_true")
    yp = torch.tensor(p, requires_grad=True)
    out = kldiv.kld(yt, yp).sum()
    with torch.no_grad():                           # e.g. an optimizer step before backward
        (yt if which == "y_true" else yp).mul_(0.5)
    try:
        out.backward()
    except RuntimeError as exc:
        assert "modified by an inplace operation" in str(exc)
    else:
        _close(yp.grad, _grads_at(t, p, np.ones(200))[1], np.float64)
    assert spy == ["numpy"]


_WEIGHT_SCALE = {"sum": lambda w: 1.0, "none": lambda w: 1.0,
                 "mean_with_sample_weight": lambda w: 1.0 / float(np.sum(w)),
                 "auto": lambda w: 1.0 / w.size}


@pytest.mark.parametrize("reduction", sorted(_WEIGHT_SCALE))
@pytest.mark.parametrize("kind", ["numpy", "torch.from_numpy"])
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_torch_numpy_sample_weight_refilled_before_backward(
        path: str, kind: str, reduction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``loss * w`` saves ``w`` for backward: a weight over NumPy memory (converted without a
    copy, or ``torch.from_numpy``) refilled before ``backward()`` must not change the
    gradient, on the fast and the generic path, for every reduction."""
    torch = _torch()
    spy = _fused_spy(monkeypatch)
    rng = np.random.default_rng(11)
    t, p = rng.uniform(0.0, 1.0, (2, 200, 32))
    w1, w2 = rng.uniform(0.0, 2.0, (2, 200))
    buf = w1.copy()
    weight = buf if kind == "numpy" else torch.from_numpy(buf)
    yp = torch.tensor(p, requires_grad=True)
    loss_fn = kldiv.KLDivergence(reduction=reduction)
    if path == "generic":
        with kldiv.use_generic():
            out = loss_fn(t, yp, sample_weight=weight)
    else:
        out = loss_fn(t, yp, sample_weight=weight)
    buf[:] = w2                                     # the loader refills its buffer
    out.sum().backward()
    _close(yp.grad, _grads_at(t, p, w1)[1] * _WEIGHT_SCALE[reduction](w1), np.float64)
    assert spy == (["numpy"] if path == "fast" else [])


def test_call_time_values_copies_only_foreign_memory_saved_for_backward() -> None:
    """The copy is made only where it is needed: grad mode on, a peer that requires grad,
    memory torch does not own."""
    torch = _torch()
    from kldiv import _convert

    call_time_values = _convert.call_time_values

    a = np.ones(8)
    foreign, own = torch.from_numpy(a), torch.ones(8, dtype=torch.float64)
    peer, plain = torch.ones(8, requires_grad=True), torch.ones(8)
    assert call_time_values(own, peer) is own
    assert call_time_values(foreign, plain) is foreign
    with torch.no_grad():
        assert call_time_values(foreign, peer) is foreign
    copy = call_time_values(foreign, peer)
    assert copy is not foreign and copy.untyped_storage().resizable()
    a[:] = 2
    assert float(copy.sum()) == 8.0


def test_jax_inputs_from_torch_changed_after_call() -> None:
    """torch tensors reach JAX through DLPack, which aliases CPU memory. JAX arrays are
    immutable: JAX dispatches asynchronously and ``jax.vjp`` keeps residuals for later, so a
    torch ``y_true`` / ``sample_weight`` changed in place after the call must change neither
    the result nor the gradient."""
    torch = _torch()
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(12)
    t, t2 = rng.uniform(0.0, 1.0, (2, 200, 32)).astype(np.float32)
    p = rng.uniform(0.0, 1.0, (200, 32)).astype(np.float32)
    w1, w2 = rng.uniform(0.0, 2.0, (2, 200)).astype(np.float32)
    loss_fn = kldiv.KLDivergence(reduction="sum")
    yt, yw = torch.tensor(t), torch.tensor(w1)
    value, vjp = jax.vjp(lambda q: loss_fn(yt, q, sample_weight=yw), jnp.asarray(p))
    yt.copy_(torch.tensor(t2))
    yw.copy_(torch.tensor(w2))
    (g,) = vjp(jnp.ones((), jnp.float32))
    _close(g, _grads_at(t, p, w1)[1], np.float32)
    _close(value, float(np.sum(w1 * _oracle64(t, p))), np.float32)
    # the forward pass alone: JAX may run it after kldiv returns (asynchronous dispatch)
    big_t = rng.uniform(0.0, 1.0, (2000, 1000)).astype(np.float32)
    big_p = jnp.asarray(rng.uniform(0.0, 1.0, (2000, 1000)).astype(np.float32))
    want = np.asarray(kldiv.kld(jnp.asarray(big_t), big_p))
    for _ in range(5):
        src = torch.tensor(big_t)
        out = kldiv.kld(src, big_p)
        src.zero_()
        np.testing.assert_array_equal(np.asarray(out), want)


def _oracle64(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    tc = np.clip(t.astype(np.float64), 1e-7, 1)
    pc = np.clip(p.astype(np.float64), 1e-7, 1)
    return np.sum(tc * np.log(tc / pc), axis=-1)


def test_tensorflow_inputs_from_torch_changed_before_gradient() -> None:
    """torch tensors reach TensorFlow through DLPack (zero-copy); a ``GradientTape`` keeps
    them for ``tape.gradient``: changing them in place in between must not change it."""
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("needs tensorflow and torch")
    res = _run_script("""
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import torch
        import tensorflow as tf
        rng = np.random.default_rng(13)
        t, t2, p = rng.uniform(0.0, 1.0, (3, 200, 32))
        w1, w2 = rng.uniform(0.0, 2.0, (2, 200))
        loss_fn = kldiv.KLDivergence(reduction="sum")

        def grad(y_true, weight, change=None):
            v = tf.Variable(p)
            with tf.GradientTape() as tape:
                loss = loss_fn(y_true, v, sample_weight=weight)
            if change:
                change()
            return tape.gradient(loss, v).numpy()

        want = grad(t, w1)
        yt, yw = torch.tensor(t), torch.tensor(w1)
        got = grad(yt, yw, lambda: (yt.copy_(torch.tensor(t2)), yw.copy_(torch.tensor(w2))))
        print("RESULT " + json.dumps({"diff": float(np.abs(got - want).max())}))
    """)
    assert res["diff"] < 1e-12, res


# ------------------------------------------------------------ forward AD, batched backward
def _fwd_inputs(torch: Any) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(6)
    t, p = rng.uniform(-0.1, 1.1, (2, 64, 100))        # 6400 elements: the fused route
    return torch.tensor(t), torch.tensor(p), t, p


def _generic_jvp(torch: Any, t: Any, p: Any, dt: Any, dp: Any) -> tuple[Any, Any]:
    with kldiv.use_generic():
        return torch.func.jvp(kldiv.kld, (t, p), (dt, dp))


@pytest.mark.parametrize("tangents", ["both", "y_pred", "y_true"])
def test_torch_forward_mode_ad(tangents: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = _torch()
    fwad = torch.autograd.forward_ad
    spy = _fused_spy(monkeypatch)
    yt, yp, _, _ = _fwd_inputs(torch)
    dt = torch.randn_like(yt) if tangents != "y_pred" else torch.zeros_like(yt)
    dp = torch.randn_like(yp) if tangents != "y_true" else torch.zeros_like(yp)
    want_out, want_tan = _generic_jvp(torch, yt, yp, dt, dp)
    with fwad.dual_level():
        a = fwad.make_dual(yt, dt) if tangents != "y_pred" else yt
        b = fwad.make_dual(yp, dp) if tangents != "y_true" else yp
        primal, tangent = fwad.unpack_dual(kldiv.kld(a, b))
        assert tangent is not None
        torch.testing.assert_close(primal, want_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(tangent, want_tan, rtol=1e-10, atol=1e-10)
    assert spy == ["numpy"]


def test_torch_forward_over_reverse(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward-mode AD through the backward pass (a Hessian-vector product)."""
    torch = _torch()
    fwad = torch.autograd.forward_ad
    _fused_spy(monkeypatch)
    yt, yp, t, p = _fwd_inputs(torch)
    v = torch.randn_like(yp)
    with fwad.dual_level():
        b = fwad.make_dual(yp.clone().requires_grad_(), v)
        (g,) = torch.autograd.grad(kldiv.kld(yt, b).sum(), b)
        hvp = fwad.unpack_dual(g).tangent
    assert hvp is not None
    inside = (p >= 1e-7) & (p <= 1)
    tc, pc = np.clip(t, 1e-7, 1), np.clip(p, 1e-7, 1)
    _close(hvp, np.where(inside, tc / pc**2, 0) * v.numpy(), np.float64)


def test_torch_batched_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """``jacobian(vectorize=True)``, ``hessian(vectorize=True)`` and
    ``autograd.grad(is_grads_batched=True)`` through the fast path equal the generic ones."""
    torch = _torch()
    spy = _fused_spy(monkeypatch)
    rng = np.random.default_rng(9)
    t, p = rng.uniform(-0.1, 1.1, (2, 128, 40))       # 5120 elements, 128 rows
    yt = torch.tensor(t)

    def jac(fn: Any, **kw: Any) -> Any:
        return torch.autograd.functional.jacobian(lambda a: fn(yt, a), torch.tensor(p), **kw)

    def generic(a: Any, b: Any) -> Any:
        with kldiv.use_generic():
            return kldiv.kld(a, b)

    want = jac(generic)
    torch.testing.assert_close(jac(kldiv.kld, vectorize=True), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jac(kldiv.kld, vectorize=True, strategy="forward-mode"), want,
                               rtol=1e-10, atol=1e-12)
    yp = torch.tensor(p, requires_grad=True)
    eye = torch.eye(128, dtype=torch.float64)
    (g,) = torch.autograd.grad(kldiv.kld(yt, yp), yp, eye, is_grads_batched=True)
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    (g2,) = torch.autograd.grad(kldiv.kld(yt, yp), yp, eye, is_grads_batched=True,
                                create_graph=True)
    torch.testing.assert_close(g2, want, rtol=1e-10, atol=1e-12)
    assert spy and set(spy) == {"numpy"}
    # a Hessian (batched double backward) of a small input, made to take the fused route
    from kldiv.backends import torch_

    monkeypatch.setattr(torch_, "MIN_ELEMENTS", 16)
    del spy[:]
    ts, ps = yt[:6, :8], torch.tensor(p[:6, :8])

    def loss(a: Any, fn: Any = kldiv.kld) -> Any:
        return fn(ts, a).sum()

    h = torch.autograd.functional.hessian(loss, ps, vectorize=True)
    torch.testing.assert_close(h, torch.autograd.functional.hessian(
        lambda a: loss(a, generic), ps), rtol=1e-10, atol=1e-12)
    assert spy and set(spy) == {"numpy"}


def test_torch_func_transforms_through_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.func grad / vmap / jacrev / jacfwd / jvp / hessian agree with the generic path."""
    torch = _torch()
    from kldiv.backends import torch_

    monkeypatch.setattr(torch_, "MIN_ELEMENTS", 16)  # small inputs take the fused route
    func = torch.func
    yt, yp, _, _ = _fwd_inputs(torch)
    yt, yp = yt[:6, :8], yp[:6, :8]
    assert torch_._route(yt, yp) == "numpy"  # outside the transforms

    def generic(a: Any, b: Any) -> Any:
        with kldiv.use_generic():
            return kldiv.kld(a, b)

    transforms = {
        "grad": (lambda f: func.grad(lambda b: f(yt, b).sum()), (yp,)),
        "vmap": (lambda f: func.vmap(f), (yt, yp)),
        "jacrev": (lambda f: func.jacrev(lambda b: f(yt, b)), (yp,)),
        "jacfwd": (lambda f: func.jacfwd(lambda b: f(yt, b)), (yp,)),
        "hessian": (lambda f: func.hessian(lambda b: f(yt, b).sum()), (yp,)),
        "vmap(grad)": (lambda f: func.vmap(func.grad(lambda a, b: f(a, b).sum(), argnums=1)),
                       (yt, yp)),
    }
    for name, (transform, args) in transforms.items():
        got, want = transform(kldiv.kld)(*args), transform(generic)(*args)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    out, tan = func.jvp(lambda b: kldiv.kld(yt, b), (yp,), (torch.ones_like(yp),))
    w_out, w_tan = func.jvp(lambda b: generic(yt, b), (yp,), (torch.ones_like(yp),))
    torch.testing.assert_close((out, tan), (w_out, w_tan), rtol=1e-10, atol=1e-12)
