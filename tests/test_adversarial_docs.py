"""Documentation claims audit: statements of behaviour in README.md and docs/*.md that no other
test checks, each probed on the backends it names, against the float64 oracle where there is
a value.

Some of them found defects (Dask chunks of unknown size through the sample-weight rank rules,
a dtype attribute set after construction), fixed in ``src/``.
"""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend, Backend, oracle

SEED_T = np.array([[0, 1], [0, 0]], dtype=np.float32)
SEED_P = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)

REDUCING = ["auto", "sum", "mean", "sum_over_batch_size", "mean_with_sample_weight", "batchmean"]
LOSS_CLASSES = [kldiv.KLDivergence, kldiv.ReverseKLDivergence, kldiv.JensenShannonDivergence]


# ---------------------------------------------------------------- README: "dtypes"


@pytest.mark.parametrize("cls", LOSS_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("reduction", REDUCING)
@pytest.mark.parametrize("case", ["batch", "empty", "zero_weights"])
def test_reduced_numpy_results_are_numpy_scalars(cls: type, reduction: str, case: str) -> None:
    """README: 'Reduced NumPy results are NumPy scalars (np.float32(...)) ... the loss class for
    every reducing reduction (an empty batch and a zero weight sum included)'; semantics.md
    says the same of every loss class."""
    t, p, w = SEED_T, SEED_P, np.array([0.8, 0.2], np.float32)
    if case == "empty":
        t, p, w = t[:0], p[:0], w[:0]
    elif case == "zero_weights":
        w = np.zeros(2, np.float32)
    out = cls(reduction=reduction)(t, p, sample_weight=w)
    assert type(out) is np.float32, (type(out), out)
    if case != "batch":
        assert out == 0.0


@pytest.mark.parametrize("fn", [kldiv.kl_divergence, kldiv.reverse_kl_divergence, kldiv.js_divergence],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_function_on_one_distribution_is_a_numpy_scalar(fn: Any, dtype: Any) -> None:
    """README/semantics.md: the functions on 1-d NumPy inputs give a NumPy scalar of the
    inputs' floating dtype."""
    out = fn(SEED_T[0].astype(dtype), SEED_P[0].astype(dtype))
    assert type(out) is dtype


def test_python_float_weight_stays_float64(backend: ArrayBackend) -> None:
    """README's differences table: 'Python-float scalar weight with float64 inputs | kept in
    float64' (tf.keras rounds it to float32 first). 0.1 is not a float32 number, so the
    weighted losses must be exactly the float64 losses times the float64 0.1."""
    if "float64" not in backend.float_dtypes:
        pytest.skip(f"{backend}: no float64")
    t = backend.asarray(SEED_T, dtype="float64")
    p = backend.asarray(SEED_P, dtype="float64")
    out = backend.to_numpy(kldiv.KLDivergence(reduction="none")(t, p, sample_weight=0.1))
    per_sample = backend.to_numpy(kldiv.kld(t, p))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, per_sample * 0.1)
    rounded = per_sample * float(np.float32(0.1))
    assert not np.array_equal(out, rounded)  # the control: a float32 weight differs


def test_float16_overflow_case_is_finite(backend: ArrayBackend) -> None:
    """README's differences table and SPEC: float16 ``KLD([[1, 0]], [[1e-8, 1]])`` is finite
    (computed in float32, rounded), where Keras gives inf; the result stays float16."""
    if "float16" not in backend.float_dtypes:
        pytest.skip(f"{backend}: no float16 in this library")
    t = backend.asarray([[1.0, 0.0]], dtype="float16")
    p = backend.asarray([[1e-8, 1.0]], dtype="float16")
    out = kldiv.kld(t, p)
    assert out.dtype == backend.dtype("float16")
    got = backend.to_numpy(out)
    # the float32 computation on the float16 inputs, rounded once to float16
    expected = oracle(np.array([[1.0, 0.0]], np.float16), np.array([[1e-8, 1.0]], np.float16)).astype(np.float16)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got.astype(np.float64), expected.astype(np.float64), rtol=1e-3)


