"""The op benchmarks through pytest-benchmark: `python -m pytest benchmarks --benchmark-only`.

Small shapes on CPU (torch paths only), the issue's gate_proj and routing shapes on a GPU. The scripts beside
this file are the full suite and write the results CSV; this is the quick, comparable-run-to-run view."""

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.bench import lora_moe as bench_lora_moe
from sparsedoctor_kernels.bench import route as bench_route

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
LORA_IMPLS = [impl for impl in bench_lora_moe.IMPLS if CUDA or impl != "triton"]


def _run(benchmark, fn):
    def synchronized():
        result = fn()
        harness.synchronize(DEVICE)
        return result

    benchmark(synchronized)


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("impl", LORA_IMPLS)
def test_lora_moe(benchmark, impl, mode):
    d_in, d_out = bench_lora_moe.QWEN3_4B_SHAPES["gate_proj"]
    num_tokens = 8192 if CUDA else 256
    if not CUDA:
        d_in, d_out = d_in // bench_lora_moe.CPU_SHRINK, d_out // bench_lora_moe.CPU_SHRINK
    inputs = bench_lora_moe.make_inputs(num_tokens, d_in, d_out, 8, 2, 16, DTYPE, DEVICE)
    forward, params = bench_lora_moe.implementations(inputs, 2.0, layer=False)[impl]
    _run(benchmark, harness.gradient_modes(forward, params)[mode])


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("backend", ["triton", "torch"] if CUDA else ["torch"])
@pytest.mark.parametrize("num_experts, top_k", bench_route.EXPERTS_AND_TOP_K)
def test_route(benchmark, backend, num_experts, top_k, mode):
    num_tokens = 16384 if CUDA else 1024
    logits = torch.randn(num_tokens, num_experts, device=DEVICE).to(DTYPE).requires_grad_()
    _run(benchmark, harness.gradient_modes(bench_route.forward_fn(logits, top_k, backend), [logits])[mode])


@pytest.mark.parametrize("impl", ["triton", "torch", "naive"] if CUDA else ["torch", "naive"])
def test_queue(benchmark, impl):
    from sparsedoctor_kernels.bench import queue as bench_queue

    num_rows, num_experts, capacity = (16384, 8, 4096) if CUDA else (1024, 8, 256)
    queue = sdk.ExpertQueue(num_experts, capacity, bench_queue.DIM, device=DEVICE)
    keys = torch.randn(num_rows, bench_queue.DIM, device=DEVICE)
    experts = torch.randint(0, num_experts, (num_rows,), device=DEVICE)
    _run(benchmark, bench_queue.implementations(queue, keys, experts, DEVICE)[impl])


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("impl", ["triton", "torch", "naive"] if CUDA else ["torch", "naive"])
def test_infonce(benchmark, impl, mode):
    from sparsedoctor_kernels.bench import infonce as bench_infonce

    num_rows, num_experts, capacity = (4096, 8, 4096) if CUDA else (256, 8, 128)
    queue = sdk.ExpertQueue(num_experts, capacity, bench_infonce.DIM, device=DEVICE)
    queue.enqueue(torch.randn(num_experts * capacity, bench_infonce.DIM, device=DEVICE),
                  torch.arange(num_experts, device=DEVICE).repeat_interleave(capacity), validate=False)
    query = torch.randn(num_rows, bench_infonce.DIM, device=DEVICE, requires_grad=True)
    positive = torch.randn(num_rows, bench_infonce.DIM, device=DEVICE, requires_grad=True)
    experts = torch.randint(0, num_experts, (num_rows,), device=DEVICE)
    forward = bench_infonce.implementations(queue, query, positive, experts, DEVICE)[impl]
    _run(benchmark, harness.gradient_modes(forward, [query, positive])[mode])
