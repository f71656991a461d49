"""`routed_lora_moe`: route + experts in one call, against float64 brute force, its fused CPU decoding path
against the two ops it stands for, gradients and bad input."""

import pytest
import torch

import sparsedoctor_kernels as sdk

import brute
from conftest import TOLERANCES, assert_close, backend_supports, cpu_backends

BACKENDS = cpu_backends("lora_moe")


def make_inputs(gen, num_tokens, d_in, d_out, num_experts, rank, dtype=torch.float32):
    f64 = dict(generator=gen, dtype=torch.float64)
    return dict(x=torch.randn(num_tokens, d_in, **f64).to(dtype),
                router=torch.randn(num_experts, d_in, **f64).to(dtype),
                lora_a=(torch.randn(num_experts, rank, d_in, **f64) / d_in**0.5).to(dtype),
                lora_b=(torch.randn(num_experts, d_out, rank, **f64) / rank**0.5).to(dtype))


def expected(inputs, top_k, scaling, renormalize=True):
    """float64: brute-force routing of x @ router^T, then the experts token by token."""
    x, router = inputs["x"].double(), inputs["router"].double()
    weights, experts, _, _ = brute.route(x @ router.T, top_k, renormalize)
    return brute.lora_moe(x, inputs["lora_a"], inputs["lora_b"], weights, experts, scaling)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_out", [False, True])
# (T, d_in, d_out, E, r, k): decoding (T * k <= E, the fused CPU path), around that bound, a batch, k = E, empty.
@pytest.mark.parametrize("shape", [(1, 24, 19, 8, 3, 2), (3, 13, 11, 7, 5, 2), (4, 9, 10, 7, 2, 2),
                                   (29, 24, 19, 5, 3, 2), (2, 6, 5, 3, 2, 3), (0, 6, 5, 3, 2, 2)])
