import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

import sparsedoctor_kernels as sdk
import sparsedoctor_kernels._alloc
from sparsedoctor_kernels.launches import count_launches, report

import brute
from conftest import assert_close, backend_supports, cpu_backends

BACKENDS = cpu_backends("infonce_queue_loss")


def make_queue(gen, num_experts, capacity, dim, sizes=None, dtype=torch.float32):
    queue = sdk.ExpertQueue(num_experts, capacity, dim, dtype=dtype)
    keys = torch.nn.functional.normalize(torch.randn(num_experts, capacity, dim, generator=gen), dim=-1)
    queue.keys.copy_(keys)
    if sizes is None:
        sizes = torch.randint(0, capacity + 1, (num_experts,), generator=gen)
    queue.size.copy_(torch.as_tensor(sizes))
    return queue


def run_and_compare(gen, num_rows, dim, queue, *, reduction="mean", normalize=True, temperature=0.1,
                    dtype=torch.float32, query_experts=None, scale=1.0, backend="torch", positive_noise=0.5):
    query = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64).to(dtype)
    noise = positive_noise * torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)
    positive = (query.double() + noise).to(dtype)
    if query_experts is None:
        query_experts = torch.randint(0, queue.num_experts, (num_rows,), generator=gen)
    leaves = query.clone().requires_grad_(), positive.clone().requires_grad_()
    oracle = query.double().requires_grad_(), positive.double().requires_grad_()
    loss = sdk.infonce_queue_loss(*leaves, queue, query_experts, temperature=temperature, normalize=normalize,
                                  reduction=reduction, validate=False, backend=backend)
    rows = brute.infonce_rows(*oracle, queue.keys, queue.size, query_experts, temperature, normalize)
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.mean() if num_rows else rows.sum()}[reduction]
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype and loss.shape == expected.shape
    compute = expected_dtype
    assert_close(loss, expected, dtype if dtype != torch.float32 else compute, scale=scale, name="loss")
    upstream = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for name, leaf, ref in zip(("query", "positive"), leaves, oracle):
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad, ref.grad, dtype, scale=scale, name=f"grad {name}")
    return loss, leaves


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_matches_brute_force(reduction, normalize, dtype, backend, gen):
    if not backend_supports(backend, dtype):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    queue = make_queue(gen, 5, 9, 12, sizes=[9, 3, 0, 6, 1])
    scale = 10.0 if not normalize else 1.0  # unnormalised scores are ~10x larger
    run_and_compare(gen, 23, 12, queue, reduction=reduction, normalize=normalize, dtype=dtype, scale=scale,
                    backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.float16])
