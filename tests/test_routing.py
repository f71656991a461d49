import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedoctor_kernels as sdk

import brute
from conftest import assert_close, backend_supports, cpu_backends

BACKENDS = cpu_backends("route")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _check_against_brute(logits, top_k, renormalize, gen, backend="torch"):
    leaf = logits.clone().requires_grad_()
    routing = sdk.route(leaf, top_k, renormalize=renormalize, backend=backend)
    assert isinstance(routing, sdk.Routing)
    assert routing._fields == ("weights", "experts", "counts", "probs_mean")
    expected_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert routing.weights.dtype == expected_dtype and routing.probs_mean.dtype == expected_dtype
    assert routing.experts.dtype == torch.int32 and routing.counts.dtype == torch.int32

    oracle_leaf = logits.detach().double().requires_grad_()
    weights, experts, counts, probs_mean = brute.route(oracle_leaf, top_k, renormalize)
    torch.testing.assert_close(routing.experts, experts, rtol=0, atol=0)
    torch.testing.assert_close(routing.counts, counts, rtol=0, atol=0)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert_close(routing.weights, weights, compute, name="weights")
    assert_close(routing.probs_mean, probs_mean, compute, name="probs_mean")

    grad_w = torch.randn(weights.shape, generator=gen, dtype=torch.float64)
    grad_p = torch.randn(probs_mean.shape, generator=gen, dtype=torch.float64)
    ((routing.weights.double() * grad_w).sum() + (routing.probs_mean.double() * grad_p).sum()).backward()
    ((weights * grad_w).sum() + (probs_mean * grad_p).sum()).backward()
    assert leaf.grad.dtype == logits.dtype
    assert_close(leaf.grad, oracle_leaf.grad, logits.dtype if logits.dtype != torch.float32 else compute,
                 name="grad logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("shape", [(37, 11, 3), (1, 1, 1), (13, 7, 7), (64, 8, 2), (5, 256, 8), (150, 3, 2),
                                   (700, 5, 2)])  # 700 x 5: more token tiles than one program walks
