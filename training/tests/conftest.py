"""A tiny synthetic image–text data set (coloured shapes) in the folder format, made per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.testing import COLOURS, SHAPES, draw_shape, make_shapes_dataset  # noqa: F401 (re-exported)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"))
