"""The divergence family's compiled CPU kernels (:mod:`kldiv.backends.torch_family_compiled`).

Large CPU inputs (``torch_family.COMPILE_MIN_ELEMENTS`` and up) run kernels compiled by
``torch.compile``; here the threshold is lowered to 0 so that small inputs take that route,
and every check asserts that the compiled kernels really ran. The reference is the generic
kernel (``kldiv.use_generic()``) on the same inputs: values and gradients, every member and
pair of spaces, masked entries, an all ``-inf`` row, NaN rows, half precision and float64.
Also: another shape or temperature does not recompile, a failing compile falls back to the
blocks with one warning, and the switches turn the route off.

Compiling costs seconds per kernel, so the tests share kernels (one per op, pair of spaces
and set of gradients, kept for the process) and each runs under a deadline.
"""

from __future__ import annotations

import math
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import kldiv

torch = pytest.importorskip("torch")
from kldiv.backends import torch_family as TF  # noqa: E402
from kldiv.backends import torch_family_compiled as C  # noqa: E402

INF = math.inf
NAN = math.nan
DEADLINE_S = 240
"""Seconds one test may take (its compiles included) before it fails."""
MEMBERS: dict[str, Callable[..., Any]] = {
    "kl": kldiv.kl_divergence,
    "reverse_kl": kldiv.reverse_kl_divergence,
    "js": kldiv.js_divergence,
}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def compiler() -> None:
    """Skip when torch.compile cannot build CPU kernels here (no C++ compiler, an
    unsupported Python); the kernel it builds is one the tests use."""
    a = torch.randn(4, 8)
    try:
        C.forward("kl", a, a, (True, True), 2.0, 0.5)
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"torch.compile cannot build CPU kernels here: {type(exc).__name__}: {exc}")


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail a test that runs longer than :data:`DEADLINE_S` (POSIX; pytest-timeout is not a
    dependency)."""
    if not hasattr(signal, "setitimer"):  # pragma: no cover - Windows
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"test took more than {DEADLINE_S} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Calls:
    """How often the compiled forward and backward passes ran."""

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0


@pytest.fixture
def route(monkeypatch: pytest.MonkeyPatch, compiler: None, deadline: None) -> Calls:
    """Every CPU call takes the compiled route; the returned counts say how often it ran."""
    monkeypatch.setattr(TF, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(TF, "_COMPILE_FAILURE", None)
    monkeypatch.delenv("KLDIV_NO_COMPILE", raising=False)
    monkeypatch.delenv("KLDIV_GENERIC", raising=False)
    calls = Calls()
    forward, backward = C.forward, C.backward

    def counted_forward(*args: Any, **kwargs: Any) -> Any:
        calls.forward += 1
        return forward(*args, **kwargs)

    def counted_backward(*args: Any, **kwargs: Any) -> Any:
        calls.backward += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(C, "forward", counted_forward)
    monkeypatch.setattr(C, "backward", counted_backward)
    return calls


# -------------------------------------------------------------------------------- inputs
def _spaces(inputs: Any) -> tuple[str, str]:
    return (inputs, inputs) if isinstance(inputs, str) else (inputs[0], inputs[1])


def _side(x: np.ndarray, space: str) -> np.ndarray:
    """Logits ``x`` (with ``-inf`` entries, all ``-inf`` rows, NaN) in ``space``."""
    if space == "logits":
        return x
    t = torch.from_numpy(x)
    lp = torch.log_softmax(t, dim=-1)
    dead = torch.isneginf(t).all(dim=-1)
    lp[dead] = -INF  # the zero measure (log_softmax gives NaN there)
    if space == "log_probs":
        return lp.numpy()
    return torch.exp(lp).numpy()  # probs: exact zeros where masked


def _inputs(seed: int, shape: tuple[int, ...], inputs: Any,
            special: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Teacher and student in their spaces, float64. With ``special``: a masked vocabulary
    (the first two entries ``-inf`` on both sides; not against a ``"probs"`` side, whose
    clipped zeros would make every row's KL infinite), a row masked on the teacher only and
    one on the student only (an infinite forward or reverse KL), a row of all ``-inf`` on
    both sides, and a NaN in one row of each side."""
    rng = np.random.default_rng(seed)
    t = rng.normal(0.0, 3.0, shape)
    s = rng.normal(0.0, 3.0, shape)
    if special:
        rt, rs = t.reshape(-1, shape[-1]), s.reshape(-1, shape[-1])
        if "probs" not in _spaces(inputs):
            rt[:, :2] = rs[:, :2] = -INF
        rt[1, 2:5] = -INF
        rs[2, 3:7] = -INF
        rt[3] = rs[3] = -INF
        rt[5, 4] = NAN
        rs[7, 1 + shape[-1] // 2] = NAN
    st, ss = _spaces(inputs)
    return _side(t, st), _side(s, ss)



def _temperature(inputs: Any, temperature: float) -> float:
    return temperature if "logits" in _spaces(inputs) else 1.0


def _run(member: str, t: np.ndarray, s: np.ndarray, inputs: Any, temperature: float,
         dtype: Any, *, generic: bool, teacher_grad: bool = True, beta: float = 0.5,
         weights: np.ndarray | None = None) -> tuple[Any, Any, Any]:
    """Value, teacher gradient (or ``None``), student gradient of ``sum(value * weights)``."""
    a = torch.tensor(t, dtype=dtype, requires_grad=teacher_grad)
    b = torch.tensor(s, dtype=dtype, requires_grad=True)
    kw = {"beta": beta} if member == "js" else {}
    with kldiv.use_generic(generic):
        out = MEMBERS[member](a, b, inputs=inputs, temperature=temperature, **kw)
    w = torch.ones_like(out) if weights is None else torch.tensor(weights, dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), a.grad, b.grad


def _check(got: tuple[Any, ...], want: tuple[Any, ...], rtol: float, atol: float) -> None:
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)