def test_infonce_over_tiles_of_a_long_queue(backend, queue_dtype, gen):
    """More query rows than one program holds, queues longer than one tile of slots, p not a power of two,
    and a queue stored in another dtype than the queries."""
    queue = make_queue(gen, 4, 150, 20, sizes=[150, 70, 0, 129], dtype=queue_dtype)
    run_and_compare(gen, 83, 20, queue, reduction="none", backend=backend)
    # A positive unrelated to its query: negatives often beat it, so the running maximum moves between tiles.
    run_and_compare(gen, 83, 20, queue, reduction="none", backend=backend, positive_noise=100.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queue_gives_zero_loss_and_gradient(backend, gen):
    queue = make_queue(gen, 3, 4, 6, sizes=[0, 0, 0])
    loss, leaves = run_and_compare(gen, 7, 6, queue, reduction="none", backend=backend)
    assert torch.all(loss.abs() < 1e-6)
    assert torch.all(leaves[0].grad.abs() < 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_own_expert_filled_means_no_negatives(backend, gen):
    queue = make_queue(gen, 3, 4, 6, sizes=[4, 0, 0])
    loss, _ = run_and_compare(gen, 5, 6, queue, reduction="none", query_experts=torch.zeros(5, dtype=torch.long),
                              backend=backend)
    assert torch.all(loss.abs() < 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction, backend, gen):
    queue = make_queue(gen, 3, 4, 6)
    loss, leaves = run_and_compare(gen, 0, 6, queue, reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    assert leaves[0].grad.shape == (0, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_vector_query_uses_the_eps_clamp(backend, gen):
    """At ||q|| = 0 the normaliser is the 1e-12 clamp (as in F.normalize): finite, huge gradients."""
    queue = make_queue(gen, 2, 3, 4, sizes=[3, 3])
    query = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    positive = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    experts = torch.tensor([0, 1])
    loss = sdk.infonce_queue_loss(query, positive, queue, experts, reduction="sum", backend=backend)
    oracle = query.detach().clone().requires_grad_()
    expected = brute.infonce_rows(oracle, positive.detach(), queue.keys, queue.size, experts).sum()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    assert torch.isfinite(query.grad).all()
    torch.testing.assert_close(query.grad, oracle.grad, rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tuple_queue_and_ids_outside_range(backend, gen):
    queue = make_queue(gen, 3, 5, 4, sizes=[5, 2, 4])
    ids = torch.tensor([0, 3, -1, 2])  # 3 and -1 name no expert: every stored key is a negative
    run_and_compare(gen, 4, 4, queue, query_experts=ids, reduction="none", backend=backend)
    q = torch.randn(4, 4, generator=gen)
    as_tuple = sdk.infonce_queue_loss(q, q, (queue.keys, queue.size), ids, validate=False)
    assert_close(as_tuple, sdk.infonce_queue_loss(q, q, queue, ids, validate=False), torch.float32)
    with pytest.raises(ValueError, match=r"query_experts holds expert id -1, outside \[0, 3\)"):
        sdk.infonce_queue_loss(q, q, queue, ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_infonce_gradcheck(backend, gen):
    queue = make_queue(gen, 3, 4, 5, sizes=[4, 2, 3], dtype=torch.float64)
    query = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    positive = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    experts = torch.randint(0, 3, (6,), generator=gen)
    for normalize in (True, False):
        assert torch.autograd.gradcheck(
            lambda q, k, n=normalize: sdk.infonce_queue_loss(q, k, queue, experts, temperature=0.3, normalize=n,
                                                             reduction="none", backend=backend), (query, positive))


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_enqueue_does_not_change_gradients_against_oracle(backend, gen):
    queue = make_queue(gen, 4, 6, 8, sizes=[6, 6, 2, 4])
    snapshot = queue.keys.clone(), queue.size.clone()
    query = torch.randn(10, 8, generator=gen)
    positive = torch.randn(10, 8, generator=gen)
    experts = torch.randint(0, 4, (10,), generator=gen)
    q, k = query.clone().requires_grad_(), positive.clone().requires_grad_()
    loss = sdk.infonce_queue_loss(q, k, queue, experts, backend=backend)
    queue.enqueue(torch.randn(30, 8, generator=gen), torch.randint(0, 4, (30,), generator=gen), backend=backend)
    assert not torch.equal(queue.keys, snapshot[0])
    loss.backward()
    oq, ok = query.double().requires_grad_(), positive.double().requires_grad_()
    brute.infonce_rows(oq, ok, *snapshot, experts, 0.07).mean().backward()
    assert_close(q.grad, oq.grad, torch.float32, name="grad query")
    assert_close(k.grad, ok.grad, torch.float32, name="grad positive")


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_for_backward_does_not_grow_with_the_queue(backend, gen):
    def saved_bytes(capacity):
        queue = make_queue(gen, 8, capacity, 16, sizes=[capacity] * 8)
        q = torch.randn(32, 16, generator=gen, requires_grad=True)
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sdk.infonce_queue_loss(q, q * 1.0, queue, torch.randint(0, 8, (32,), generator=gen), backend=backend)
        return total

    small, large = saved_bytes(16), saved_bytes(1024)
    assert small == large
    assert small <= 3 * 32 * 16 * 4  # O(N * p): the two per-row gradients (and nothing of [N, E*Q])


def test_non_reentrant_checkpoint(gen):
    queue = make_queue(gen, 3, 5, 6, sizes=[5, 5, 5])
    experts = torch.randint(0, 3, (9,), generator=gen)
    weight = torch.randn(6, 6, generator=gen, requires_grad=True)
    x = torch.randn(9, 6, generator=gen)

    def block(w):
        h = x @ w
        return sdk.infonce_queue_loss(h, h.tanh(), queue, experts)

    checkpoint(block, weight, use_reentrant=False).backward()
    grad_checkpointed = weight.grad.clone()
    weight.grad = None
    block(weight).backward()
    torch.testing.assert_close(grad_checkpointed, weight.grad)


@settings(max_examples=30, deadline=None)
@given(num_rows=st.integers(0, 10), dim=st.integers(1, 8), num_experts=st.integers(1, 5),
       capacity=st.integers(0, 6), normalize=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
       seed=st.integers(0, 2**31 - 1), backend=st.sampled_from(BACKENDS))
def test_infonce_property(num_rows, dim, num_experts, capacity, normalize, reduction, seed, backend):
    gen = torch.Generator().manual_seed(seed)
    queue = make_queue(gen, num_experts, capacity, dim)
    run_and_compare(gen, num_rows, dim, queue, reduction=reduction, normalize=normalize, temperature=0.5,
                    scale=1.0 if normalize else 10.0, backend=backend)


def _bad_call(**overrides):
    args = dict(query=torch.zeros(4, 6), positive=torch.zeros(4, 6), queue=sdk.ExpertQueue(3, 5, 6),
                query_experts=torch.zeros(4, dtype=torch.int64))
    args.update(overrides)
    sdk.infonce_queue_loss(**args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(query=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "query must have dtype"),
        (dict(query=torch.zeros(4)), ValueError, r"query must have shape \[N, p\]"),
        (dict(positive=torch.zeros(4, 5)), ValueError, r"positive must have shape \[N=4, p=6\]"),
        (dict(queue=sdk.ExpertQueue(3, 5, 7)), ValueError, r"queue keys must have shape \[E, Q, p=6\]"),
        (dict(queue=(torch.zeros(3, 5, 6), torch.zeros(2, dtype=torch.int64))), ValueError,
         r"queue size must have shape \[E=3\]"),
        (dict(queue=(torch.zeros(3, 5, 6), torch.zeros(3))), TypeError, "queue size must have dtype"),
        (dict(queue=torch.zeros(3, 5, 6)), TypeError, "queue must be an sdk.ExpertQueue"),
        (dict(query_experts=torch.zeros(4)), TypeError, "query_experts must have dtype"),
        (dict(query_experts=torch.zeros(3, dtype=torch.int64)), ValueError, r"query_experts must have shape \[N=4\]"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(temperature="hot"), TypeError, "temperature must be a Python float"),
        (dict(reduction="max"), ValueError, "reduction must be one of"),
        (dict(positive=torch.zeros(4, 6, device="meta")), ValueError, "same device"),
    ],
)
def test_infonce_rejects_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


# The Triton path's queue splits: the launcher and its split rule, called directly.
needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (the interpreter on CPU)")
# Launches of one infonce_queue_loss forward + backward (mean), Triton backend: the two kernels, the op's
# reduction and its backward's scaling. 32 before the normalisation and temperature moved into the kernels.
INFONCE_STEP_LAUNCHES = 8


def _triton_infonce():
    from sparsedoctor_kernels.triton import infonce

    return infonce


def _launcher_inputs(gen, num_rows, queue, query_experts=None, dtype=torch.float64, positive_noise=0.5):
    query = torch.randn(num_rows, queue.dim, generator=gen, dtype=torch.float64)
    positive = query + positive_noise * torch.randn(num_rows, queue.dim, generator=gen, dtype=torch.float64)
    if query_experts is None:
        query_experts = torch.randint(-1, queue.num_experts + 1, (num_rows,), generator=gen)  # some out of range
    return query.to(dtype), positive.to(dtype), query_experts


def _brute_rows_and_grads(query, positive, queue, query_experts, temperature, normalize=True):
    """Brute-force per-row losses and d loss_i / d query_i, d loss_i / d positive_i (rows are independent)."""
    leaves = query.double().requires_grad_(), positive.double().requires_grad_()
    rows = brute.infonce_rows(*leaves, queue.keys, queue.size, query_experts, temperature, normalize)
    grads = torch.autograd.grad(rows.sum(), leaves) if rows.numel() else (leaves[0] * 0, leaves[1] * 0)
    return rows.detach(), *grads


def _launch(query, positive, queue, query_experts, temperature=0.1, normalize=True, num_splits=None):
    return _triton_infonce().forward(query, positive, queue.keys, queue.size, query_experts, temperature, normalize,
                                     num_splits=num_splits)


def _assert_matches_brute(got, expected, dtype=torch.float64, scale=1.0):
    for name, have, want in zip(("loss", "grad query", "grad positive"), got, expected):
        assert have.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert_close(have, want, dtype, scale=scale, name=name)


@needs_triton
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.slow
def test_forced_split_counts_agree_with_brute_force_and_each_other(normalize, gen):
    """Splits cut inside experts and tiles, splits of one slot, more splits asked than slots; a partly filled
    queue (one expert empty, one full), p not a power of two, ids -1 and E seeing every expert."""
    queue = make_queue(gen, 5, 37, 20, sizes=[37, 12, 0, 30, 1], dtype=torch.float64)
    query, positive, experts = _launcher_inputs(gen, 41, queue)
    expected = _brute_rows_and_grads(query, positive, queue, experts, 0.1, normalize)
    one_split = _launch(query, positive, queue, experts, normalize=normalize, num_splits=1)
    _assert_matches_brute(one_split, expected, scale=1.0 if normalize else 10.0)
    for num_splits in (2, 3, 7, 64, 5 * 37, 10_000):
        got = _launch(query, positive, queue, experts, normalize=normalize, num_splits=num_splits)
        _assert_matches_brute(got, expected, scale=1.0 if normalize else 10.0)
        for have, want in zip(got, one_split):  # the split count changes only the rounding
            torch.testing.assert_close(have, want, rtol=1e-13, atol=1e-13)


@needs_triton
def test_split_rule_fills_the_gpu_at_the_model_shapes_and_never_makes_an_empty_split():
    infonce = _triton_infonce()
    # N = 256 rows: 16 row blocks of 16 at p = 128, 8 of 32 at p = 64; E x Q = 8 x 1024 slots.
    assert infonce.split_queue(16, 8 * 1024) == (32, 256)
    assert infonce.split_queue(8, 8 * 1024) == (64, 128)
    assert infonce.split_queue(1024, 8 * 1024) == (1, 8 * 1024)  # a large batch fills the GPU by itself
    assert infonce.split_queue(1, 40) == (1, 64)  # at least MIN_TILES_PER_SPLIT tiles a split
    assert infonce.split_queue(4, 0) == (0, 1)
    for num_slots in (1, 5, 31, 32, 33, 100, 8192, 64 * 1024):
        for row_blocks in (1, 3, 16, 600):
            for forced in (None, 1, 2, 7, 64, 10**6):
                splits, slots_per_split = infonce.split_queue(row_blocks, num_slots, forced)
                assert splits >= 1 and (splits - 1) * slots_per_split < num_slots <= splits * slots_per_split
                assert forced is None or splits <= forced


@needs_triton
def test_merge_rescales_splits_whose_maximum_beats_the_positive(gen):
    """One split per expert: the own expert 0 gives no negative (max -inf); expert 1 holds rows 0..7's own
    queries, whose scores 1/T beat their positives; experts 2 and 3 hold keys scoring <= 0, far below every
    positive. Merging without rescaling each side to the new maximum gets the rows wrong."""
    num_rows, dim, temperature = 16, 8, 0.05
    query = torch.zeros(num_rows, dim, dtype=torch.float64)
    query[:, :4] = torch.randn(num_rows, 4, generator=gen, dtype=torch.float64).abs()  # one orthant of 4 dims
    positive = query + 0.3 * torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)
    queue = make_queue(gen, 4, 8, dim, sizes=[8, 8, 8, 8], dtype=torch.float64)
    unit = torch.nn.functional.normalize(query, dim=-1)
    queue.keys[1] = unit[:8]
    queue.keys[2:, :, :4] = -queue.keys[2:, :, :4].abs()
    queue.keys[2:, :, 4:] = 0.0
    experts = torch.zeros(num_rows, dtype=torch.long)
    scores = unit @ queue.keys.reshape(32, dim).T / temperature
    positive_score = (unit * torch.nn.functional.normalize(positive, dim=-1)).sum(-1) / temperature
    assert (scores[:8, 8:16].max(1).values > positive_score[:8]).all()  # the case is as described
    assert (scores[:, 16:].max(1).values <= 0).all() and (positive_score > 5).all()
    expected = _brute_rows_and_grads(query, positive, queue, experts, temperature)
    assert _triton_infonce().split_queue(1, 32, 4) == (4, 8)
    _assert_matches_brute(_launch(query, positive, queue, experts, temperature=temperature, num_splits=4), expected)


@needs_triton
@pytest.mark.parametrize("num_experts, capacity, sizes", [(64, 5, None), (3, 0, [0, 0, 0]), (6, 9, [0] * 6)])
def test_split_launcher_edge_queues(num_experts, capacity, sizes, gen):
    """E = 64 (splits spanning several experts), Q = 0 (no split kernel at all), every slot unfilled."""
    queue = make_queue(gen, num_experts, capacity, 7, sizes=sizes, dtype=torch.float64)
    query, positive, experts = _launcher_inputs(gen, 19, queue)
    expected = _brute_rows_and_grads(query, positive, queue, experts, 0.1)
    for num_splits in (None, 1, 5, 97):
        _assert_matches_brute(_launch(query, positive, queue, experts, num_splits=num_splits), expected)


@needs_triton
def test_split_launcher_empty_batch_and_float32(gen):
    queue = make_queue(gen, 4, 50, 12, sizes=[50, 20, 0, 49])
    query, positive, experts = _launcher_inputs(gen, 0, queue)
    assert [t.shape for t in _launch(query, positive, queue, experts)] == [(0,), (0, 12), (0, 12)]
    query, positive, experts = _launcher_inputs(gen, 70, queue, dtype=torch.float32)
    expected = _brute_rows_and_grads(query, positive, queue, experts, 0.1)
    for num_splits in (None, 3):
        _assert_matches_brute(_launch(query, positive, queue, experts, num_splits=num_splits), expected,
                              dtype=torch.float32)


@needs_triton
def test_triton_infonce_is_bitwise_deterministic(gen):
    queue = make_queue(gen, 8, 64, 16, sizes=[64, 10, 0, 33, 64, 64, 1, 5])
    num_rows = 40
    assert _triton_infonce().split_queue(1, 8 * 64)[0] > 1  # the default split count merges several partials
    query, positive, experts = _launcher_inputs(gen, num_rows, queue, dtype=torch.float32, positive_noise=3.0)

    def run():
        q, k = query.clone().requires_grad_(), positive.clone().requires_grad_()
        loss = sdk.infonce_queue_loss(q, k, queue, experts, reduction="none", backend="triton", validate=False)
        (loss * torch.linspace(0.5, 1.5, num_rows)).sum().backward()
        return loss.detach(), q.grad, k.grad

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


@needs_triton
def test_triton_infonce_step_launches(monkeypatch, gen):
    monkeypatch.setattr(sparsedoctor_kernels._alloc, "poison_outputs", False)  # the tests' NaN fills are no launch
    queue = make_queue(gen, 8, 64, 16, sizes=[64, 10, 0, 33, 64, 64, 1, 5])
    query, positive, experts = _launcher_inputs(gen, 32, queue, dtype=torch.float32)
    q, k = query.requires_grad_(), positive.requires_grad_()
    counts = count_launches(lambda: sdk.infonce_queue_loss(q, k, queue, experts, backend="triton",
                                                           validate=False).backward())
    assert counts.triton == 2, counts
    assert counts.total <= INFONCE_STEP_LAUNCHES, report(counts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_lower_the_scores_precision(backend, gen):
    """Under bfloat16 autocast (a mixed-precision training step) the op still scores in float32: the loss
    and gradients equal those computed outside autocast (the matmuls of the torch backend would otherwise run
    in bfloat16)."""
    queue = make_queue(gen, 3, 37, 16, sizes=[37, 20, 5])
    query = torch.randn(23, 16, generator=gen, requires_grad=True)
    positive = torch.randn(23, 16, generator=gen, requires_grad=True)
    experts = torch.randint(0, 3, (23,), generator=gen)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = sdk.infonce_queue_loss(query, positive, queue, experts, reduction="none", backend=backend)
        assert loss.dtype == torch.float32
        results.append((loss, *torch.autograd.grad(loss.sum(), (query, positive))))
    for plain, autocast in zip(*results):
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)