# ---------------------------------------------------------------- README: "Reductions"


def test_shape_rows_of_the_differences_table(backend: ArrayBackend) -> None:
    """README's differences table: y_true (3, 1) with y_pred (3,): the function gives (3,)
    (broadcast), the class with reduction='none' gives () (Keras 2's rank squeeze); two 0-d
    inputs are a ValueError (no class axis); a weight that does not broadcast is a
    ValueError naming both shapes."""
    t = backend.asarray(np.full((3, 1), 0.5, np.float32))
    p = backend.asarray(np.full(3, 0.3, np.float32))
    f = kldiv.kld(t, p)
    c = kldiv.KLDivergence(reduction="none")(t, p)
    assert tuple(f.shape) == (3,)
    assert tuple(c.shape) == ()
    np.testing.assert_allclose(backend.to_numpy(f), oracle(np.full((3, 1), 0.5), np.full(3, 0.3)),
                               rtol=1e-6)
    np.testing.assert_allclose(backend.to_numpy(c), oracle(np.full(3, 0.5), np.full(3, 0.3)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="class axis"):
        kldiv.kld(backend.asarray(np.float32(0.5)), backend.asarray(np.float32(0.5)))
    with pytest.raises(ValueError, match=r"\(1, 3, 4\).*\(1,\)"):
        kldiv.KLDivergence()(backend.asarray(SEED_T[:1]), backend.asarray(SEED_P[:1]),
                             sample_weight=np.ones((1, 3, 4), np.float32))


def test_config_forms_of_the_readme() -> None:
    """README: get_config() gives {"reduction": "auto", "name": "kl_divergence"}; from_config
    reads that, Keras 2 configs (an extra "fn" key) and Keras 3 configs (None reduction,
    "dtype"); the class pickles and has a readable repr."""
    loss = kldiv.KLDivergence()
    assert loss.get_config() == {"reduction": "auto", "name": "kl_divergence"}
    keras2 = kldiv.KLDivergence.from_config(
        {"reduction": "sum", "name": "kl_divergence", "fn": "kl_divergence"})
    assert keras2.get_config() == {"reduction": "sum", "name": "kl_divergence"}
    keras3 = kldiv.KLDivergence.from_config({"reduction": None, "name": "k", "dtype": "float64"})
    assert keras3(SEED_T, SEED_P).dtype == np.float64
    assert keras3(SEED_T, SEED_P).shape == (2,)
    again = pickle.loads(pickle.dumps(keras3))
    assert again.get_config() == keras3.get_config()
    assert repr(kldiv.KLDivergence(reduction="sum")) == "KLDivergence(reduction='sum', name='kl_divergence')"


DTYPE_OBJECTS = {
    "numpy": lambda: np.float64,
    "numpy-dtype": lambda: np.dtype("float64"),
    "torch": lambda: pytest.importorskip("torch").float64,
    "jax": lambda: pytest.importorskip("jax.numpy").float64,
    "array_api_strict": lambda: pytest.importorskip("array_api_strict").float64,
}


@pytest.mark.parametrize("source", list(DTYPE_OBJECTS))
@pytest.mark.parametrize("cls", [kldiv.KLDivergence, kldiv.metrics.KLDivergence],
                         ids=["loss", "metric"])
def test_dtype_objects_are_stored_as_names(source: str, cls: type) -> None:
    """README: 'dtype= (the loss class, the metric) takes a name or any library's dtype object
    and is stored as its name (get_config() gives "float64")'."""
    obj = cls(dtype=DTYPE_OBJECTS[source]())
    assert obj.get_config()["dtype"] == "float64"
    assert obj.dtype == "float64"


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_dtype_set_after_construction_is_configured_by_name(source: str) -> None:
    """semantics.md: 'A loss' reduction and dtype attributes may be set after construction';
    README: dtype 'is stored as its name (get_config() gives "float64")'. A config holding
    a library's dtype object is not what the README promises (nor JSON-serialisable)."""
    loss = kldiv.KLDivergence()
    loss.dtype = DTYPE_OBJECTS[source]()
    assert loss(SEED_T, SEED_P).dtype == np.float64
    assert loss.get_config()["dtype"] == "float64"


def test_metric_dtype_set_after_construction() -> None:
    """The metric's dtype attribute set to a library's dtype object after construction: the
    result is in that dtype (as for the loss), not a TypeError from getattr."""
    torch = pytest.importorskip("torch")
    metric = kldiv.metrics.KLDivergence()
    try:
        metric.dtype = torch.float64
    except AttributeError:  # with Keras imported the metric is a Keras Metric: read-only
        pytest.skip("with Keras imported the metric is a keras Metric, whose dtype is a "
                    "read-only property (Keras' rule)")
    metric.update_state(SEED_T, SEED_P)
    assert metric.result().dtype == np.float64


# ---------------------------------------------------------------- README: Dask


def _unknown_rows(x: np.ndarray, chunk: int = 4) -> Any:
    """A Dask array of ``x`` whose row chunks have unknown (NaN) sizes, as after a boolean
    mask: every row is kept."""
    da = pytest.importorskip("dask.array")
    a = da.from_array(x, chunks=(chunk, *x.shape[1:]))
    flat = a.reshape(a.shape[0], -1) if a.ndim > 1 else a[:, None]
    out = a[flat[:, 0] == flat[:, 0]]
    assert np.isnan(out.shape[0])
    return out


def _unknown_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    t = rng.dirichlet(np.ones(5), size=12).astype(np.float32)
    p = rng.dirichlet(np.ones(5), size=12).astype(np.float32)
    w = rng.random(12).astype(np.float32)
    return t, p, w


@pytest.mark.parametrize("reduction", ["auto", "sum", "mean_with_sample_weight", "batchmean"])
def test_dask_unknown_chunks_scalar_weight(reduction: str) -> None:
    """README (Dask): 'the loss class (every reduction, every sample_weight form, also Dask
    weights and chunks of unknown size)': the scalar form."""
    t, p, _ = _unknown_data()
    out = kldiv.KLDivergence(reduction=reduction)(_unknown_rows(t), _unknown_rows(p), sample_weight=2.0)
    expected = kldiv.KLDivergence(reduction=reduction)(t, p, sample_weight=2.0)
    np.testing.assert_allclose(out.compute(), expected, rtol=2e-6)


@pytest.mark.parametrize("reduction", ["auto", "sum", "none", "mean_with_sample_weight", "batchmean"])
def test_dask_unknown_chunks_column_weight(reduction: str) -> None:
    """A (B, 1) Dask weight (rank r + 1 with a last axis of 1: squeezed) on inputs whose row
    chunks have unknown sizes."""
    t, p, w = _unknown_data()
    loss = kldiv.KLDivergence(reduction=reduction)
    out = loss(_unknown_rows(t), _unknown_rows(p), sample_weight=_unknown_rows(w[:, None]))
    np.testing.assert_allclose(out.compute(), loss(t, p, sample_weight=w[:, None]), rtol=2e-6)


@pytest.mark.parametrize("face", ["ReverseKLDivergence", "JensenShannonDivergence", "KLEstimator",
                                  "evaluate_batches"])
def test_dask_unknown_chunks_column_weight_siblings(face: str) -> None:
    """The same (B, 1) Dask weight on unknown row sizes through the other faces that share
    the sample-weight rules (estimators.md: 'Keras 2's rank rules'; README: evaluate_batches
    gives what the loss class gives)."""
    t, p, w = _unknown_data()
    args: tuple[Any, Any] = (t, p)
    if face == "KLEstimator":
        args = (np.log(t[:, 0]), np.log(p[:, 0]))
    dargs = tuple(_unknown_rows(a) for a in args)
    dw = _unknown_rows(w[:, None])
    if face == "evaluate_batches":
        out = kldiv.evaluate_batches([dargs[0]], [dargs[1]], [dw])
        expected = kldiv.KLDivergence()(t, p, sample_weight=w[:, None])
    else:
        loss = getattr(kldiv, face)()
        out = loss(*dargs, sample_weight=dw)
        expected = loss(*args, sample_weight=w[:, None])
    np.testing.assert_allclose(out.compute(), expected, rtol=2e-6)


def test_dask_unknown_chunks_row_weight_on_a_sequence_loss() -> None:
    """A (B,) Dask weight on a (B, T) per-sample loss (rank r - 1: a trailing axis is added,
    each row scaled), rows of unknown sizes."""
    rng = np.random.default_rng(8)
    t = rng.dirichlet(np.ones(4), size=(10, 3)).astype(np.float32)
    p = rng.dirichlet(np.ones(4), size=(10, 3)).astype(np.float32)
    w = rng.random(10).astype(np.float32)
    loss = kldiv.KLDivergence(reduction="sum")
    out = loss(_unknown_rows(t), _unknown_rows(p), sample_weight=_unknown_rows(w))
    np.testing.assert_allclose(out.compute(), loss(t, p, sample_weight=w), rtol=2e-6)


def test_dask_unknown_chunks_rank_squeeze() -> None:
    """SPEC/README: y_true (B, 1) with y_pred (B,): the class squeezes y_true's axis of 1
    (Keras 2's rank squeeze), also for rows of unknown sizes."""
    t, p, _ = _unknown_data()
    loss = kldiv.KLDivergence(reduction="none")
    out = loss(_unknown_rows(t[:, :1]), _unknown_rows(p[:, 0]))
    np.testing.assert_allclose(out.compute(), loss(t[:, :1], p[:, 0]), rtol=2e-6)


def test_dask_unknown_chunks_metric_column_weight() -> None:
    """README (Dask): the metric accepts Dask arrays too; a (B, 1) weight, unknown row sizes."""
    t, p, w = _unknown_data()
    metric = kldiv.metrics.KLDivergence()
    metric.update_state(_unknown_rows(t), _unknown_rows(p), sample_weight=_unknown_rows(w[:, None]))
    reference = kldiv.metrics.KLDivergence()
    reference.update_state(t, p, sample_weight=w[:, None])
    np.testing.assert_allclose(float(metric.result().compute()), float(reference.result()), rtol=2e-6)


# ---------------------------------------------------------------- README: streaming


def test_streaming_refuses_batchmean(tmp_path: Path) -> None:
    """README: evaluate_files computes 'any reduction but the loss class' "batchmean", which
    is a ValueError here' (its docstring and the CLI's choices agree); evaluate_batches too."""
    np.save(tmp_path / "t.npy", SEED_T)
    np.save(tmp_path / "p.npy", SEED_P)
    with pytest.raises(ValueError, match="batchmean"):
        kldiv.evaluate_files(str(tmp_path / "t.npy"), str(tmp_path / "p.npy"), reduction="batchmean")
    with pytest.raises(ValueError, match="batchmean"):
        kldiv.evaluate_batches([SEED_T], [SEED_P], reduction="batchmean")
    # the other reductions are the loss class' on the whole data
    for reduction in ["auto", "sum", "mean", "sum_over_batch_size", "mean_with_sample_weight"]:
        got = kldiv.evaluate_batches([SEED_T[:1], SEED_T[1:]], [SEED_P[:1], SEED_P[1:]],
                                     reduction=reduction)
        assert type(got) is np.float32
        np.testing.assert_allclose(got, kldiv.KLDivergence(reduction=reduction)(SEED_T, SEED_P),
                                   rtol=1e-6)


@pytest.mark.parametrize("member", [Backend.NUMPY.pytest_param(), Backend.TORCH.pytest_param(),
                                    Backend.JAX.pytest_param(), Backend.ARRAY_API_STRICT.pytest_param()])
def test_streamed_float16_files(tmp_path: Path, member: Backend) -> None:
    """README: 'float16 files are accepted on every backend (float16 becomes float32 where the
    backend has no float16, as on array-api-strict)'; the value is the oracle's."""
    member.handle()  # a clean skip when the library is missing
    rng = np.random.default_rng(4)
    t = rng.dirichlet(np.ones(6), size=40).astype(np.float16)
    p = rng.dirichlet(np.ones(6), size=40).astype(np.float16)
    np.save(tmp_path / "t.npy", t)
    np.save(tmp_path / "p.npy", p)
    out = kldiv.evaluate_files(str(tmp_path / "t.npy"), str(tmp_path / "p.npy"),
                               backend=member.library, batch_rows=16)
    name = str(out.dtype).rsplit(".", 1)[-1]
    assert name == ("float32" if member is Backend.ARRAY_API_STRICT else "float16")
    np.testing.assert_allclose(float(out), oracle(t, p).mean(), rtol=2e-3)


def test_cli_class_axes_that_do_not_match_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README (the compute command): bad input, such as 'row counts or class axes that do not
    match', gets one line on stderr, 'kldiv compute: error: ...', and exit status 2."""
    from kldiv import _cli

    rng = np.random.default_rng(5)
    np.save(tmp_path / "t.npy", rng.dirichlet(np.ones(5), size=20).astype(np.float32))
    np.save(tmp_path / "p.npy", rng.dirichlet(np.ones(3), size=20).astype(np.float32))
    rc = _cli.compute_main([str(tmp_path / "t.npy"), str(tmp_path / "p.npy")])
    cap = capsys.readouterr()
    assert rc == 2
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kldiv compute: error: "), cap.err
    assert "(20, 5)" in lines[0] and "(20, 3)" in lines[0]


# ---------------------------------------------------------------- docs/distillation.md


def test_reverse_kl_of_probs_is_swapped_kl_in_the_predictions_library(backend: ArrayBackend) -> None:
    """distillation.md: 'reverse_kl_divergence(p, q) is exactly kl_divergence(q, p) computed in
    q's library', with p from another library (NumPy) than q."""
    rng = np.random.default_rng(6)
    p = rng.random((7, 5)).astype(np.float32) * 1.2 - 0.1  # outside [0, 1] too: clipped
    q = rng.random((7, 5)).astype(np.float32)
    rev = kldiv.reverse_kl_divergence(p, backend.asarray(q))
    assert backend.is_native(rev)
    swapped = kldiv.kl_divergence(backend.asarray(q), backend.asarray(p))
    np.testing.assert_array_equal(backend.to_numpy(rev), backend.to_numpy(swapped))
    np.testing.assert_allclose(backend.to_numpy(rev), oracle(q, p), rtol=1e-5, atol=1e-6)


def test_zero_measure_rows(backend: ArrayBackend) -> None:
    """distillation.md: a row of all -inf logits is the zero measure: KL(0 ‖ Q) = 0,
    KL(P ‖ 0) = +inf, never NaN; the JSD stays finite."""
    zero = backend.asarray(np.full((1, 3), -np.inf, np.float32))
    finite = backend.asarray(np.zeros((1, 3), np.float32))
    got = {
        "kl(0, q)": kldiv.kl_divergence(zero, finite, inputs="logits"),
        "kl(p, 0)": kldiv.kl_divergence(finite, zero, inputs="logits"),
        "js": kldiv.js_divergence(zero, finite, inputs="logits"),
    }
    vals = {k: backend.to_numpy(v) for k, v in got.items()}
    assert vals["kl(0, q)"].tolist() == [0.0]
    assert vals["kl(p, 0)"].tolist() == [np.inf]
    # M = (1 - beta) Q: KL(Q ‖ M) = -log(1 - beta), weighted by 1 - beta
    np.testing.assert_allclose(vals["js"], [0.5 * np.log(2.0)], rtol=1e-6)


# ---------------------------------------------------------------- docs/architecture.md, paths

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "kldiv"


def _diagram() -> tuple[dict[str, int], str]:
    """architecture.md's layer diagram: {module (dotted, under kldiv): layer} for the layered
    modules (a package named ``name/`` puts all its modules on its layer), and the text of
    the ``backends/`` part."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    layered, _, backends = block.partition("\n backends/")
    layers: dict[str, int] = {}
    layer = 0
    for line in layered.splitlines():
        head = re.match(r"^ ?(\d) ", line)
        if head:
            layer = int(head.group(1))
        for name in re.findall(r"\b(_?[A-Za-z_]+)\.py\b", line):
            layers[name] = layer
        for pkg in re.findall(r"\b(_?[a-z_]+)/", line):
            layers[pkg] = layer
            for sub in (PACKAGE / pkg).glob("*.py"):
                if sub.stem != "__init__":
                    layers[f"{pkg}.{sub.stem}"] = layer
    return layers, backends


def _modules() -> list[str]:
    """Every module of the package, dotted under kldiv (a package as its own name)."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts) or "__init__")
    return out


def test_architecture_names_every_module() -> None:
    """architecture.md's diagram names every module of src/kldiv (the layered ones with their
    file name, the backends' by name): a module added (or moved, like the fused linear slab
    pass into backends/torch_fused_slabs.py) without its place in the layers is a stale page."""
    layers, backends = _diagram()
    missing = []
    for mod in _modules():
        if mod.startswith("backends"):
            stem = mod.split(".")[-1]
            if stem != "backends" and not re.search(rf"\b{re.escape(stem)}\b", backends):
                missing.append(mod)
        elif mod not in layers and mod.split(".")[0] not in layers:
            missing.append(mod)
    assert not missing, f"architecture.md does not name: {missing}"


def _imports(path: Path, me: str) -> list[str]:
    """The kldiv modules ``path`` imports (at any depth of the file), dotted under kldiv."""
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    if me == "__init__":
        package = []
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module and (node.module == "kldiv" or node.module.startswith("kldiv.")):
                out.append(node.module[len("kldiv"):].lstrip(".") or "__init__")
                continue
            else:
                continue
            if node.module:
                out.append(".".join([*base, node.module]))
            else:  # from . import x: x is a module or a name of the package
                for alias in node.names:
                    dotted = ".".join([*base, alias.name])
                    is_module = any((PACKAGE / Path(*dotted.split("."))).with_suffix(s).exists()
                                    for s in (".py", ""))
                    out.append(dotted if is_module else (".".join(base) or "__init__"))
        elif isinstance(node, ast.Import):
            out += [a.name[len("kldiv."):] for a in node.names if a.name.startswith("kldiv.")]
    return out


def test_architecture_layers_import_only_downwards() -> None:
    """architecture.md: 'Each module sits on a layer and imports only from the layers below it
    [or its own]: nothing imports upwards'; backends/ 'imports layers 1-4 only'. Checked on
    the diagram's own layer numbers (the page was stale: _spaces (layer 3) imported
    _kernel (layer 4), the backends imported _targets and _fused_linear_math (layer 8))."""
    layers, _ = _diagram()

    def layer_of(mod: str) -> int | None:
        for key in (mod, mod.split(".")[0]):
            if key in layers:
                return layers[key]
        return None

    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        me = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        in_backends = me.startswith("backends")
        mine = 4 if in_backends else layer_of(me)
        for target in _imports(path, me):
            if target.startswith("backends"):
                if not in_backends and mine is not None and mine <= 4:
                    upward.append(f"{me} (layer {mine}) -> {target}")
                continue
            theirs = 8 if target == "__init__" else layer_of(target)
            if mine is None or theirs is None:
                upward.append(f"{me} -> {target}: not in the diagram")
            elif theirs > mine:
                upward.append(f"{me} (layer {mine}) -> {target} (layer {theirs})")
    assert not upward, upward


DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "docs" / "getting-started").glob("*.md"))]


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_named_in_the_docs_exist(doc: Path) -> None:
    """Every repository path the README and the docs name in code text (``src/...``,
    ``tests/...::test_name*``, ``benchmarks/...``, ``examples/...``, ``ci/...``, ``docs/...``)
    exists, and a named test (or test-name prefix) is defined in that file. (The README named
    the libraries table ``src/kldiv/_libraries.py``, a package since.)"""
    bad = []
    for token in re.findall(r"`((?:src|tests|benchmarks|examples|ci|docs|\.ci)/[^`\s]*)`",
                            doc.read_text()):
        path, _, test = token.partition("::")
        if path.startswith("docs/_build"):
            continue  # the site nox -s docs builds
        matches = sorted(ROOT.glob(path)) if "*" in path else [ROOT / path]
        exists = bool(matches) and all(m.exists() for m in matches)
        defined = not test or (exists and any(
            re.search(rf"^def {re.escape(test.rstrip('*'))}", m.read_text(), re.M) for m in matches))
        if not (exists and defined):
            bad.append(token)
    assert not bad, f"{doc.name} names paths or tests that do not exist: {bad}"


