import os

import pytest
import torch

# Tests compare floats bit-for-bit across runs; keep CPU thread count fixed.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
