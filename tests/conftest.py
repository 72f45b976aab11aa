import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without CUDA; the variable must be set
# before any kernel is defined, i.e. before any test module imports them
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the tests use tiny shapes, where intra-op threads cost more in synchronisation than they save
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module whose in-process runs may change the count (``--threads``),
    restored after it: tiny models only gain contention from a second thread on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser):
    parser.addoption("--runlong", action="store_true", default=False, help="also run the tests marked long")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that skips for want of triton must be marked ``kernels``: .ci/run's first stage (the
    README's install, no Triton) skips it and only its ``-m kernels`` stage would run it."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and call.excinfo is not None and "kernels" not in item.keywords:
        if "triton" in str(call.excinfo.value).lower():
            report.outcome = "failed"
            report.longrepr = (
                f"{item.nodeid} skips without triton but is not marked kernels (.ci/run would never run it)"
            )


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="long: run with --runlong")
    for item in items:
        if "kernels" in item.keywords:  # the interpreter is slow: kernels leave the fast loop too
            item.add_marker(pytest.mark.slow)
        if "long" in item.keywords and not config.getoption("--runlong"):
            item.add_marker(skip)
