import os

import pytest
import torch

# Tests compare floats bit-for-bit across runs; keep CPU thread count fixed. Under pytest-xdist
# each worker gets its share of the cores, so two workers do not fight over the same two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
