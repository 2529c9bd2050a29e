"""HSORT_KERNELS picks the implementation; configurations the kernels lack fall back to the reference."""

import importlib
import importlib.util
import warnings

import pytest
import torch
from kernel_checks import needs_triton

from hypersort_core.kernels import (
    _dispatch,
    hyper_head,
    hyper_head_reference,
    per_sample_conv3d,
    per_sample_conv3d_reference,
    per_sample_conv_transpose3d,
    per_sample_conv_transpose3d_reference,
)

# the package re-exports the function under the module's name, so the module is looked up by path
conv_module = importlib.import_module("hypersort_core.kernels.per_sample_conv3d")


@pytest.fixture(autouse=True)
def fresh_environment(monkeypatch):
    """No backend variables from the caller's shell, and every fallback warning not yet given."""
    monkeypatch.delenv("HSORT_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_dispatch, "_warned", set())


@pytest.fixture
def reference_calls(monkeypatch) -> list[int]:
    """Counts the calls of the conv reference made by the public op."""
    calls = []
    original = conv_module.per_sample_conv3d_reference

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(conv_module, "per_sample_conv3d_reference", counted)
    return calls


def conv_inputs(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(2, 3, 4, 5, 3, dtype=dtype), torch.randn(2, 4, 3, 3, 3, 3, dtype=dtype), torch.randn(2, 4, dtype=dtype)


def run_conv(recorded_warnings: list) -> torch.Tensor:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = per_sample_conv3d(*conv_inputs(), stride=1, padding=1)
    recorded_warnings.extend(w for w in caught if issubclass(w.category, RuntimeWarning))
    return y


def test_default_on_cpu_tensors_is_the_reference_without_warning(reference_calls):
    caught = []
    run_conv(caught)
    assert reference_calls == [1] and caught == []


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="would import Triton as an interpreter for the whole session")
def test_forcing_triton_with_the_interpreter_runs_the_kernels(monkeypatch, reference_calls):
    monkeypatch.setenv("HSORT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    caught = []
    y = run_conv(caught)
    assert reference_calls == [] and caught == []
    torch.testing.assert_close(y, per_sample_conv3d_reference(*conv_inputs(), stride=1, padding=1), rtol=1e-4, atol=1e-4)


@needs_triton
def test_forcing_torch_wins_over_the_interpreter(monkeypatch, reference_calls):
    monkeypatch.setenv("HSORT_KERNELS", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    caught = []
    run_conv(caught)
    assert reference_calls == [1] and caught == []


@needs_triton
def test_forcing_triton_on_cpu_tensors_without_the_interpreter_warns_once(monkeypatch, reference_calls):
    monkeypatch.setenv("HSORT_KERNELS", "triton")
    caught = []
    run_conv(caught)
    run_conv(caught)
    assert reference_calls == [1, 1]
    assert len(caught) == 1 and "TRITON_INTERPRET" in str(caught[0].message)


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("HSORT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="HSORT_KERNELS='cuda'"):
        per_sample_conv3d(*conv_inputs())


def test_without_triton_installed_the_default_is_the_reference_and_forcing_it_fails(monkeypatch, reference_calls):
    monkeypatch.setattr(_dispatch, "TRITON_INSTALLED", False)
    caught = []
    run_conv(caught)
    assert reference_calls == [1] and caught == []
    monkeypatch.setenv("HSORT_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        per_sample_conv3d(*conv_inputs())


@needs_triton
@pytest.mark.parametrize(
    "op, reference, args",
    [
        (per_sample_conv3d, per_sample_conv3d_reference, lambda: (*conv_inputs(torch.float64), 2, 1)),
        (
            per_sample_conv_transpose3d,
            per_sample_conv_transpose3d_reference,
            lambda: (torch.randn(1, 3, 2, 3, 2, dtype=torch.float64), torch.randn(1, 3, 2, 4, 4, 4, dtype=torch.float64), None, 2, 1),
        ),
        (
            hyper_head,
            hyper_head_reference,
            lambda: (torch.randn(2, 5, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64), torch.randn(40, dtype=torch.float64)),
        ),
    ],
)
def test_unsupported_dtype_warns_once_and_gives_the_reference_answer(monkeypatch, op, reference, args):
    monkeypatch.setenv("HSORT_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = args()
    with pytest.warns(RuntimeWarning, match="float64"):
        first = op(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = op(*inputs)
    expected = reference(*inputs)
    assert first.dtype == torch.float64
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
