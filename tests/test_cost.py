"""The lora_moe cost model and the per-call strategy choice it drives."""

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.cost import (
    ENV_STRATEGY,
    STRATEGIES,
    choose_strategy,
    device_rates,
    eager_calls,
    kernel_launches,
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


def test_at_a_few_tokens_the_kernels_choose_by_launches():
    """Decoding on a GPU: the bytes of one token are nothing next to a launch, so the strategy that launches
    fewer kernels (dense: 2 forward against grouped's 6) is chosen even where it reads every expert's weights;
    a training batch at the same shape chooses as before (the launches are a rounding error there)."""
    cuda = torch.device("cuda")
    assert kernel_launches("dense", 2) < kernel_launches("grouped", 2) < kernel_launches("grouped", 8)
    for experts in (8, 64):
        assert choose_strategy(1, 2560, 4096, experts, 2, 16, torch.bfloat16, cuda) == "dense"
    assert choose_strategy(8192, 2560, 9728, 64, 1, 64, torch.bfloat16, cuda) == "grouped"


def test_strategy_resolution_order(monkeypatch):
    shapes = tuple(HEADLINE.values())
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_STRATEGY, raising=False)
    assert resolve_strategy(None, "torch", shapes, torch.float32, cpu) == choose_strategy(
        *shapes, torch.float32, cpu, backend="torch")
    assert resolve_strategy(None, "triton", shapes, torch.float32, cpu) == choose_strategy(*shapes, torch.float32,
                                                                                            cpu)
    # The eager grouped strategy reads its run lengths on the host: never the default off the CPU.
    assert resolve_strategy(None, "torch", shapes, torch.bfloat16, torch.device("cuda")) == "dense"
    monkeypatch.setenv(ENV_STRATEGY, "dense")
    assert resolve_strategy(None, "torch", shapes, torch.float32, cpu) == "dense"
    assert resolve_strategy("grouped", "torch", shapes, torch.float32, cpu) == "grouped"  # the argument wins
    monkeypatch.setenv(ENV_STRATEGY, "auto")
    assert resolve_strategy(None, "torch", shapes, torch.float32, cpu) == choose_strategy(
        *shapes, torch.float32, cpu, backend="torch")
    with pytest.raises(ValueError, match="strategy must be one of"):
        resolve_strategy("sorted", "torch", shapes, torch.float32, cpu)
    monkeypatch.setenv(ENV_STRATEGY, "fastest")
    with pytest.raises(ValueError, match=ENV_STRATEGY):
        sdk.lora_moe(torch.zeros(2, 3), torch.zeros(1, 1, 3), torch.zeros(1, 4, 1), torch.ones(2, 1),
                     torch.zeros(2, 1, dtype=torch.int32))


def test_grouped_reads_only_the_parameters_of_experts_that_get_pairs():
    one_token, many = (lora_moe_cost("grouped", t, 512, 1536, 8, 2, 16, element=4) for t in (1, 4096))
    parameters = 8 * 16 * (512 + 1536) * 4
    assert one_token.bytes_fwd < parameters // 2  # 2 of 8 experts' weights, not all
    assert lora_moe_cost("dense", 1, 512, 1536, 8, 2, 16, element=4).bytes_fwd > parameters
    assert many.bytes_fwd > parameters


def test_the_eager_choice_on_the_cpu():
    """On the CPU's torch backend at issue 23's small Qwen3 (512 -> 1536, k=2, r=16), as timed calls chose
    (docs/benchmarks.md): decoding reads the two chosen experts' weights instead of all eight; a training batch
    at E=8 reads x once (dense: the grouped gathers and scatters of rows cost more than 4x the small FLOPs);
    at E=32 dense's E/k = 16x FLOPs lose; when every token picks every expert (E = k = 2) dense costs no more."""
    cpu = torch.device("cpu")
    assert choose_strategy(1, 512, 1536, 8, 2, 16, torch.float32, cpu, backend="torch") == "grouped"
    assert choose_strategy(512, 512, 1536, 8, 2, 16, torch.float32, cpu, backend="torch") == "dense"
    assert choose_strategy(512, 512, 1536, 32, 2, 16, torch.float32, cpu, backend="torch") == "grouped"
    assert choose_strategy(512, 512, 1536, 2, 2, 16, torch.float32, cpu, backend="torch") == "dense"
    assert eager_calls("dense", 4096, 64, 2) == eager_calls("dense", 1, 8, 2)  # flat in T and E
    assert eager_calls("grouped", 1, 64, 2) < eager_calls("grouped", 4096, 64, 2)  # only experts with pairs
