"""Shared fixtures: tiny offline models written once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from longalign.tiny import write_tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{'sd15', 't5', 'adapter', 'preference'} -> folder of a tiny model in the hub layout."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny"))
