"""``model.compile(loss=kldiv.KLDivergence())`` in Keras 3, on any Keras backend.

Trains a tiny softmax model with sample weights twice from the same start: once with kldiv's
loss and once with ``keras.losses.KLDivergence``; the losses agree step for step.

Run it with the backend of your choice (JAX, PyTorch or TensorFlow)::

    KERAS_BACKEND=jax python examples/keras_compile.py
    KERAS_BACKEND=torch python examples/keras_compile.py
    KERAS_BACKEND=tensorflow python examples/keras_compile.py

Create the loss after importing Keras (as here): with Keras loaded, ``kldiv.KLDivergence()``
is also a ``keras.losses.Loss``, so Keras hands it the sample weights instead of wrapping
it as a plain function. For tf.keras (Keras 2, the ``tf_keras`` package) the same line works.
"""

from __future__ import annotations

import keras
import numpy as np

import kldiv


def train(loss: keras.losses.Loss, steps: int = 8) -> list[float]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.dirichlet(np.ones(4), size=32).astype("float32")
    w = rng.random(32).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    return [float(model.train_on_batch(x, y, sample_weight=w)) for _ in range(steps)]


def main() -> None:
    ours = train(kldiv.KLDivergence())
    theirs = train(keras.losses.KLDivergence())
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}")
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        print(f"step {step}: kldiv {a:.7f}   keras {b:.7f}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert ours[-1] < ours[0], "the loss did not go down"


if __name__ == "__main__":
    main()