def test_route_matches_brute_force(shape, renormalize, dtype, backend, gen):
    if not backend_supports(backend, dtype):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    num_tokens, num_experts, top_k = shape
    logits = (torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64) * 2).to(dtype)
    _check_against_brute(logits, top_k, renormalize, gen, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("problems, num_tokens, num_experts, top_k", [(3, 37, 11, 3), (2, 150, 8, 2), (1, 5, 4, 4),
                                                                      (3, 0, 6, 2), (0, 7, 5, 2), (2, 700, 5, 2),
                                                                      (0, 700, 5, 2)])
def test_a_batch_of_routings_routes_each_as_alone(problems, num_tokens, num_experts, top_k, masked, backend, gen):
    """logits [S, T, E], here a transposed view of one [T, S * E] GEMM output (read in place): each routing s is
    route(logits[s]) with the shared token mask, and the gradient reaches the [T, S * E] leaf."""
    columns = torch.randn(num_tokens, problems * num_experts, generator=gen, dtype=torch.float64) * 2
    leaf = columns.float().requires_grad_()
    mask = torch.rand(num_tokens, generator=gen) < 0.7 if masked else None
    routing = sdk.route(leaf.view(num_tokens, problems, num_experts).transpose(0, 1), top_k, backend=backend,
                        token_mask=mask)
    assert routing.weights.shape == routing.experts.shape == (problems, num_tokens, top_k)
    assert routing.counts.shape == routing.probs_mean.shape == (problems, num_experts)
    grad_w = torch.randn(routing.weights.shape, generator=gen, dtype=torch.float64)
    grad_p = torch.randn(routing.probs_mean.shape, generator=gen, dtype=torch.float64)
    ((routing.weights.double() * grad_w).sum() + (routing.probs_mean.double() * grad_p).sum()).backward()
    oracle_leaf = columns.float().double().requires_grad_()
    oracle = oracle_leaf.view(num_tokens, problems, num_experts)
    balance = sdk.load_balance_loss(routing)
    assert balance.shape == (problems,)
    for s in range(problems):
        weights, experts, _, _ = brute.route(oracle[:, s], top_k)
        counted = oracle[:, s] if mask is None else oracle[mask, s]
        _, _, counts, probs_mean = brute.route(counted, top_k)
        torch.testing.assert_close(routing.experts[s], experts, rtol=0, atol=0)
        torch.testing.assert_close(routing.counts[s], counts, rtol=0, atol=0)
        assert_close(routing.weights[s], weights, torch.float32, name=f"weights {s}")
        assert_close(routing.probs_mean[s], probs_mean, torch.float32, name=f"probs_mean {s}")
        assert_close(balance[s], sdk.load_balance_loss(routing.select(s)), torch.float32, name=f"balance {s}")
        ((weights * grad_w[s]).sum() + (probs_mean * grad_p[s]).sum()).backward()
    if problems and num_tokens:
        assert_close(leaf.grad, oracle_leaf.grad, torch.float32, name="grad logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_empty_input(backend):
    logits = torch.zeros(0, 6, requires_grad=True)
    routing = sdk.route(logits, 2, backend=backend)
    assert routing.weights.shape == (0, 2) and routing.experts.shape == (0, 2)
    assert torch.equal(routing.counts, torch.zeros(6, dtype=torch.int32))
    assert torch.equal(routing.probs_mean, torch.zeros(6))
    assert sdk.load_balance_loss(routing).item() == 0.0
    (routing.weights.sum() + routing.probs_mean.sum()).backward()
    assert logits.grad.shape == (0, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_ties_go_to_the_lower_expert_id(backend):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    routing = sdk.route(logits, 4, backend=backend)
    assert routing.experts.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_route_gradcheck(backend):
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for renormalize in (True, False):
        def fn(z, renormalize=renormalize):
            r = sdk.route(z, 3, renormalize=renormalize, backend=backend)
            return r.weights, r.probs_mean, sdk.load_balance_loss(r)
        assert torch.autograd.gradcheck(fn, (logits,))


def test_route_gradient_of_weights_alone_and_probs_mean_alone(gen):
    logits = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    for pick in (lambda r: r.weights.sum() * 3, lambda r: (r.probs_mean ** 2).sum()):
        leaf = logits.clone().requires_grad_()
        pick(sdk.route(leaf, 2)).backward()
        oracle = logits.clone().requires_grad_()
        w, _, _, pm = brute.route(oracle, 2)
        pick(sdk.Routing(w, None, None, pm)).backward()
        assert_close(leaf.grad, oracle.grad, torch.float64)


def non_finite_logits(num_experts: int, dtype=torch.float32) -> torch.Tensor:
    """Rows without a finite softmax (all -inf, a NaN, a +inf, both), between finite rows and a row that is
    partly -inf (finite softmax, zero probabilities)."""
    inf, nan = float("inf"), float("nan")
    rows = torch.arange(6 * num_experts, dtype=torch.float64).reshape(6, num_experts).remainder(5) - 2
    rows[0] = -inf
    rows[1, num_experts // 2] = nan
    rows[2, num_experts - 1] = inf
    rows[3, 0], rows[3, -1] = inf, nan
    rows[5, : num_experts // 2] = -inf
    return rows.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_experts, top_k", [(6, 2), (3, 3), (40, 5), (1, 1)])
def test_route_non_finite_rows_follow_the_reference_and_stay_in_bounds(num_experts, top_k, backend):
    """Like torch's (and Hugging Face's) softmax + top-k: a row without a finite softmax gets NaN weights and
    experts 0..k-1; ids stay in [0, E) and counts add up, so no kernel writes past `counts`."""
    logits = non_finite_logits(num_experts)
    got_leaf, want_leaf = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got = sdk.route(got_leaf, top_k, backend=backend)
    want = sdk.route(want_leaf, top_k, backend="torch")
    assert got.experts.min() >= 0 and got.experts.max() < num_experts
    assert int(got.counts.sum()) == logits.shape[0] * top_k
    torch.testing.assert_close(got.experts, want.experts, rtol=0, atol=0)
    torch.testing.assert_close(got.counts, want.counts, rtol=0, atol=0)
    non_finite = ~torch.isfinite(torch.softmax(logits.double(), -1)).all(-1)
    assert non_finite[:4].all() and not non_finite[4:].any()
    assert got.experts[non_finite].tolist() == [list(range(top_k))] * 4
    assert got.weights[non_finite].isnan().all() and got.weights[~non_finite].isfinite().all()
    torch.testing.assert_close(got.weights, want.weights, equal_nan=True)
    torch.testing.assert_close(got.probs_mean, want.probs_mean, equal_nan=True)
    grad_w = torch.ones_like(got.weights)
    for routing in (got, want):
        (routing.weights * grad_w).nansum().backward()
    assert got_leaf.grad[non_finite].isnan().all()
    torch.testing.assert_close(got_leaf.grad, want_leaf.grad, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(37, 11, 3), (9, 256, 8), (5, 3, 1)])
def test_route_token_mask_restricts_the_statistics_to_real_tokens(num_tokens, num_experts, top_k, backend, gen):
    logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(num_tokens, generator=gen) < 0.6
    mask[0] = True
    leaf = logits.float().requires_grad_()
    routing = sdk.route(leaf, top_k, backend=backend, token_mask=mask)
    oracle = logits.float().double().requires_grad_()
    weights, experts, _, _ = brute.route(oracle, top_k)
    _, _, counts, probs_mean = brute.route(oracle[mask], top_k)
    torch.testing.assert_close(routing.experts, experts, rtol=0, atol=0)  # every token is still routed
    torch.testing.assert_close(routing.counts, counts, rtol=0, atol=0)
    assert_close(routing.weights, weights, torch.float32, name="weights")
    assert_close(routing.probs_mean, probs_mean, torch.float32, name="probs_mean")
    balance = sdk.load_balance_loss(routing)
    expected = brute.load_balance_loss(counts, probs_mean, int(mask.sum()), top_k)
    assert_close(balance, expected, torch.float32, name="balance over real tokens")
    grad_w = torch.randn(weights.shape, generator=gen, dtype=torch.float64)
    ((routing.weights.double() * grad_w).sum() + 3 * balance).backward()
    ((weights * grad_w).sum() + 3 * expected).backward()
    assert_close(leaf.grad, oracle.grad, torch.float32, name="grad logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_token_mask_without_real_tokens(backend):
    logits = torch.randn(6, 4, requires_grad=True)
    routing = sdk.route(logits, 2, backend=backend, token_mask=torch.zeros(6, dtype=torch.bool))
    assert routing.counts.sum() == 0 and torch.equal(routing.probs_mean, torch.zeros(4))
    loss = sdk.load_balance_loss(routing)
    assert loss.item() == 0.0
    (loss + routing.weights.sum()).backward()
    assert logits.grad.isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_token_mask_leaves_out_a_padding_row_without_a_finite_softmax(backend):
    logits = torch.randn(5, 4)
    logits[3] = float("nan")  # padding whose hidden state went NaN
    mask = torch.tensor([True, True, True, False, True])
    routing = sdk.route(logits, 2, backend=backend, token_mask=mask)
    want = sdk.route(logits[mask], 2, backend="torch")
    torch.testing.assert_close(routing.probs_mean, want.probs_mean)
    assert sdk.load_balance_loss(routing).isfinite()


def test_route_token_mask_is_checked():
    with pytest.raises(TypeError, match="token_mask must have dtype bool"):
        sdk.route(torch.zeros(3, 2), 1, token_mask=torch.ones(3))
    with pytest.raises(ValueError, match=r"token_mask must have shape \[T=3\]"):
        sdk.route(torch.zeros(3, 2), 1, token_mask=torch.ones(4, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(num_tokens=st.integers(0, 20), num_experts=st.integers(1, 40), data=st.data(),
       renormalize=st.booleans(), seed=st.integers(0, 2**31 - 1), backend=st.sampled_from(BACKENDS))
def test_route_property(num_tokens, num_experts, data, renormalize, seed, backend):
    top_k = data.draw(st.integers(1, min(num_experts, 8)))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    _check_against_brute(logits, top_k, renormalize, gen, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_balance_loss_matches_formula(dtype, gen):
    logits = torch.randn(23, 6, generator=gen).to(dtype)
    leaf = logits.clone().requires_grad_()
    routing = sdk.route(leaf, 2)
    loss = sdk.load_balance_loss(routing)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    oracle = logits.double().requires_grad_()
    _, _, counts, probs_mean = brute.route(oracle, 2)
    expected = brute.load_balance_loss(counts, probs_mean, 23, 2)
    assert_close(loss, expected, torch.float32)
    loss.backward()
    expected.backward()
    assert_close(leaf.grad, oracle.grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_balance_loss_given_the_counted_tokens_matches_the_default(backend, gen):
    logits = torch.randn(19, 7, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(19, generator=gen) < 0.7
    leaf = logits.float().requires_grad_()
    routing = sdk.route(leaf, 3, backend=backend, token_mask=mask)
    _, _, counts, probs_mean = brute.route(logits.float().double()[mask], 3)
    expected = brute.load_balance_loss(counts, probs_mean, int(mask.sum()), 3)
    for num_tokens in (None, int(mask.sum()), mask.sum(), mask.sum().to(torch.int32).view(1)):
        loss = sdk.load_balance_loss(routing, num_tokens=num_tokens)
        assert loss.dim() == 0 and loss.dtype == torch.float32
        assert_close(loss, expected, torch.float32, name=f"num_tokens={num_tokens!r}")
        (grad,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        (want,) = torch.autograd.grad(sdk.load_balance_loss(routing), leaf, retain_graph=True)
        assert_close(grad, want.double(), torch.float32, name="grad logits")
    empty = sdk.route(torch.randn(5, 4), 2, backend=backend, token_mask=torch.zeros(5, dtype=torch.bool))
    for num_tokens in (0, torch.tensor(0)):
        assert sdk.load_balance_loss(empty, num_tokens=num_tokens).item() == 0.0


def test_load_balance_loss_num_tokens_is_checked():
    routing = sdk.route(torch.randn(4, 3), 1)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="num_tokens must be an int >= 0 or a scalar tensor"):
            sdk.load_balance_loss(routing, num_tokens=bad)
    with pytest.raises(ValueError, match="num_tokens must be a scalar"):
        sdk.load_balance_loss(routing, num_tokens=torch.ones(2))


def test_load_balance_loss_is_one_for_perfect_balance():
    routing = sdk.route(torch.zeros(8, 4), 1)  # uniform probabilities, all ties -> expert 0
    assert sdk.load_balance_loss(routing).item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "logits, top_k, error, match",
    [
        (torch.zeros(4, 3, dtype=torch.int64), 1, TypeError, "logits must have dtype"),
        (torch.zeros(4), 1, ValueError, r"logits must have shape \[T, E\]"),
        (torch.zeros(4, 3, 2, 2), 1, ValueError, r"logits must have shape \[T, E\] or \[S, T, E\]"),
        (torch.zeros(4, 0), 1, ValueError, "E >= 1"),
        (torch.zeros(4, 3), 0, ValueError, "top_k must be >= 1"),
        (torch.zeros(4, 3), 4, ValueError, r"top_k must be in \[1, E\] = \[1, 3\]"),
        (torch.zeros(4, 3), 2.0, TypeError, "top_k must be an int"),
        ("logits", 1, TypeError, "logits must be a torch.Tensor"),
    ],
)
def test_route_rejects_bad_input(logits, top_k, error, match):
    with pytest.raises(error, match=match):
        sdk.route(logits, top_k)


def test_load_balance_loss_rejects_non_routing():
    with pytest.raises(TypeError, match="routing must be the sdk.Routing"):
        sdk.load_balance_loss(torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_route_without_autograd_matches_brute_force(masked, backend, gen):
    """Under no_grad `route` calls its implementation directly (no custom op, no autograd Function): the same
    routing, statistics and dtypes, and nothing recorded."""
    logits = torch.randn(9, 7, generator=gen, dtype=torch.float64).float()
    token_mask = torch.arange(9) < 6 if masked else None
    with torch.no_grad():
        routing = sdk.route(logits, 3, backend=backend, token_mask=token_mask)
    assert routing.weights.grad_fn is None and routing.experts.dtype == torch.int32
    with torch.enable_grad():
        recorded = sdk.route(logits.clone().requires_grad_(), 3, backend=backend, token_mask=token_mask)
    for name, got, want in zip(routing._fields, routing, recorded):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    weights, experts, _, _ = brute.route(logits.double(), 3, True)
    torch.testing.assert_close(routing.experts, experts, rtol=0, atol=0)
    assert_close(routing.weights, weights, torch.float32, name="weights")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_route_custom_ops_pass_opcheck(backend, masked, gen):
    """The forward and backward custom ops' fake implementations agree with the real ones (shapes, dtypes,
    strides), for one routing and for a batch given as a transposed view of one GEMM output."""
    import importlib

    module = importlib.import_module("sparsedoctor_kernels.ops.routing")
    mask = torch.rand(9, generator=gen) < 0.6 if masked else None
    batch = torch.randn(9, 3 * 5, generator=gen).view(9, 3, 5).transpose(0, 1)
    for logits in (torch.randn(9, 5, generator=gen), batch):
        torch.library.opcheck(module._route_forward, (logits, 2, True, backend, mask),
                              test_utils=("test_schema", "test_faketensor"))
        weights, experts, counts, probs_mean = module._route_forward(logits, 2, True, backend, mask)
        torch.library.opcheck(module._route_backward, (torch.randn_like(weights), torch.randn_like(probs_mean), logits,
                                                       experts, True, backend, mask),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batched", [False, True])
def test_route_without_statistics_gives_routes_weights_and_experts(batched, backend, gen):
    """The inference path's routing (no counts, no probability means; one kernel on Triton) is route's own."""
    from sparsedoctor_kernels.ops.routing import route_without_statistics

    shape = (3, 37, 11) if batched else (37, 11)
    logits = torch.randn(*shape, generator=gen) * 2
    logits[..., 5, :] = float("nan")  # a row without a finite softmax too
    for renormalize in (True, False):
        want = sdk.route(logits, 3, renormalize=renormalize, backend=backend)
        weights, experts = route_without_statistics(logits, 3, renormalize=renormalize, backend=backend)
        assert torch.equal(experts, want.experts)
        torch.testing.assert_close(weights, want.weights, rtol=0, atol=0, equal_nan=True)
    empty = route_without_statistics(torch.zeros(0, 4), 2, backend=backend)
    assert empty[0].shape == empty[1].shape == (0, 2)
