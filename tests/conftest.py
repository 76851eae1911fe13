import atexit
import os
import shutil
import tempfile

import pytest
import torch

# one intra-op thread: the suite's tensors are small, and two threads on two busy cores
# spin-wait far longer than they save
torch.set_num_threads(1)
os.environ.setdefault("ROADLOOP_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "roadloop-test"))
# trackers, the registry and the rollout store write under ROADLOOP_HOME: never the user's (~/.roadloop or
# an exported ROADLOOP_HOME).  A fresh folder per test process (each xdist worker imports this file
# itself), removed when the process ends.
os.environ["ROADLOOP_HOME"] = tempfile.mkdtemp(prefix="roadloop-test-home-")
atexit.register(shutil.rmtree, os.environ["ROADLOOP_HOME"], ignore_errors=True)
for _var in ("MLFLOW_TRACKING_URI", "ROADLOOP_TRACKING_URI", "ROADLOOP_REGISTRY_DB"):
    os.environ.pop(_var, None)


@pytest.fixture
def nocheck_offroad():
    from roadloop.sim.config import SimConfig

    return SimConfig(check_offroad=False)
