"""A small CNN for scikit-learn's 8x8 ``load_digits``, as a ``torch-state-dict`` factory for the compress tests.

``tests.compress_models:digits_cnn`` (the tests add ``tests.compress_models:*`` to
``MODELYARD_ALLOWED_FACTORIES``).
"""

from __future__ import annotations

import torch
from torch import nn


def digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 10),
    )


def train_digits_cnn(images, labels, *, epochs: int = 15, seed: int = 0) -> nn.Module:
    """Train the teacher with labels (the student is then distilled without them)."""
    torch.manual_seed(seed)
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
    return model.eval()
