"""A small CNN trained on scikit-learn's 8x8 digits, exported, with its data as .npz files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.factories import accuracy, digits_arrays, export_digits, save_npz, train_digits_cnn


@dataclass
class Digits:
    model_path: Path
    train: Path
    test: Path
    dense_accuracy: float


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    root = tmp_path_factory.mktemp("digits")
    x_train, y_train, x_test, y_test = digits_arrays()
    model = train_digits_cnn(x_train, y_train, dropout=0.1)
    return Digits(
        model_path=export_digits(model, root / "cnn.pt2"),
        train=save_npz(root / "train.npz", inputs=x_train, targets=y_train),
        test=save_npz(root / "test.npz", inputs=x_test, targets=y_test),
        dense_accuracy=accuracy(model, x_test, y_test),
    )
