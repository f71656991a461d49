"""The lora_moe cost model and the per-call strategy choice it drives."""

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.cost import (
    ENV_STRATEGY,
    STRATEGIES,
    choose_strategy,
    device_rates,
    lora_moe_cost,
    resolve_strategy,
)

HEADLINE = dict(num_tokens=8192, d_in=2560, d_out=9728, num_experts=8, top_k=2, rank=16)  # Qwen3-4B gate_proj


def test_dense_bytes_by_hand():
    """T=10, d_in=3, d_out=5, E=2, k=1, r=4, 2-byte activations: every term written out."""
    cost = lora_moe_cost("dense", 10, 3, 5, 2, 1, 4, element=2)
    parameters, ids, columns = 8 * (3 + 5) * 2, 10 * 12, 8
    assert cost.bytes_fwd == 10 * 3 * 2 + 3 * 10 * columns * 4 + 2 * 10 * 5 * 2 + parameters + ids
    assert cost.bytes_bwd == 2 * 10 * 5 * 2 + 2 * 10 * 3 * 2 + 5 * 10 * columns * 4 + 3 * parameters + 2 * ids
    assert cost.flops_fwd == 2 * 10 * columns * (3 + 5) and cost.flops_bwd == 2 * cost.flops_fwd


def test_grouped_reads_activations_once_per_slot_and_dense_once():
    one, two = (lora_moe_cost("grouped", 64, 32, 48, 8, k, 4, element=2) for k in (1, 2))
    per_slot_fwd = 64 * 32 * 2 + 2 * 64 * 48 * 2  # x gathered once more, the output read and written once more
    assert two.bytes_fwd - one.bytes_fwd >= per_slot_fwd
    dense_one, dense_two = (lora_moe_cost("dense", 64, 32, 48, 8, k, 4, element=2) for k in (1, 2))
    assert dense_two.bytes_fwd - dense_one.bytes_fwd == 64 * 12  # only the gates and ids grow with k
    assert dense_one.flops_fwd == 8 * one.flops_fwd  # E / k times the grouped FLOPs


def test_the_choice_follows_bytes_while_flops_are_cheap_and_flops_when_they_are_not():
    cuda = torch.device("cuda")
    assert choose_strategy(**HEADLINE, dtype=torch.bfloat16, device=cuda) == "dense"
    # 64 experts of rank 64 chosen one at a time: dense would do 64x the grouped FLOPs.
    assert choose_strategy(8192, 2560, 9728, 64, 1, 64, torch.bfloat16, cuda) == "grouped"
    rates = device_rates(cuda, torch.bfloat16)
    for strategy in STRATEGIES:
        cost = lora_moe_cost(strategy, **HEADLINE, element=2)
        assert cost.seconds(rates) == max(cost.bytes() / rates.bytes_per_s,
                                          (cost.flops_fwd + cost.flops_bwd) / rates.flops_per_s)


def test_strategy_resolution_order(monkeypatch):
    shapes = tuple(HEADLINE.values())
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_STRATEGY, raising=False)
    assert resolve_strategy(None, "torch", shapes, torch.float32, cpu) == "grouped"  # the exact reference
    assert resolve_strategy(None, "triton", shapes, torch.float32, cpu) == choose_strategy(*shapes, torch.float32,
                                                                                            cpu)
    monkeypatch.setenv(ENV_STRATEGY, "dense")
    assert resolve_strategy(None, "torch", shapes, torch.float32, cpu) == "dense"
    assert resolve_strategy("grouped", "torch", shapes, torch.float32, cpu) == "grouped"  # the argument wins
    monkeypatch.setenv(ENV_STRATEGY, "auto")
    assert resolve_strategy(None, "torch", shapes, torch.float32, cpu) == "grouped"
    with pytest.raises(ValueError, match="strategy must be one of"):
        resolve_strategy("sorted", "torch", shapes, torch.float32, cpu)
    monkeypatch.setenv(ENV_STRATEGY, "fastest")
    with pytest.raises(ValueError, match=ENV_STRATEGY):
        sdk.lora_moe(torch.zeros(2, 3), torch.zeros(1, 1, 3), torch.zeros(1, 4, 1), torch.ones(2, 1),
                     torch.zeros(2, 1, dtype=torch.int32))
