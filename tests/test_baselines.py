"""The baselines users compare us with must compute the same function as the oracles."""

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.testing import baselines

import brute
from conftest import assert_close
from test_lora_moe import make_inputs


@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("impl", [baselines.naive_lora_moe, baselines.dense_lora_moe])
@pytest.mark.parametrize("shape", [(31, 12, 9, 6, 3, 2), (0, 4, 3, 2, 1, 1), (7, 5, 4, 3, 2, 3)])
def test_lora_moe_baselines_match_brute_force(impl, shape, with_out, gen):
    check_lora_moe_baseline(impl, shape, with_out, gen)


@pytest.mark.slow
def test_compiled_dense_baseline_matches_brute_force(gen):
    check_lora_moe_baseline(baselines.compiled_dense_lora_moe, (13, 8, 6, 4, 3, 2), True, gen)


def check_lora_moe_baseline(impl, shape, with_out, gen):
    inputs = make_inputs(gen, *shape, dtype=torch.float64, weights_dtype=torch.float64)
    names = ("x", "lora_a", "lora_b", "weights")
    leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    oracle = {n: inputs[n].clone().requires_grad_() for n in names}
    base = torch.randn(shape[0], shape[2], generator=gen, dtype=torch.float64)
    out = base.clone() if with_out else None
    y = impl(**leaves, experts=inputs["experts"], scaling=1.3, out=out)
    expected = brute.lora_moe(**oracle, experts=inputs["experts"], scaling=1.3) + (base if with_out else 0)
    assert (y is out) == with_out
    assert_close(y, expected, torch.float64)
    if not y.requires_grad:  # the naive loop touches no expert when there are no tokens: nothing to check
        assert shape[0] == 0
        return
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (y * grad).sum().backward()
    (expected * grad).sum().backward()
    for n in names:
        assert_close(leaves[n].grad, oracle[n].grad, torch.float64, name=n)


def test_naive_routing_matches_brute_force(gen):
    logits = torch.randn(29, 7, generator=gen, dtype=torch.float64)
    weights, experts, counts, probs_mean = baselines.naive_routing(logits, 3)
    want = brute.route(logits, 3)
    assert_close(weights, want[0], torch.float32)
    assert torch.equal(experts, want[1]) and torch.equal(counts, want[2])
    assert_close(probs_mean, want[3], torch.float32)


def test_single_lora_and_base_linear(gen):
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    # A single LoRA is the one-expert, top-1, weight-1 case of the MoE oracle.
    one_expert = brute.lora_moe(x, a[None], b[None], torch.ones(7, 1), torch.zeros(7, 1, dtype=torch.long), 2.0)
    assert_close(baselines.lora_linear(x, a, b, 2.0), one_expert, torch.float64)
    assert_close(baselines.base_linear(x, w), x @ w.T, torch.float64)

    base = torch.nn.Linear(6, 5, dtype=torch.float64)
    module = baselines.LoraLinear(base, r=3, lora_alpha=6.0)
    assert not base.weight.requires_grad and module.scaling == 2.0
    assert_close(module(x), base(x), torch.float64)  # B starts at zero
    torch.nn.init.normal_(module.lora_B.weight)
    expected = base(x) + baselines.lora_linear(x, module.lora_A.weight, module.lora_B.weight, 2.0)
    assert_close(module(x), expected, torch.float64)


def test_moco_enqueue_matches_sequential_writes(gen):
    queue = sdk.ExpertQueue(4, 5, 3)
    queue.keys.normal_(generator=gen)
    for rows in (3, 17, 0, 8):
        keys = torch.randn(rows, 3, generator=gen)
        experts = torch.randint(-1, 5, (rows,), generator=gen)
        expected = brute.enqueue(queue.keys, queue.ptr, queue.size, keys, experts)
        baselines.moco_enqueue(queue.keys, queue.ptr, queue.size, keys, experts)
        assert torch.equal(queue.keys.double(), expected[0])
        assert torch.equal(queue.ptr, expected[1]) and torch.equal(queue.size, expected[2])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("num_rows", [13, 0])
def test_naive_infonce_matches_brute_force(reduction, num_rows, gen):
    keys = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=gen), dim=-1)
    size = torch.tensor([6, 2, 0, 5])
    experts = torch.randint(0, 4, (num_rows,), generator=gen)
    q = torch.randn(num_rows, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(num_rows, 8, generator=gen, dtype=torch.float64)
    leaves = q.clone().float().requires_grad_(), k.clone().float().requires_grad_()
    loss = baselines.naive_infonce(*leaves, keys, size, experts, 0.2, reduction=reduction)
    oracle = q.clone().requires_grad_(), k.clone().requires_grad_()
    rows = brute.infonce_rows(*oracle, keys, size, experts, 0.2)
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.mean() if num_rows else rows.sum()}[reduction]
    assert_close(loss, expected, torch.float32)
    if num_rows:
        loss.sum().backward()
        expected.sum().backward()
        assert_close(leaves[0].grad, oracle[0].grad, torch.float32)
