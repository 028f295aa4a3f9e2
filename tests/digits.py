"""A small Keras CNN trained in seconds on scikit-learn's ``load_digits`` (8x8x1, 10 classes).

Shared by the TensorFlow tests. Import TensorFlow only through ``train`` (it is heavy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUT = "pixels"
OUTPUT = "logits"


@dataclass
class Digits:
    keras_file: Path  # the trained model, Keras 3 format
    x_test: np.ndarray  # float32 [n, 8, 8, 1] in [0, 1]
    y_test: np.ndarray  # int64 [n]
    keras_logits: np.ndarray  # Keras's outputs on x_test
    keras_accuracy: float

    def accuracy(self, logits: np.ndarray) -> float:
        return float(np.mean(np.argmax(logits, axis=1) == self.y_test))

    def write_test_split(self, path: Path, *, labels: bool = False) -> Path:
        arrays = {INPUT: self.x_test}
        if labels:
            arrays["labels"] = self.y_test
        np.savez(path, **arrays)
        return path


def split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def train(folder: Path, *, epochs: int = 6) -> Digits:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    x_train, y_train, x_test, y_test = split()
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
    path = Path(folder) / "digits.keras"
    model.save(path)
    logits = np.asarray(model.predict(x_test, verbose=0))
    return Digits(path, x_test, y_test, logits, float(np.mean(np.argmax(logits, axis=1) == y_test)))
