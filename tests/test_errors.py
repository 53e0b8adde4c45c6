"""Bad input gets a clear TypeError / ValueError; inputs are never modified."""

from __future__ import annotations

import numpy as np
import pytest

import kldiv
from conftest import ArrayBackend

T = np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
P = np.array([[0.6, 0.4], [0.4, 0.6]], dtype=np.float32)


def test_zero_d_inputs(backend: ArrayBackend) -> None:
    with pytest.raises(ValueError, match="class axis"):
        kldiv.kld(backend.asarray(np.float32(0.5)), backend.asarray(np.float32(0.5)))


def test_shapes_that_do_not_broadcast(backend: ArrayBackend) -> None:
    with pytest.raises(ValueError, match=r"y_true of shape \(2, 3\) and y_pred of shape \(2, 4\) do not broadcast"):
        kldiv.kld(backend.asarray(np.ones((2, 3), np.float32)), backend.asarray(np.ones((2, 4), np.float32)))


def test_sample_weight_that_does_not_broadcast(backend: ArrayBackend) -> None:
    loss = kldiv.KLDivergence()
    with pytest.raises(ValueError, match=r"sample_weight of shape \(3,\).*\(2,\)"):
        loss(backend.asarray(T), backend.asarray(P), sample_weight=backend.asarray([1.0, 2.0, 3.0]))
    # tf.keras silently accepts ones((1, 3, 4)) for a loss of shape (1,); kldiv refuses
    with pytest.raises(ValueError, match=r"\(1, 3, 4\).*\(1,\)"):
        loss(backend.asarray(T[:1]), backend.asarray(P[:1]), sample_weight=backend.asarray(np.ones((1, 3, 4))))


@pytest.mark.parametrize("bad", ["average", "SUM_BY_BATCH", 3, ""])
def test_unknown_reduction(bad: object) -> None:
    with pytest.raises(ValueError, match=r"Invalid reduction.*'sum_over_batch_size'"):
        kldiv.KLDivergence(reduction=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("y_true", "match"),
    [
        (np.array([["a", "b"]]), "dtype <U1.*float32"),
        (np.array([[object(), object()]], dtype=object), "dtype object.*float32"),
        (np.array([[1 + 2j, 0j]]), "complex dtype complex128.*float32"),
        ([["a", "b"]], "dtype <U1.*float32"),
    ],
)
def test_uncastable_y_true(y_true: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        kldiv.kld(y_true, P[:1])


def test_uncastable_y_true_torch() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="complex"):
        kldiv.kld(torch.tensor([[1 + 1j, 0j]]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(TypeError, match="y_pred has complex dtype"):
        kldiv.kld(torch.tensor([[0.5, 0.5]]), torch.tensor([[1 + 1j, 0j]]))


def test_non_array_inputs() -> None:
    with pytest.raises(TypeError, match="not None"):
        kldiv.kld(None, P)
    with pytest.raises(TypeError, match="y_pred"):
        kldiv.kld(T, {"a": 1})
    with pytest.raises(TypeError, match="y_pred"):
        kldiv.kld(T, [[0.5, "x"]])


def test_read_only_numpy_inputs_untouched() -> None:
    rng = np.random.default_rng(5)
    for shape in [(3, 4), (300, 70)]:
        t = rng.uniform(-1, 2, size=shape).astype(np.float32)
        p = rng.uniform(-1, 2, size=shape).astype(np.float32)
        w = rng.random(shape[0]).astype(np.float32)
        t_copy, p_copy, w_copy = t.copy(), p.copy(), w.copy()
        for a in (t, p, w):
            a.flags.writeable = False
        for reduction in ("none", "auto"):
            kldiv.KLDivergence(reduction=reduction)(t, p, sample_weight=w)
        kldiv.kld(t[:, ::2], p[:, ::2])  # non-contiguous views
        kldiv.kld(t.T, p.T)
        np.testing.assert_array_equal(t, t_copy)
        np.testing.assert_array_equal(p, p_copy)
        np.testing.assert_array_equal(w, w_copy)


def test_torch_inputs_untouched() -> None:
    torch = pytest.importorskip("torch")
    t = torch.rand(50, 20) * 3 - 1
    p = torch.rand(50, 20) * 3 - 1
    t0, p0 = t.clone(), p.clone()
    pg = p.clone().requires_grad_(True)
    kldiv.KLDivergence()(t, pg).backward()
    kldiv.KLDivergence(reduction="none")(t[:, ::2], p[:, ::2])
    kldiv.kld(t.numpy(), p)  # shares memory with t through NumPy
    assert torch.equal(t, t0) and torch.equal(p, p0) and torch.equal(pg.detach(), p0)


@pytest.mark.parametrize("bad", ["SUM", "Auto", "NONE", " sum", "sum ", "Sum_Over_Batch_Size", "mean\n"])
def test_reduction_names_are_exact_as_in_keras(bad: str) -> None:
    """Keras (2 and 3) compares reduction strings exactly: so does kldiv."""
    with pytest.raises(ValueError, match=r"Invalid reduction"):
        kldiv.KLDivergence(reduction=bad)
    with pytest.raises(ValueError, match=r"Invalid reduction"):
        kldiv.Reduction.validate(bad)


@pytest.mark.parametrize("bad", ["Float32", "float32 ", "FLOAT16", "mixed_float32", "mixed_float64", "int32"])
def test_dtype_names_are_exact(bad: str) -> None:
    with pytest.raises(ValueError, match="Invalid dtype"):
        kldiv.KLDivergence(dtype=bad)


def _sparse(kind: str, a: np.ndarray) -> object:
    if kind.startswith("torch"):
        torch = pytest.importorskip("torch")
        return torch.tensor(a).to_sparse() if kind == "torch coo" else torch.tensor(a).to_sparse_csr()
    if kind == "scipy csr":
        scipy_sparse = pytest.importorskip("scipy.sparse")
        return scipy_sparse.csr_matrix(a)
    jsparse = pytest.importorskip("jax.experimental.sparse")
    return jsparse.BCOO.fromdense(pytest.importorskip("jax.numpy").asarray(a))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
@pytest.mark.parametrize("kind", ["torch coo", "torch csr", "scipy csr", "jax bcoo"])
def test_sparse_inputs_are_a_clear_type_error(kind: str) -> None:
    """Sparse arrays are not densified silently (that can take any amount of memory):
    a TypeError that says how to densify, for y_pred, y_true and sample_weight alike."""
    sparse = _sparse(kind, T)
    with pytest.raises(TypeError, match=r"y_pred is a sparse .*\(\)"):
        kldiv.kld(T, sparse)
    with pytest.raises(TypeError, match=r"y_true is a sparse .*\(\)"):
        kldiv.kld(sparse, P)
    with pytest.raises(TypeError, match=r"sample_weight is a sparse .*\(\)"):
        kldiv.KLDivergence()(T, P, sample_weight=_sparse(kind, np.array([[1.0], [2.0]], np.float32)))
