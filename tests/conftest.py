import os

import pytest
import torch

from _support import fake_mnist

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "OMP_NUM_THREADS" not in os.environ:
    # under pytest-xdist (`make test`: one worker per core) each worker computes on one thread;
    # alone, on at most two (the CI machine's cores)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // workers))


@pytest.fixture
def tiny_mnist():
    """A deterministic fake MNIST slice (no network, no cache): 64 images of blobs, labels 0..9."""
    return fake_mnist()


@pytest.fixture(scope="module")
def module_mnist():
    """``tiny_mnist`` for module-scoped fixtures (the same 64 images)."""
    return fake_mnist()


# The longest test files first: `make test` hands whole files to its two workers in this order,
# so a file of minutes that came last would leave one worker idle while the other finishes it.
LONGEST_FIRST = ("test_study_crash.py", "test_study.py", "test_shipped.py", "test_distributed.py", "test_crash.py")


def pytest_configure(config):
    # pytest-xdist re-sorts the files by their number of tests unless told not to, which put the
    # longest file (one test of minutes) last and left one worker idle for a minute at the end
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order