F32 = {"rtol": 2e-5, "atol": 2e-6}
F64 = {"rtol": 1e-10, "atol": 1e-12}

# (member, inputs, temperature, beta): each pair of spaces once per op ("kl" and
# "reverse_kl" share the kl kernels, the sides swapped)
CASES = [
    ("kl", "logits", 2.0, None),
    ("kl", ("probs", "logits"), 0.5, None),
    ("kl", "log_probs", 1.0, None),
    ("reverse_kl", "logits", 0.5, None),
    ("reverse_kl", ("logits", "log_probs"), 2.0, None),
    ("js", "logits", 2.0, 0.1),
    ("js", ("probs", "logits"), 0.5, 0.9),
    ("js", ("logits", "log_probs"), 1.0, 0.9),
]


# ------------------------------------------------------------------------- values, grads
@pytest.mark.slow
@pytest.mark.parametrize(("member", "inputs", "temperature", "beta"), CASES, ids=str)
def test_compiled_matches_generic(route: Calls, member: str, inputs: Any, temperature: float,
                                  beta: float | None) -> None:
    """Values and both gradients (float32) against the generic kernel: masked entries, an
    all ``-inf`` row, an infinite KL and NaN rows (recomputed by the generic formula)."""
    t, s = _inputs(1, (3, 4, 37), inputs)
    weights = np.random.default_rng(2).uniform(0.5, 2.0, (3, 4))
    kw = {"beta": 0.5 if beta is None else beta, "weights": weights}
    T = _temperature(inputs, temperature)
    want = _run(member, t, s, inputs, T, torch.float32, generic=True, **kw)
    got = _run(member, t, s, inputs, T, torch.float32, generic=False, **kw)
    assert (route.forward, route.backward) == (1, 1)
    _check(got, want, **F32)
    # the special rows are there: NaN rows, elsewhere (most rows) finite
    value = got[0].reshape(-1)
    assert math.isnan(value[5]) and math.isnan(value[7])
    assert torch.isfinite(value[8:]).all()


@pytest.mark.slow
@pytest.mark.parametrize("member", ["kl", "js"])
def test_compiled_float64(route: Calls, member: str) -> None:
    t, s = _inputs(3, (11, 29), "logits")
    want = _run(member, t, s, "logits", 2.0, torch.float64, generic=True, beta=0.3)
    got = _run(member, t, s, "logits", 2.0, torch.float64, generic=False, beta=0.3)
    assert (route.forward, route.backward) == (1, 1)
    _check(got, want, **F64)