def test_matches_brute_force_without_autograd(shape, with_out, dtype, backend, gen):
    if not backend_supports(backend, dtype):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    num_tokens, d_in, d_out, num_experts, rank, top_k = shape
    inputs = make_inputs(gen, num_tokens, d_in, d_out, num_experts, rank, dtype)
    base = torch.randn(num_tokens, d_out, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = base.to(dtype, copy=True) if with_out else None
        result = sdk.routed_lora_moe(**inputs, top_k=top_k, scaling=1.5, out=out, backend=backend)
    assert result.grad_fn is None and result.dtype == dtype and result.shape == (num_tokens, d_out)
    if with_out:
        assert result is out
    want = expected(inputs, top_k, 1.5) + (base if with_out else 0)
    assert_close(result, want, dtype, scale=2.0, name="y")


@pytest.mark.parametrize("shape", [(1, 24, 19, 8, 3, 2), (3, 13, 11, 7, 5, 2), (2, 16, 9, 6, 4, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_the_fused_decoding_path_equals_route_then_lora_moe_bit_for_bit(shape, renormalize, gen):
    """What a decoding layer gets (the fused CPU path) is exactly what route + lora_moe's grouped strategy
    compute (the dense strategy sums in another order)."""
    num_tokens, d_in, d_out, num_experts, rank, top_k = shape
    inputs = make_inputs(gen, num_tokens, d_in, d_out, num_experts, rank)
    base = torch.randn(num_tokens, d_out, generator=gen)
    with torch.no_grad():
        fused = sdk.routed_lora_moe(**inputs, top_k=top_k, scaling=0.7, out=base.clone(), renormalize=renormalize)
        routing = sdk.route(inputs["x"] @ inputs["router"].T, top_k, renormalize=renormalize)
        two_ops = sdk.lora_moe(inputs["x"], inputs["lora_a"], inputs["lora_b"], routing.weights, routing.experts,
                               scaling=0.7, out=base.clone(), strategy="grouped")
    assert torch.equal(fused, two_ops)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_brute_force(backend, gen):
    inputs = make_inputs(gen, 11, 9, 7, 5, 3)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    oracle = {n: t.double().requires_grad_() for n, t in inputs.items()}
    y = sdk.routed_lora_moe(**leaves, top_k=2, scaling=1.5, backend=backend)
    want = expected(oracle, 2, 1.5)
    assert_close(y, want, torch.float32, name="y")
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (y.double() * grad_y).sum().backward()
    (want * grad_y).sum().backward()
    for name in inputs:
        assert_close(leaves[name].grad, oracle[name].grad, torch.float32, scale=2.0, name=f"grad {name}")


@pytest.mark.parametrize("overrides, error, match", [
    (dict(router=torch.zeros(4, 7)), ValueError, r"router must have shape \[E, d_in=6\]"),
    (dict(router=torch.zeros(4, 6, dtype=torch.float64)), (TypeError, ValueError), "router"),
    (dict(top_k=5), ValueError, r"top_k must be in \[1, E\] = \[1, 4\]"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(lora_a=torch.zeros(3, 2, 6)), ValueError, "one expert per router row"),
    (dict(lora_b=torch.zeros(4, 5, 3)), ValueError, "lora_b"),
    (dict(scaling="2"), (TypeError, ValueError), "scaling"),
])
def test_bad_input_is_refused(overrides, error, match):
    arguments = dict(x=torch.zeros(1, 6), router=torch.zeros(4, 6), lora_a=torch.zeros(4, 2, 6),
                     lora_b=torch.zeros(4, 5, 2), top_k=2, scaling=1.0)
    arguments.update(overrides)
    with torch.no_grad(), pytest.raises(error, match=match):
        sdk.routed_lora_moe(**arguments)


def test_an_out_sharing_memory_with_an_input_is_refused_on_the_fused_path():
    x = torch.randn(1, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="out shares memory with x"):
        sdk.routed_lora_moe(x, torch.randn(4, 6), torch.randn(4, 2, 6), torch.randn(4, 6, 2), 2, out=x)


@pytest.mark.parametrize("top_k", [2, 5])  # the host's top-k (k <= 4) and torch's sort beyond
def test_the_fused_decoding_path_gives_a_nan_token_what_the_two_ops_give(top_k, gen):
    """A token whose logits hold a NaN (here through x) is routed to experts 0..k-1 with NaN gates by `route`;
    the fused path does the same, so the token's output row is NaN there too and the other rows are equal."""
    inputs = make_inputs(gen, 1, 12, 9, 7, 3)
    inputs["x"][0, 3] = float("nan")
    base = torch.randn(1, 9, generator=gen)
    with torch.no_grad():
        fused = sdk.routed_lora_moe(**inputs, top_k=top_k, out=base.clone())
        routing = sdk.route(inputs["x"] @ inputs["router"].T, top_k)
        two_ops = sdk.lora_moe(inputs["x"], inputs["lora_a"], inputs["lora_b"], routing.weights, routing.experts,
                               out=base.clone(), strategy="grouped")
    assert routing.experts.tolist() == [list(range(top_k))]
    torch.testing.assert_close(fused, two_ops, rtol=0, atol=0, equal_nan=True)


def test_validate_false_skips_the_memory_check_and_changes_no_number(gen):
    inputs = make_inputs(gen, 1, 24, 19, 8, 3)
    base = torch.randn(1, 19, generator=gen)
    with torch.no_grad():
        checked = sdk.routed_lora_moe(**inputs, top_k=2, out=base.clone())
        unchecked = sdk.routed_lora_moe(**inputs, top_k=2, out=base.clone(), validate=False)
        x = inputs["x"].clone()
        sdk.routed_lora_moe(x, inputs["router"], torch.randn(8, 3, 24), torch.randn(8, 24, 3), 2, out=x,
                            validate=False)  # not refused: the caller vouched for its out
    assert torch.equal(checked, unchecked) and not torch.equal(checked, base)


def test_tolerances_cover_the_dtypes_used_here():
    assert {torch.float32, torch.bfloat16, torch.float64} <= set(TOLERANCES)
