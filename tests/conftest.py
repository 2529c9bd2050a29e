import atexit
import os
import shutil
import signal
import tempfile

import torch

# A test run started as a background job (`cmd &` in a script, as some CI runners do) inherits SIGINT ignored, and
# so would every `hsort` the tests start; the Ctrl-C tests need it delivered, so the children get the default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Prepared cases go to a cache shared across runs (~/.cache/hypersort by default): never the user's in tests.
os.environ["HSORT_CACHE"] = tempfile.mkdtemp(prefix="hsort-test-cache-")

# Triton decides between compiling and interpreting when it is first imported, and other code (torch's
# own FLOP counter, the benchmarks) may import it before a kernel test runs: without a GPU, interpret.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from kernel_checks import DEVICE
from tiny_runs import tiny_config

from hypersort_core.data import make_synthetic_dataset
from hypersort_core.train import fit

atexit.register(shutil.rmtree, os.environ["HSORT_CACHE"], ignore_errors=True)  # that cache, once the run ends


@pytest.fixture(autouse=True)
def cache_dir(monkeypatch, tmp_path):
    """Each test prepares its cases in a cache of its own (what one test damages, no other sees)."""
    path = tmp_path / "hsort-cache"
    monkeypatch.setenv("HSORT_CACHE", str(path))
    return path


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


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """7 phantoms of 16³ from `hsort synth`, 2 of them with perturbed labels (perturbations.csv)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", cases=7, size=16, perturbed=0.3, seed=0)


@pytest.fixture(scope="session")
def trained_run(synthetic_dataset, tmp_path_factory):
    """A run folder from 4 epochs of `fit` on `synthetic_dataset` (read-only: copy it to change it)."""
    return fit(synthetic_dataset, tmp_path_factory.mktemp("trained") / "run", tiny_config(epochs=4), progress=False).run_dir


@pytest.fixture(scope="module")
def analysed_run(trained_run, tmp_path_factory):
    """A copy of the trained run, analyzed (ranking.csv, clusters.csv), for one test module to change."""
    from hypersort_core.report import analyze_run

    run_dir = shutil.copytree(trained_run, tmp_path_factory.mktemp("analysed") / "run")
    analyze_run(run_dir, progress=False, pictures=0)
    return run_dir


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions on a busy 2-core machine run many times faster on one thread than on two competing ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