@pytest.mark.slow
def test_compiled_student_only(route: Calls) -> None:
    """Distillation: the teacher detached, the gradient w.r.t. the student only (the kernels
    that write one gradient), a (classes,) teacher broadcast to every row."""
    t, s = _inputs(4, (6, 40), "logits", special=False)
    for member in MEMBERS:
        want = _run(member, t, s, "logits", 2.0, torch.float32, generic=True,
                    teacher_grad=False)
        got = _run(member, t, s, "logits", 2.0, torch.float32, generic=False,
                   teacher_grad=False)
        assert got[1] is None
        _check(got, want, **F32)
    assert (route.forward, route.backward) == (3, 3)
    # a broadcast teacher row: zero strides, compiled once more
    teacher = torch.tensor(t[0], dtype=torch.float32)
    outs = []
    for generic in (True, False):
        student = torch.tensor(s, dtype=torch.float32, requires_grad=True)
        with kldiv.use_generic(generic):
            out = kldiv.kl_divergence(teacher, student, inputs="logits", temperature=2.0)
        out.sum().backward()
        outs.append((out.detach(), student.grad))
    assert (route.forward, route.backward) == (4, 4)
    _check(outs[1], outs[0], **F32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compiled_half_precision(route: Calls, dtype: str) -> None:
    """Half-precision inputs are computed in float32 and returned in their dtype."""
    half = getattr(torch, dtype)
    t, s = _inputs(5, (5, 33), "logits", special=False)
    results = []
    for generic in (True, False):
        teacher = torch.tensor(t, dtype=half)
        student = torch.tensor(s, dtype=half, requires_grad=True)
        with kldiv.use_generic(generic):
            out = kldiv.kl_divergence(teacher, student, inputs="logits", temperature=2.0)
        out.sum().backward()
        assert out.dtype == half and student.grad.dtype == half
        results.append((out.detach().float(), student.grad.float()))
    assert (route.forward, route.backward) == (1, 1)
    tol = {"rtol": 1e-2, "atol": 1e-3} if dtype == "bfloat16" else {"rtol": 2e-3, "atol": 1e-4}
    _check(results[1], results[0], **tol)


@pytest.mark.slow
def test_compiled_double_backward_goes_generic(route: Calls) -> None:
    """create_graph=True: the backward pass is autograd's through the generic formula (the
    compiled forward pass still runs)."""
    t, s = _inputs(6, (4, 9), "logits", special=False)
    grads = []
    for generic in (True, False):
        a = torch.tensor(t, requires_grad=True)
        b = torch.tensor(s, requires_grad=True)
        with kldiv.use_generic(generic):
            out = kldiv.js_divergence(a, b, inputs="logits", temperature=2.0, beta=0.3)
        (gb,) = torch.autograd.grad(out.sum(), b, create_graph=True)
        (gab,) = torch.autograd.grad((gb ** 2).sum(), a)
        grads.append((gb.detach(), gab))
    assert (route.forward, route.backward) == (1, 0)
    _check(grads[1], grads[0], **F64)


# -------------------------------------------------------------------------- compiling
@pytest.mark.slow
def test_new_shape_temperature_beta_do_not_recompile(route: Calls) -> None:
    from torch._dynamo.utils import counters

    def call(rows: int, cols: int, temperature: float, beta: float) -> None:
        t, s = _inputs(7, (rows, cols), "logits", special=False)
        a = torch.tensor(t, dtype=torch.float32)
        b = torch.tensor(s, dtype=torch.float32, requires_grad=True)
        kldiv.js_divergence(a, b, inputs="logits", temperature=temperature,
                            beta=beta).sum().backward()
        kldiv.kl_divergence(a, b, inputs="logits", temperature=temperature).sum().backward()

    call(6, 40, 2.0, 0.5)
    graphs = counters["stats"]["unique_graphs"]
    call(9, 123, 0.7, 0.2)
    call(17, 64, 3.0, 0.9)
    assert (route.forward, route.backward) == (6, 6)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_each_kernel_has_its_own_code_object(route: Calls) -> None:
    """Dynamo counts recompiles per code object: two kernels must not share one."""
    t, s = _inputs(8, (4, 16), "logits", special=False)
    a = torch.tensor(t, dtype=torch.float32)
    b = torch.tensor(s, dtype=torch.float32)
    kldiv.kl_divergence(a, b, inputs="logits", temperature=2.0)
    kldiv.js_divergence(a, b, inputs="logits", temperature=2.0)
    fns = [C._COMPILED[("forward", op, True, True)] for op in ("kl", "js")]
    codes = [fn._torchdynamo_orig_callable.__code__ for fn in fns]
    assert codes[0] is not codes[1]
    assert codes[0].co_name != codes[1].co_name


@pytest.mark.slow
def test_failing_compile_warns_once_and_falls_back(route: Calls,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tried = []

    def broken(key: Any) -> Any:
        tried.append(key)
        raise RuntimeError("no C++ compiler here (simulated)")

    monkeypatch.setattr(C, "_compiled", broken)
    t, s = _inputs(9, (10, 21), "logits")
    want = _run("kl", t, s, "logits", 2.0, torch.float32, generic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run("kl", t, s, "logits", 2.0, torch.float32, generic=False)
        again = _run("js", t, s, "logits", 2.0, torch.float32, generic=False)
    mine = [w for w in caught if "torch.compile" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert issubclass(mine[0].category, RuntimeWarning)
    assert "simulated" in str(mine[0].message)
    assert len(tried) == 1  # remembered: not tried again
    assert TF._COMPILE_FAILURE is not None
    _check(got, want, **F32)
    _check(again, _run("js", t, s, "logits", 2.0, torch.float32, generic=True), **F32)


@pytest.mark.slow
def test_failing_backward_compile_falls_back(route: Calls,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled forward ran; compiling the backward fails: the blocks' backward takes
    the compiled forward's statistics (its generic rows too)."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("backward compile failed (simulated)")

    monkeypatch.setattr(C, "backward", broken)
    monkeypatch.setitem(TF.BLOCK_ELEMENTS, "cpu", 100)  # several blocks of rows
    t, s = _inputs(10, (12, 37), "logits")
    want = _run("kl", t, s, "logits", 2.0, torch.float32, generic=True)
    with pytest.warns(RuntimeWarning, match="simulated"):
        got = _run("kl", t, s, "logits", 2.0, torch.float32, generic=False)
    assert route.forward == 1
    _check(got, want, **F32)


@pytest.mark.slow
def test_not_compiled_while_tracing(route: Calls) -> None:
    """Under torch.compile the fast path declines (the generic formula is traced): the
    compiled kernels are never called, nor compiled, from inside a trace."""
    t, s = _inputs(11, (4, 10), "logits", special=False)
    a = torch.tensor(t, dtype=torch.float32)
    b = torch.tensor(s, dtype=torch.float32)
    fn = torch.compile(lambda x, y: kldiv.kl_divergence(x, y, inputs="logits"), fullgraph=True)
    out = fn(a, b)
    assert (route.forward, route.backward) == (0, 0)
    with kldiv.use_generic():
        torch.testing.assert_close(out, kldiv.kl_divergence(a, b, inputs="logits"))


# ------------------------------------------------------------------------- switching off
def _small(requires_grad: bool = True) -> tuple[Any, Any]:
    t, s = _inputs(12, (3, 7), "logits", special=False)
    return torch.tensor(t), torch.tensor(s, requires_grad=requires_grad)


@pytest.mark.parametrize("switch", ["env", "use_generic", "dynamo_disabled", "force_eager",
                                    "threshold"])
def test_switches_turn_the_compiled_route_off(route: Calls, monkeypatch: pytest.MonkeyPatch,
                                              switch: str) -> None:
    a, b = _small()
    with kldiv.use_generic():
        want = kldiv.kl_divergence(a, b, inputs="logits")
    ctx: Any = kldiv.use_generic(False)
    if switch == "env":
        monkeypatch.setenv("KLDIV_NO_COMPILE", "1")
    elif switch == "use_generic":
        ctx = kldiv.use_generic()
    elif switch == "dynamo_disabled":  # (pytest's monkeypatch would delete the option)
        ctx = torch._dynamo.config.patch(disable=True)
    elif switch == "force_eager":
        ctx = torch.compiler.set_stance("force_eager")
    else:
        monkeypatch.setattr(TF, "COMPILE_MIN_ELEMENTS", a.numel() + 1)
    with ctx:
        out = kldiv.kl_divergence(a, b, inputs="logits")
    out.sum().backward()
    assert (route.forward, route.backward) == (0, 0)
    if switch != "use_generic":  # the blocks ran
        assert "_Fused" in str(out.grad_fn.next_functions)
    torch.testing.assert_close(out.detach(), want, **F64)


def test_default_threshold_keeps_small_calls_uncompiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the test's threshold, small calls (the rest of the test suite) never
    compile: the module constant is large and checked."""
    assert TF.COMPILE_MIN_ELEMENTS >= 1 << 20
    called = []
    monkeypatch.setattr(C, "_compiled", lambda key: called.append(key))
    a, b = _small()
    kldiv.js_divergence(a, b, inputs="logits").sum().backward()
    assert called == []


@pytest.mark.slow
def test_kernels_compiled_for_small_inputs_are_parallel(compiler: None, deadline: None) -> None:
    """Inductor picks serial loops for the small input it compiles for, unless told not to,
    and its cache (shared between processes) then hands that kernel to calls of every size:
    the kernels must hold a parallel loop even when first compiled for a tiny input."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    body = C._own_code(C._kl_backward, "kldiv_probe_parallel", logits_a=True, logits_b=True,
                       need_a=False, need_b=True)
    fn = torch.compile(body, dynamic=True, fullgraph=True, options=C._OPTIONS)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    stats, _, _ = C.forward("kl", a, b, (True, True), 2.0, 0.5)
    with inductor_config.patch(fx_graph_cache=False):
        _, codes = run_and_get_code(fn, a, b, *stats, torch.ones(3), C._params(a, 2.0, 0.5))
    assert codes and all("#pragma omp parallel" in code for code in codes)
