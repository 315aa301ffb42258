import pytest
import torch

from backends import backend


@pytest.fixture(autouse=True)
def _seed_and_restore_threads():
    """Fresh random data per test (seeded by test order), thread count restored."""
    torch.manual_seed(torch.initial_seed() % (2**31) + 1)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_runtest_setup(item):
    """Tests that run kernels through the CPU executor (marked cuda_emulated)
    are skipped, with the reason, where its build is not available; probed
    here, on first use, rather than at collection."""
    if item.get_closest_marker("cuda_emulated") is not None:
        usable, reason = backend("cuda_emulated").available()
        if not usable:
            pytest.skip(reason)
