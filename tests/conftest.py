import pytest
import torch
from kernel_checks import DEVICE


@pytest.fixture
def triton_kernels(monkeypatch):
    """Force the Triton kernels (interpreted on the CPU), with every fresh tensor filled with NaN,
    so a kernel that leaves an output element unwritten fails."""
    monkeypatch.setenv("HSORT_KERNELS", "triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.utils.deterministic, "fill_uninitialized_memory", True)
    deterministic, device = torch.are_deterministic_algorithms_enabled(), torch.get_default_device()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(device)
    torch.use_deterministic_algorithms(deterministic)
