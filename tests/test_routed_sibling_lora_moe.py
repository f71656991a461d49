"""routed_sibling_lora_moe: S siblings' routers, routing and experts in one call, checked against float64 brute
force (route, then lora_moe on the dropped-out input, per sibling): outputs, logits, routing and every gradient,
the dropout mask read back from the kernels' own Philox stream; and, on the torch backend, bit for bit against
the separate ops it composes."""

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.cost import ENV_STRATEGY

import brute
from conftest import assert_close, cpu_backends

TRITON = "triton" in cpu_backends("sibling_lora_moe")
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton cannot run here")


def make_group(gen, num_tokens, d_in, d_outs, num_experts, rank):
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(num_tokens, d_in, **f64)
    routers = [torch.randn(num_experts, d_in, **f64) for _ in d_outs]
    lora_a = [torch.randn(num_experts, rank, d_in, **f64) / d_in**0.5 for _ in d_outs]
    lora_b = [torch.randn(num_experts, d_out, rank, **f64) / rank**0.5 for d_out in d_outs]
    outs = [torch.randn(num_tokens, d_out, **f64) for d_out in d_outs]
    return x, routers, lora_a, lora_b, outs


def brute_group(x, routers, lora_a, lora_b, outs, top_k, scaling, keep, p, token_mask):
    """(outs, logits [S, T, E], weights [S, T, k], experts, probs_mean [S, E]) in float64 with autograd."""
    dropped = x * keep / (1 - p) if p > 0 else x
    logits, weights, experts, probs_means, results = [], [], [], [], []
    real = token_mask if token_mask is not None else torch.ones(x.shape[0], dtype=torch.bool)
    for router, a, b, out in zip(routers, lora_a, lora_b, outs):
        z = x @ router.T
        w, e, _, _ = brute.route(z, top_k)
        probs = torch.softmax(z, -1)
        probs_means.append((probs * real[:, None]).sum(0) / real.sum().clamp_min(1))
        logits.append(z), weights.append(w), experts.append(e)
        results.append(out + brute.lora_moe(dropped, a, b, w, e, scaling))
    return results, torch.stack(logits), torch.stack(weights), torch.stack(experts), torch.stack(probs_means)


def leaves(tensors, dtype=torch.float32):
    return [t.to(dtype).requires_grad_() for t in tensors]


@needs_triton
@pytest.mark.parametrize("siblings,num_experts,rank", [
    (3, 4, 5),  # q/k/v: one rank-space block each
    (2, 16, 16),  # E*r = 256: two blocks, each slot's gate gradient written by the block owning its expert
    (1, 16, 12),  # r does not divide the block: gate gradients as partial sums
    (2, 5, 3),
])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_matches_brute_force(gen, siblings, num_experts, rank, p, masked):
    num_tokens, d_in, top_k, scaling = 37, 23, 2, 1.7
    d_outs = (19, 7, 11)[:siblings]
    x, routers, lora_a, lora_b, outs = make_group(gen, num_tokens, d_in, d_outs, num_experts, rank)
    token_mask = torch.rand(num_tokens, generator=gen) > 0.25 if masked else None
    x32, r32, a32, b32, o32 = leaves([x]), leaves(routers), leaves(lora_a), leaves(lora_b), leaves(outs)
    produced = [o * 1.0 for o in o32]  # outs produced by an op, as the frozen layers' are
    torch.manual_seed(11)
    result = sdk.routed_sibling_lora_moe(x32[0], r32, a32, b32, top_k, scaling=scaling, dropout=p, outs=produced,
                                         token_mask=token_mask, backend="triton")
    torch.manual_seed(11)  # the op's seed, drawn again: its mask as the kernels draw it
    from sparsedoctor_kernels.ops.routed_sibling_lora_moe import _draw_seed
    from sparsedoctor_kernels.triton.routed_sibling_lora_moe import keep_mask
    keep = keep_mask(_draw_seed(torch.device("cpu")), num_tokens, d_in, p) if p > 0 else None
    if p > 0:
        assert abs(keep.double().mean().item() - (1 - p)) < 0.1
    x64, r64, a64, b64, o64 = (leaves(t, torch.float64) for t in ([x], routers, lora_a, lora_b, outs))
    want_outs, want_logits, want_weights, want_experts, want_means = brute_group(
        x64[0], r64, a64, b64, o64, top_k, scaling, keep, p, token_mask)
    assert all(got is out for got, out in zip(result.outs, produced))
    for s, (got, want) in enumerate(zip(result.outs, want_outs)):
        assert_close(got, want, torch.float32, name=f"outs[{s}]")
    assert_close(result.logits, want_logits, torch.float32, name="logits")
    assert torch.equal(result.routing.experts.long(), want_experts.long())
    assert_close(result.routing.weights, want_weights, torch.float32, name="weights")
    assert_close(result.routing.probs_mean, want_means, torch.float32, name="probs_mean")
    # Every output's gradient at once: the outs, the logits (a router term's), the gates and the means (balance).
    grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in want_outs]
    grad_logits, grad_weights, grad_means = (torch.randn(t.shape, generator=gen, dtype=torch.float64)
                                             for t in (want_logits, want_weights, want_means))

    def loss(outs, logits, weights, means):
        pairs = [*zip(outs, grads), (logits, grad_logits), (weights, grad_weights), (means, grad_means)]
        return sum((value * grad.to(value.dtype)).sum() for value, grad in pairs)

    loss(result.outs, result.logits, result.routing.weights, result.routing.probs_mean).backward()
    loss(want_outs, want_logits, want_weights, want_means).backward()
    for name, got, want in [("x", x32, x64), ("routers", r32, r64), ("lora_a", a32, a64), ("lora_b", b32, b64),
                            ("outs", o32, o64)]:
        for s, (g, w) in enumerate(zip(got, want)):
            assert_close(g.grad, w.grad, torch.float32, scale=10, name=f"grad {name}[{s}]")


