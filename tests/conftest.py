"""Shared fixtures: tiny offline models written once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch thread per process, set before torch is imported, for this process and the CLIs the
# tests start: the suite runs as two pytest workers on 2 cores (README), and tiny models on a
# shared core are several times slower with two threads each (BENCHMARKS.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


# The files that run longest (on 2 CPU cores), longest first; the other files follow in their
# collection order. pytest.ini keeps each file on one worker and hands the files out in this
# order, so the long files start first and the short ones fill the gaps at the end.
LONGEST_FILES = ("test_toyworld_study.py", "test_stages.py", "test_toyworld.py", "test_bench.py")


def pytest_collection_modifyitems(items):
    """Order the tests by `LONGEST_FILES` (a stable sort: within a file, the written order)."""

    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)
