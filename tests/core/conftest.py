"""A small CNN trained on scikit-learn's 8x8 digits, exported, with its data as .npz files."""

from __future__ import annotations

import pytest

from tests.factories import Digits, make_digits


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return make_digits(tmp_path_factory.mktemp("digits"))
