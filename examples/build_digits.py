"""Build the digits example: a small Keras CNN trained on scikit-learn's ``load_digits`` (8x8x1, 10 classes).

Writes, into the folder given (default ``models/digits`` at the repository root):
  digits.keras   the trained model (Keras 3 format)
  samples.npz    the held-out rows' inputs: the job's sample inputs, so the reference outputs are Keras's
  eval.npz       the same rows' inputs plus ``labels``: the job's eval data, for top-1 accuracy

Then ``modelyard submit examples/digits-tflite.yaml --wait``. Needs tensorflow-cpu and scikit-learn;
runs in a few seconds on two cores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

INPUT = "pixels"  # the Keras input's name: the key of the inputs in samples.npz and eval.npz
OUTPUT = "logits"  # the output layer's name
TRAIN_ROWS = 1400  # of load_digits' 1797: the rest is held out


def held_out_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:TRAIN_ROWS], order[TRAIN_ROWS:]
    return x[train], y[train], x[test], y[test]


def train(*, epochs: int = 6):
    """(the trained Keras model, held-out inputs, held-out labels). Also used by tests/digits.py."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    x_train, y_train, x_test, y_test = held_out_split()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1), name=INPUT),
        keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, name=OUTPUT),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model, x_test, y_test


def build(folder: Path, *, epochs: int = 6) -> float:
    """Train, save the model and the two .npz files; returns Keras's accuracy on the held-out rows."""
    model, x_test, y_test = train(epochs=epochs)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "digits.keras")
    np.savez(folder / "samples.npz", **{INPUT: x_test})
    np.savez(folder / "eval.npz", **{INPUT: x_test, "labels": y_test})
    logits = np.asarray(model.predict(x_test, verbose=0))
    return float(np.mean(np.argmax(logits, axis=1) == y_test))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "models" / "digits"
    accuracy = build(target)
    print(f"wrote {target}/digits.keras, samples.npz, eval.npz; Keras accuracy on the held-out rows: {accuracy:.4f}")
