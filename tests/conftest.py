import os

import pytest
import torch

# one intra-op thread: the suite's tensors are small, and two threads on two busy cores
# spin-wait far longer than they save
torch.set_num_threads(1)
os.environ.setdefault("ROADLOOP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "roadloop-test"))


@pytest.fixture
def nocheck_offroad():
    from roadloop.sim.config import SimConfig

    return SimConfig(check_offroad=False)
