"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_dataset


@pytest.fixture(autouse=True, scope="session")
def _cpu_kind():
    """`DEEPLAB_TEST_CPU=amx` runs the suite as an AMX CPU would (`amp=auto` picks bf16),
    `plain` as one without AMX (fp32), whatever this CPU is: the defaults differ between
    the two, and the tests must hold on both."""
    import os

    from segment_deeplab import device

    kind = os.environ.get("DEEPLAB_TEST_CPU", "")
    if kind not in ("", "amx", "plain"):
        raise pytest.UsageError(f"DEEPLAB_TEST_CPU must be amx or plain, not {kind!r}")
    mp = pytest.MonkeyPatch()
    if kind:
        mp.setattr(device, "has_amx", lambda: kind == "amx")
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _runtime_cache(tmp_path_factory):
    """Converted models and runtime choices go to a scratch folder, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SEGMENT_DEEPLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: tiny models gain nothing from threads, and
    on a busy 2-core machine two spinning intra-op threads make tests several times
    slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny prepared synthetic dataset (16 pairs of 64x80)."""
    return make_dataset(tmp_path_factory.mktemp("synth"))
