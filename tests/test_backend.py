import sys

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels._backend import default_validate, resolve_backend, why_backend_cannot_run

CPU = torch.device("cpu")
CALLS = {
    "route": lambda b: sdk.route(torch.randn(4, 3), 2, backend=b),
    "lora_moe": lambda b: sdk.lora_moe(torch.randn(4, 5), torch.randn(2, 3, 5), torch.randn(2, 6, 3),
                                       torch.rand(4, 1), torch.zeros(4, 1, dtype=torch.int32), backend=b),
    "ExpertQueue.enqueue": lambda b: sdk.ExpertQueue(2, 3, 4).enqueue(torch.randn(2, 4), torch.tensor([0, 1]),
                                                                      backend=b),
    "infonce_queue_loss": lambda b: sdk.infonce_queue_loss(torch.randn(3, 4), torch.randn(3, 4),
                                                           sdk.ExpertQueue(2, 3, 4), torch.tensor([0, 1, 1]),
                                                           backend=b),
}


@pytest.mark.parametrize("op", list(CALLS))
def test_every_op_runs_on_the_torch_backend_by_name_and_by_default(op):
    CALLS[op]("torch")
    CALLS[op](None)


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("backend", [b for b in sdk.BACKENDS if b != "torch"])
def test_unimplemented_backends_raise_runtime_error(op, backend):
    if backend in sdk.ops.IMPLEMENTATIONS[op]:
        pytest.skip(f"{op} has a {backend} backend")
    with pytest.raises(RuntimeError, match=f"{op}: backend '{backend}' is not implemented"):
        CALLS[op](backend)


@pytest.mark.parametrize("op", list(CALLS))
def test_unknown_backend_is_a_value_error(op):
    with pytest.raises(ValueError, match="backend must be one of"):
        CALLS[op]("numpy")


def test_environment_overrides_auto_choice_and_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("SPARSEDOCTOR_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        resolve_backend("route", None, CPU, ("cuda", "torch"))
    assert resolve_backend("route", "torch", CPU, ("cuda", "torch")) == "torch"
    monkeypatch.setenv("SPARSEDOCTOR_BACKEND", "")
    assert resolve_backend("route", None, CPU, ("triton", "torch")) == "torch"


def test_auto_choice_prefers_runnable_gpu_backends_on_cuda_only(monkeypatch):
    assert resolve_backend("op", None, CPU, ("triton", "torch")) == "torch"  # CPU: always the reference
    cuda = torch.device("cuda")
    monkeypatch.setattr("sparsedoctor_kernels._backend.why_backend_cannot_run",
                        lambda b, d: None if b in ("torch", "cuda") else "missing")
    assert resolve_backend("op", None, cuda, ("triton", "cuda", "torch")) == "cuda"
    assert resolve_backend("op", None, cuda, ("triton", "torch")) == "torch"


def test_why_backend_cannot_run_explains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert why_backend_cannot_run("torch", CPU) is None
    assert "TRITON_INTERPRET=1" in why_backend_cannot_run("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert why_backend_cannot_run("triton", CPU) is None
    assert "needs CUDA tensors" in why_backend_cannot_run("cuda", CPU)


def test_default_validate():
    assert default_validate(None, CPU) is True
    assert default_validate(None, torch.device("cuda")) is False
    assert default_validate(False, CPU) is False
    assert default_validate(True, torch.device("cuda")) is True


@pytest.mark.parametrize("op", ["route", "ExpertQueue.enqueue"])
def test_cuda_backend_on_cpu_tensors_says_why(op):
    with pytest.raises(RuntimeError, match=f"{op}: backend 'cuda' cannot run: the CUDA extension needs CUDA"):
        CALLS[op]("cuda")


def test_missing_cuda_extension_is_explained(monkeypatch):
    import sparsedoctor_kernels._backend as backend

    monkeypatch.setattr(backend, "_probed", {})
    monkeypatch.setitem(sys.modules, "sparsedoctor_kernels._C", None)  # as if it was never built
    reason = backend.why_backend_cannot_run("cuda", torch.device("cuda"))
    assert "sparsedoctor_kernels._C is not built" in reason and "SPARSEDOCTOR_BUILD_CUDA=1" in reason
