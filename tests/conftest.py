"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread():
    """Run a module on one torch thread: the domain renderer's tensors are small, and on a busy
    2-core machine two OpenMP threads can be many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
