"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny prepared synthetic dataset (16 pairs of 64x80)."""
    return make_dataset(tmp_path_factory.mktemp("synth"))
