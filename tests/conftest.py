import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_restore_threads():
    """Fresh random data per test (seeded by test order), thread count restored."""
    torch.manual_seed(torch.initial_seed() % (2**31) + 1)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# The CPU executor of the CUDA kernels: its session fixture and kernel report.
pytest_plugins = ["cuda_emulator.pytest_plugin"]
