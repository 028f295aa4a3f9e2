"""A small Keras CNN trained in seconds on scikit-learn's ``load_digits`` (8x8x1, 10 classes).

The model and split are the digits example's (``examples/build_digits.py``). Shared by the
TensorFlow tests. Import TensorFlow only through ``train`` (it is heavy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.examples import load

example = load("build_digits")
INPUT, OUTPUT = example.INPUT, example.OUTPUT


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


def train(folder: Path, *, epochs: int = 6) -> Digits:
    model, x_test, y_test = example.train(epochs=epochs)
    path = Path(folder) / "digits.keras"
    model.save(path)
    logits = np.asarray(model.predict(x_test, verbose=0))
    return Digits(path, x_test, y_test, logits, float(np.mean(np.argmax(logits, axis=1) == y_test)))