@needs_triton
def test_triton_empty_and_unrouted_experts(gen):
    """T = 0 gives empty results and zero gradients; experts no token chose get zero gradients."""
    for num_tokens in (0, 3):
        x, routers, lora_a, lora_b, outs = make_group(gen, num_tokens, 9, (6, 10), 16, 4)
        x32, r32, a32, b32 = leaves([x]), leaves(routers), leaves(lora_a), leaves(lora_b)
        result = sdk.routed_sibling_lora_moe(x32[0], r32, a32, b32, 2, dropout=0.2, backend="triton")
        assert [o.shape for o in result.outs] == [(num_tokens, 6), (num_tokens, 10)]
        assert result.logits.shape == (2, num_tokens, 16)
        sum(o.sum() for o in result.outs).backward()
        assert x32[0].grad.shape == x.shape
        chosen = torch.zeros(2, 16, dtype=torch.bool)
        chosen.scatter_(1, result.routing.experts.reshape(2, -1).long(), True)
        for s in range(2):
            assert torch.all(a32[s].grad[~chosen[s]] == 0) and torch.all(b32[s].grad[~chosen[s]] == 0)
            assert torch.isfinite(r32[s].grad).all()


@needs_triton
def test_triton_dropout_replays_with_the_seed_and_drops_everything_at_one(gen):
    x, routers, lora_a, lora_b, _ = make_group(gen, 20, 16, (8,), 4, 4)
    args = (x.float(), [r.float() for r in routers], [a.float() for a in lora_a], [b.float() for b in lora_b], 2)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(sdk.routed_sibling_lora_moe(*args, dropout=0.5, backend="triton").outs[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    everything = sdk.routed_sibling_lora_moe(*args, dropout=1.0, backend="triton").outs[0]
    assert torch.equal(everything, torch.zeros_like(everything))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_torch_backend_is_the_ops_composed_bit_for_bit(gen, monkeypatch, p):
    monkeypatch.setenv(ENV_STRATEGY, "dense")
    x, routers, lora_a, lora_b, outs = (t if isinstance(t, torch.Tensor) else [u.float() for u in t]
                                        for t in make_group(gen, 13, 10, (6, 9, 4), 4, 3))
    x = x.float()
    mask = torch.arange(13) < 10
    torch.manual_seed(3)
    result = sdk.routed_sibling_lora_moe(x, routers, lora_a, lora_b, 2, scaling=2.0, dropout=p,
                                         outs=[o.clone() for o in outs], token_mask=mask, backend="torch")
    torch.manual_seed(3)
    for s in range(3):
        logits = x @ routers[s].T
        routing = sdk.route(logits, 2, token_mask=mask, backend="torch")
        assert torch.equal(result.logits[s], logits)
        for got, want in zip(result.routing.select(s), routing):
            assert torch.equal(got, want)
    dropped = torch.native_dropout(x, p, True)[0] if p > 0 else x
    for s in range(3):
        routing = result.routing.select(s)
        want = sdk.lora_moe(dropped, lora_a[s], lora_b[s], routing.weights, routing.experts, scaling=2.0,
                            out=outs[s].clone(), backend="torch", strategy="dense")
        assert torch.equal(result.outs[s], want)


def test_bad_arguments_are_named():
    x = torch.randn(4, 6)
    routers, lora_a, lora_b = [torch.randn(3, 6)], [torch.randn(3, 2, 6)], [torch.randn(3, 5, 2)]
    with pytest.raises(ValueError, match="dropout"):
        sdk.routed_sibling_lora_moe(x, routers, lora_a, lora_b, 2, dropout=1.5)
    with pytest.raises(ValueError, match="routers"):
        sdk.routed_sibling_lora_moe(x, [torch.randn(4, 6)], lora_a, lora_b, 2)
    with pytest.raises(ValueError, match="top_k"):
        sdk.routed_sibling_lora_moe(x, routers, lora_a, lora_b, 4)
    with pytest.raises(ValueError, match="outs"):
        sdk.routed_sibling_lora_moe(x, routers, lora_a, lora_b, 2, outs=[torch.randn(4, 4)])
    with pytest.raises(ValueError, match="expert_input"):
        sdk.routed_sibling_lora_moe(x, routers, lora_a, lora_b, 2, dropout=0.1, expert_input=x)
    with pytest.raises(ValueError, match="at least one sibling"):
        sdk.routed_sibling_lora_moe(x, [], [], [], 2)


@needs_triton
def test_triton_float64_dropout_and_token_splits(gen):
    """float64 end to end with dropout (the kept elements scaled in float64), and enough tokens that the weight
    gradients split their tokens across programs (partials summed in a fixed order)."""
    num_tokens, d_in, top_k, scaling, p = 200, 12, 2, 0.8, 0.3
    x, routers, lora_a, lora_b, outs = make_group(gen, num_tokens, d_in, (9, 6), 4, 5)
    x64, r64, a64, b64, o64 = (leaves(t, torch.float64) for t in ([x], routers, lora_a, lora_b, outs))
    produced = [o * 1.0 for o in o64]
    torch.manual_seed(5)
    result = sdk.routed_sibling_lora_moe(x64[0], r64, a64, b64, top_k, scaling=scaling, dropout=p, outs=produced,
                                         backend="triton")
    torch.manual_seed(5)
    from sparsedoctor_kernels.ops.routed_sibling_lora_moe import _draw_seed
    from sparsedoctor_kernels.triton.routed_sibling_lora_moe import keep_mask
    keep = keep_mask(_draw_seed(torch.device("cpu")), num_tokens, d_in, p)
    xb, rb, ab, bb, ob = (leaves(t, torch.float64) for t in ([x], routers, lora_a, lora_b, outs))
    want_outs, *_ = brute_group(xb[0], rb, ab, bb, ob, top_k, scaling, keep, p, None)
    for s, (got, want) in enumerate(zip(result.outs, want_outs)):
        assert_close(got, want, torch.float64, name=f"outs[{s}]")
    grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in want_outs]
    sum((o * g).sum() for o, g in zip(result.outs, grads)).backward()
    sum((o * g).sum() for o, g in zip(want_outs, grads)).backward()
    for name, got, want in [("x", x64, xb), ("routers", r64, rb), ("lora_a", a64, ab), ("lora_b", b64, bb)]:
        for s, (g, w) in enumerate(zip(got, want)):
            assert_close(g.grad, w.grad, torch.float64, name=f"grad {name}[{s}]")


@needs_triton
def test_triton_a_non_finite_token_stays_its_own(gen):
    """A token whose input holds NaN (or inf) gets non-finite routing and outputs; every other token's outputs,
    routing and input gradient are the brute force's, as in separate calls (tokens never mix in the forward)."""
    num_tokens, d_in, top_k = 21, 10, 2
    x, routers, lora_a, lora_b, outs = make_group(gen, num_tokens, d_in, (7, 5), 4, 3)
    x[4, 2], x[9, 0] = float("nan"), float("inf")
    bad = torch.zeros(num_tokens, dtype=torch.bool)
    bad[[4, 9]] = True
    x32, r32, a32, b32 = leaves([x]), leaves(routers), leaves(lora_a), leaves(lora_b)
    result = sdk.routed_sibling_lora_moe(x32[0], r32, a32, b32, top_k, outs=[o.float() for o in outs],
                                         backend="triton")
    x64, r64, a64, b64 = (leaves(t, torch.float64) for t in ([x], routers, lora_a, lora_b))
    good_x = x64[0].detach().clone()
    good_x[bad] = 0.0  # the brute force on the finite tokens only (its sort has no rule for NaN)
    good_x.requires_grad_()
    want_outs, want_logits, want_weights, _, _ = brute_group(good_x, r64, a64, b64, [o.clone() for o in outs],
                                                             top_k, 1.0, None, 0.0, None)
    for s, (got, want) in enumerate(zip(result.outs, want_outs)):
        assert not torch.isfinite(got[bad]).all(), s
        assert_close(got[~bad], want[~bad], torch.float32, name=f"outs[{s}]")
    assert_close(result.routing.weights[:, ~bad], want_weights[:, ~bad], torch.float32, name="weights")
    grads = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in want_outs]
    sum((o * g.float()).sum() for o, g in zip(result.outs, grads)).backward()
    sum((o * g).sum() for o, g in zip(want_outs, grads)).backward()
    assert_close(x32[0].grad[~bad], good_x.grad[~bad], torch.float32, scale=10, name="grad x")