# ---------------------------------------------------------------- README: dense arrays only


@pytest.mark.parametrize("side", ["y_true", "y_pred"])
def test_torch_nested_tensor_is_a_clear_type_error(side: str) -> None:
    """README: 'Sparse arrays (a SciPy sparse matrix, a sparse torch tensor, ...) raise a
    TypeError that says how to densify them: kldiv never densifies silently.' A nested
    tensor (rows of different lengths) is the same kind of non-dense input."""
    torch = pytest.importorskip("torch")
    nested = torch.nested.nested_tensor([torch.tensor([0.6, 0.4]), torch.tensor([0.2, 0.3, 0.5])])
    dense = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    args = (nested, dense) if side == "y_true" else (dense, nested)
    with pytest.raises(TypeError, match=rf"{side}.*nested"):
        kldiv.kl_divergence(*args)


@pytest.mark.parametrize("side", ["y_true", "y_pred"])
def test_tf_ragged_tensor_is_a_clear_type_error(side: str) -> None:
    """The README's sparse rule for TensorFlow's ragged tensors: a TypeError naming the input
    and the layout (``.to_tensor()``), as kldiv gives for a tf.SparseTensor."""
    tf = pytest.importorskip("tensorflow")
    ragged = tf.ragged.constant([[0.6, 0.4], [0.5]])
    dense = tf.constant([[0.5, 0.5], [0.5, 0.5]])
    args = (ragged, dense) if side == "y_true" else (dense, ragged)
    with pytest.raises(TypeError, match=rf"{side}.*[Rr]agged"):
        kldiv.kl_divergence(*args)


@pytest.mark.parametrize("where", ["sample_weight", "logprob", "ref_logprob"])
def test_tf_ragged_tensor_elsewhere_is_a_clear_type_error(where: str) -> None:
    """The same rule for a ragged sample weight and the estimators' inputs (every input's
    density is checked in one place)."""
    tf = pytest.importorskip("tensorflow")
    ragged = tf.ragged.constant([[0.6, 0.4], [0.5]])
    dense = tf.constant([[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(TypeError, match=rf"{where} is a nested \(ragged\) RaggedTensor.*to_tensor"):
        if where == "sample_weight":
            kldiv.KLDivergence()(dense, dense, sample_weight=ragged)
        elif where == "logprob":
            kldiv.kl_estimate(ragged, dense)
        else:
            kldiv.kl_estimate(dense, ragged)
