import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA; the variable must be set
# before any kernel is defined, i.e. before any test module imports them
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the tests use tiny shapes, where intra-op threads cost more in synchronisation than they save
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
