"""Bad input to the fused linear divergence: a clear ``TypeError``/``ValueError`` naming what was
wrong, never a backend traceback or a wrong answer.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from fused_linear_oracle import (
    HT,
    H,
    V,
    _np_inputs,
)
from kldiv import fused_linear_divergence

# ---------------------------------------------------------------------------- validation


BAD = [
    ({"w": np.zeros((V, H + 1))}, {}, ValueError, r"student_weight must have shape \(V, H\)"),
    ({"w": np.zeros(V)}, {}, ValueError, r"student_weight must have shape"),
    ({}, {"student_bias": np.zeros(V + 1)}, ValueError, r"student_bias must have shape \(11,\)"),
    ({"tl": np.zeros((2, 5, V + 2))}, {}, ValueError, r"teacher_logits must have shape \(2, 5, 11\)"),
    ({"tl": np.zeros((10, V))}, {}, ValueError, r"got \(10, 11\)"),
    ({"tl": None}, {}, ValueError, "not both and not neither"),
    ({}, {"teacher_hidden": "th", "teacher_weight": "tw"}, ValueError, "not both"),
    ({"tl": None}, {"teacher_hidden": "th"}, ValueError, "go together"),
    ({"tl": None}, {"teacher_hidden": np.zeros((2, 4, HT)), "teacher_weight": "tw"}, ValueError,
     r"teacher_hidden must have shape \(2, 5, H_t\)"),
    ({"tl": None}, {"teacher_hidden": "th", "teacher_weight": np.zeros((V, HT + 1))}, ValueError,
     r"teacher_weight must have shape \(11, 5\)"),
    ({}, {"teacher_bias": np.zeros(V)}, ValueError, "teacher_bias goes with teacher_hidden"),
    ({}, {"divergence": "kld"}, ValueError, "Invalid divergence 'kld'"),
    ({}, {"divergence": "js", "beta": 0.0}, ValueError, "open interval.*reverse_kl"),
    ({}, {"divergence": "js", "beta": 1}, ValueError, "open interval"),
    ({}, {"divergence": "js", "beta": 1.5}, ValueError, "open interval"),
    ({}, {"beta": "half"}, TypeError, "beta must be a real number"),
    ({}, {"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
    ({}, {"temperature": -1}, ValueError, "temperature"),
    ({}, {"temperature": math.inf}, ValueError, "temperature"),
    ({}, {"temperature": 10**400}, ValueError, "temperature=1000.*out of the range of a float"),
    ({}, {"divergence": "js", "beta": -10**400}, ValueError, "beta=.*out of the range"),
    ({}, {"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ({}, {"chunk_size": 2.5}, TypeError, "chunk_size must be a positive int"),
    ({}, {"chunk_size": True}, TypeError, "chunk_size"),
    ({}, {"reduction": "avg"}, ValueError, "Invalid reduction 'avg'.*'batchmean'"),
    ({"h": [[1.0] * H]}, {}, TypeError, "student_hidden must be an array"),
    ({"h": np.zeros((2, 5, H), dtype=np.int64)}, {}, TypeError, "floating dtype"),
    ({"h": np.array(1.0)}, {}, ValueError, "at least one axis"),
    ({"h": np.float64(1.0)}, {}, TypeError, "student_hidden must be an array"),
    ({}, {"sample_weight": np.ones(3)}, ValueError, "does not broadcast"),
    ({"w": np.zeros((0, H)), "tl": np.zeros((2, 5, 0))}, {}, ValueError, r"no rows \(V = 0\)"),
    ({}, {"reduction": 3}, ValueError, r"Invalid reduction 3\. Expected one of: 'auto', 'none', "
     r"'sum', 'sum_over_batch_size', 'mean', 'mean_with_sample_weight', 'batchmean' or None\."),
]


@pytest.mark.parametrize("change,kwargs,exc,match", BAD)
def test_validation(change: dict[str, Any], kwargs: dict[str, Any], exc: type, match: str) -> None:
    x = {**_np_inputs(), **change}
    kwargs = {k: x[v] if isinstance(v, str) and v in x else v for k, v in kwargs.items()}
    with pytest.raises(exc, match=match):
        fused_linear_divergence(x["h"], x["w"], x["tl"], **kwargs)


def test_validation_mixed_libraries_and_devices(torch: Any) -> None:
    x = _np_inputs()
    with pytest.raises(TypeError, match="one library: student_hidden is torch, teacher_logits "
                                        "is numpy"):
        fused_linear_divergence(torch.tensor(x["h"]), torch.tensor(x["w"]), x["tl"])
    with pytest.raises(TypeError, match="one library"):
        fused_linear_divergence(torch.tensor(x["h"]), x["w"], torch.tensor(x["tl"]))
    with pytest.raises(ValueError, match="one device"):
        fused_linear_divergence(torch.tensor(x["h"]), torch.tensor(x["w"]),
                                torch.tensor(x["tl"], device="meta"))


def test_validation_does_not_depend_on_earlier_calls() -> None:
    """Python and NumPy scalars are refused as arrays the same way whatever kldiv has seen
    before. kldiv's per-type namespace cache is filled by other calls (a metric accumulating
    NumPy totals asks for the namespace of a NumPy scalar); once it held ``np.float64`` (a
    Python float subclass), ``student_hidden=np.float64(1.0)`` passed as an array."""
    from kldiv import _namespace

    array_namespace = _namespace.array_namespace

    x = _np_inputs()
    for scalar in (np.float64(1.0), np.float32(1.0), 1.0):
        array_namespace(np.asarray(scalar)[()])  # what an earlier call may have cached
        with pytest.raises(TypeError, match="student_hidden must be an array"):
            fused_linear_divergence(scalar, x["w"], x["tl"])
        with pytest.raises(TypeError, match="teacher_logits must be an array"):
            fused_linear_divergence(x["h"], x["w"], scalar)
        with pytest.raises(TypeError, match="student_bias must be an array"):
            fused_linear_divergence(x["h"], x["w"], x["tl"], student_bias=scalar)


_TF_SCRIPT = r"""
import importlib.util
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401  (TensorFlow before Triton in one process aborts)
import numpy as np, tensorflow as tf
from kldiv import fused_linear_divergence
rng = np.random.default_rng(0)
h, w, t = rng.random((4, 3)), rng.random((5, 3)), rng.random((4, 5))
for args in ((tf.constant(h), tf.constant(w), tf.constant(t)),
             (tf.Variable(h), tf.constant(w), tf.constant(t))):
    try:
        fused_linear_divergence(*args)
    except TypeError as e:
        assert "does not support tensorflow arrays" in str(e), e
    else:
        raise AssertionError("no error")
# a TensorFlow sample weight with NumPy arrays is converted, as for the loss classes
out = fused_linear_divergence(h, w, t, sample_weight=tf.constant(np.ones(4)))
assert abs(float(out) - float(fused_linear_divergence(h, w, t))) < 1e-12
print("TF-OK")
"""


def test_tensorflow_tensors_are_a_clear_error() -> None:
    """With TensorFlow loaded its tensors pass kldiv's array check (its loss functions take
    them), but the fused path has no TensorFlow route: a clear TypeError, not an
    AttributeError from inside the chunk loop. A subprocess: TensorFlow stays out of this
    one."""
    pytest.importorskip("tensorflow")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(root, "src"),
                                                       os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _TF_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "TF-OK" in proc.stdout, proc.stderr[-3000:]
