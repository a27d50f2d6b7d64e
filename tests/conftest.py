"""Shared fixtures: tiny offline models written once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from longalign.tiny import write_tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'sd15', 't5', 'adapter', 'preference'} -> folder of a tiny model in the hub layout."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator (its precision, its
    device): each test starts without one, so no test depends on which ran before it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
