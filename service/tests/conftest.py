"""A tiny xclip bundle trained and exported in this test session, for engine tests without HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.testing import make_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("service-bundle"), "xclip")


@pytest.fixture(scope="session")
def tiny_bundle_b(tmp_path_factory) -> Path:
    """A second xclip bundle of the same width (another seed): another embedding space."""
    return make_tiny_bundle(tmp_path_factory.mktemp("service-bundle-b"), "xclip", seed=1)
