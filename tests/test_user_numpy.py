"""A user migrating from tf.keras / Keras 3, SciPy, optax or array-api-strict / Dask: the
Keras KL core, its conversion and dispatch, on the peers' own conventions.

Each test here was written against a defect found by probing and failed before its fix.
TensorFlow runs in a subprocess (importing it before Triton in one process aborts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_tensorflow_script

_UNKNOWN_RANK_WEIGHT = """
import json
import triton  # noqa: F401  (before TensorFlow)
import numpy as np
import tensorflow as tf
import kldiv

rng = np.random.default_rng(0)
t = rng.random((2, 2, 3)).astype("f4")
p = rng.random((2, 2, 3)).astype("f4")
w = np.array([1.0, 0.0], "f4")
S = tf.TensorSpec
for reduction in ("auto", "none"):
    fn = tf.function(lambda a, b, c: kldiv.KLDivergence(reduction=reduction)(a, b, sample_weight=c),
                     input_signature=[S((None, None, None)), S((None, None, None)), S(None)])
    try:
        print(reduction, "VALUE", json.dumps(np.asarray(fn(t, p, w)).tolist()))
    except Exception as exc:
        print(reduction, "ERROR", type(exc).__name__, " ".join(str(exc).split())[-600:])
"""


def test_tf_function_sample_weight_of_unknown_rank_is_a_clear_error(tmp_path: Path) -> None:
    """A ``tf.function`` whose weight is traced as ``tf.TensorSpec(None)`` (unknown rank):
    Keras 2's rank rules cannot be applied, and kldiv failed inside TensorFlow ("Cannot
    iterate over a shape with unknown rank"). Now a ValueError naming sample_weight and how
    to give it a rank, as for y_true and y_pred."""
    proc = run_tensorflow_script(tmp_path, "unknown_rank_weight.py", _UNKNOWN_RANK_WEIGHT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["auto", "none"], proc.stdout
    for line in lines:
        _, kind, rest = line.split(" ", 2)
        assert kind == "ERROR" and rest.startswith("ValueError"), line
        assert "sample_weight has a shape of unknown rank" in rest, line
        assert "Cannot iterate" not in rest, line
        assert "tf.TensorSpec((None,))" in rest, line


@pytest.mark.parametrize("y_pred", [[[1, 0]], [[True, False]], [[1.0, 0.0]]])
@pytest.mark.parametrize("y_true", [[[2**70, 1]], [[object(), 1.0]]])
def test_cast_message_names_the_float32_of_python_values_as_a_dtype(y_true: object,
                                                                    y_pred: object) -> None:
    """A y_true NumPy cannot make numeric, against a Python-list y_pred (Keras floatx,
    float32): for an integer or bool list the message named the dtype
    "<class 'numpy.float32'>"."""
    import kldiv

    with pytest.raises(TypeError) as info:
        kldiv.kl_divergence(y_true, y_pred)
    message = str(info.value)
    assert "y_true has dtype object" in message, message
    assert message.endswith("cannot be cast to y_pred's dtype float32."), message
