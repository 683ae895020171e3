"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_dataset


@pytest.fixture(autouse=True, scope="session")
def _runtime_cache(tmp_path_factory):
    """Converted models and runtime choices go to a scratch folder, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SEGMENT_DEEPLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny prepared synthetic dataset (16 pairs of 64x80)."""
    return make_dataset(tmp_path_factory.mktemp("synth"))
