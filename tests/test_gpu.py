"""The GPU backends on CUDA tensors: 16-bit dtypes, larger shapes, bitwise determinism and CUDA-graph capture
(which fails on any host synchronisation). Skipped without a GPU.

The oracle here is the torch reference run in float64 on the CPU (it is itself tested against the brute-force
loops); tolerances scale with the largest expected magnitude, because these outputs are long reductions."""

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels._backend import why_backend_cannot_run

import brute
from conftest import TOLERANCES
from test_routing import non_finite_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gpu_backends(op):
    """The op's non-reference backends that can run on this GPU (`cuda` only when the extension is built)."""
    cuda = torch.device("cuda")
    return [pytest.param(b, marks=pytest.mark.skipif(why_backend_cannot_run(b, cuda) is not None,
                                                     reason=str(why_backend_cannot_run(b, cuda))))
            for b in sdk.ops.IMPLEMENTATIONS[op] if b != "torch"] if torch.cuda.is_available() else ["triton"]


def assert_close_scaled(actual, expected, dtype, name):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol * scale,
                               rtol=rtol, msg=lambda m: f"{name}: {m}")


def _route_case(num_tokens, num_experts, top_k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64) * 2
    grad_w = torch.randn(num_tokens, top_k, generator=gen, dtype=torch.float64)
    grad_p = torch.randn(num_experts, generator=gen, dtype=torch.float64)
    return logits.to(dtype), grad_w, grad_p


@pytest.mark.parametrize("backend", gpu_backends("route"))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(4099, 8, 2), (1000, 60, 4), (777, 256, 8), (3, 1, 1), (0, 5, 2)])
def test_route_on_gpu(shape, dtype, backend):
    logits, grad_w, grad_p = _route_case(*shape, dtype, seed=sum(shape))
    leaf = logits.cuda().requires_grad_()
    got = sdk.route(leaf, shape[2], backend=backend)
    ((got.weights.double() * grad_w.cuda()).sum() + (got.probs_mean.double() * grad_p.cuda()).sum()).backward()
    oracle = logits.double().requires_grad_()  # the same rounded logits, in float64
    want = sdk.route(oracle, shape[2], backend="torch")
    ((want.weights * grad_w).sum() + (want.probs_mean * grad_p).sum()).backward()
    torch.testing.assert_close(got.experts.cpu(), want.experts, rtol=0, atol=0)
    torch.testing.assert_close(got.counts.cpu(), want.counts, rtol=0, atol=0)
    assert_close_scaled(got.weights, want.weights, torch.float32, "weights")
    assert_close_scaled(got.probs_mean, want.probs_mean, torch.float32, "probs_mean")
    assert_close_scaled(leaf.grad, oracle.grad, dtype if dtype != torch.float32 else torch.float32, "grad logits")


@pytest.mark.parametrize("backend", gpu_backends("route"))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_experts, top_k", [(6, 2), (40, 5), (256, 8)])
def test_route_non_finite_rows_on_gpu(num_experts, top_k, dtype, backend):
    """NaN/inf rows: the reference's ids (0..k-1) and NaN weights, in-bounds counts, on the hardware's NaN rules."""
    logits = non_finite_logits(num_experts, dtype)
    got = sdk.route(logits.cuda(), top_k, backend=backend)
    want = sdk.route(logits, top_k, backend="torch")
    torch.cuda.synchronize()
    torch.testing.assert_close(got.experts.cpu(), want.experts, rtol=0, atol=0)
    torch.testing.assert_close(got.counts.cpu(), want.counts, rtol=0, atol=0)
    torch.testing.assert_close(got.weights.cpu(), want.weights, equal_nan=True, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", gpu_backends("route"))
def test_route_token_mask_on_gpu(backend):
    logits, grad_w, grad_p = _route_case(3001, 60, 4, torch.float32, seed=5)
    mask = torch.Generator().manual_seed(6)
    mask = torch.rand(3001, generator=mask) < 0.7
    leaf = logits.cuda().requires_grad_()
    got = sdk.route(leaf, 4, backend=backend, token_mask=mask.cuda())
    ((got.weights.double() * grad_w.cuda()).sum() + (got.probs_mean.double() * grad_p.cuda()).sum()).backward()
    oracle = logits.double().requires_grad_()
    want = sdk.route(oracle, 4, backend="torch", token_mask=mask)
    ((want.weights * grad_w).sum() + (want.probs_mean * grad_p).sum()).backward()
    torch.testing.assert_close(got.counts.cpu(), want.counts, rtol=0, atol=0)
    assert_close_scaled(got.probs_mean, want.probs_mean, torch.float32, "probs_mean")
    assert_close_scaled(leaf.grad, oracle.grad, torch.float32, "grad logits")


@pytest.mark.parametrize("backend", gpu_backends("route"))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_a_batch_of_routings_on_gpu(dtype, backend):
    """[S, T, E] as the sibling groups give it (a transposed view of one [T, S * E] GEMM output), masked: each
    routing as the float64 reference routes it alone, and the gradient back in the GEMM output's layout."""
    problems, num_tokens, num_experts, top_k = 3, 3001, 60, 4
    logits, _, _ = _route_case(num_tokens, problems * num_experts, top_k, dtype, seed=11)
    gen = torch.Generator().manual_seed(12)
    grad_w = torch.randn(problems, num_tokens, top_k, generator=gen, dtype=torch.float64)
    grad_p = torch.randn(problems, num_experts, generator=gen, dtype=torch.float64)
    mask = torch.rand(num_tokens, generator=gen) < 0.7
    leaf = logits.cuda().requires_grad_()
    got = sdk.route(leaf.view(num_tokens, problems, num_experts).transpose(0, 1), top_k, backend=backend,
                    token_mask=mask.cuda())
    ((got.weights.double() * grad_w.cuda()).sum() + (got.probs_mean.double() * grad_p.cuda()).sum()).backward()
    oracle = logits.double().requires_grad_()
    for s in range(problems):
        want = sdk.route(oracle.view(num_tokens, problems, num_experts)[:, s], top_k, backend="torch", token_mask=mask)
        ((want.weights * grad_w[s]).sum() + (want.probs_mean * grad_p[s]).sum()).backward()
        torch.testing.assert_close(got.experts[s].cpu(), want.experts, rtol=0, atol=0)
        torch.testing.assert_close(got.counts[s].cpu(), want.counts, rtol=0, atol=0)
        assert_close_scaled(got.weights[s], want.weights, torch.float32, f"weights {s}")
        assert_close_scaled(got.probs_mean[s], want.probs_mean, torch.float32, f"probs_mean {s}")
    assert_close_scaled(leaf.grad, oracle.grad, dtype if dtype != torch.float32 else torch.float32, "grad logits")


def _lora_case(num_tokens, d_in, d_out, num_experts, rank, top_k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    pool = max(top_k, num_experts - 1)  # the last expert gets no token when E > k
    experts = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(num_tokens)]).int()
    tensors = dict(
        x=torch.randn(num_tokens, d_in, **f64), lora_a=torch.randn(num_experts, rank, d_in, **f64) / d_in**0.5,
        lora_b=torch.randn(num_experts, d_out, rank, **f64) / rank**0.5, weights=torch.rand(num_tokens, top_k, **f64),
        base=torch.randn(num_tokens, d_out, **f64), grad_y=torch.randn(num_tokens, d_out, **f64),
    )
    # Round once to the dtype under test so that kernel and oracle see the same numbers.
    rounded = {n: t.to(dtype if n not in ("weights",) else torch.float32).double() for n, t in tensors.items()}
    return rounded, experts


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("with_out", [False, True])
@pytest.mark.parametrize("shape", [(1000, 256, 384, 8, 16, 2), (777, 200, 130, 64, 8, 4), (513, 96, 70, 5, 67, 3),
                                   (64, 2560, 9728, 8, 16, 2)])
def test_triton_lora_moe_on_gpu(shape, with_out, dtype):
    rounded, experts = _lora_case(*shape, dtype, seed=sum(shape))
    names = ("x", "lora_a", "lora_b", "weights")
    leaves = {n: rounded[n].to("cuda", dtype if n != "weights" else torch.float32).requires_grad_() for n in names}
    oracle = {n: rounded[n].clone().requires_grad_() for n in names}
    out = rounded["base"].to("cuda", dtype) if with_out else None
    got = sdk.lora_moe(**leaves, experts=experts.cuda(), scaling=2.0, out=out, backend="triton")
    want = sdk.lora_moe(**oracle, experts=experts, scaling=2.0, backend="torch")
    if with_out:
        assert got is out
        want = want + rounded["base"]
    assert_close_scaled(got, want, dtype, "y")
    (got.double() * rounded["grad_y"].cuda()).sum().backward()
    (want * rounded["grad_y"]).sum().backward()
    for n in names:
        assert_close_scaled(leaves[n].grad, oracle[n].grad, dtype, f"grad {n}")
    unused = shape[3] - 1
    if shape[3] > shape[5]:
        assert torch.count_nonzero(leaves["lora_a"].grad[unused]) == 0
        assert torch.count_nonzero(leaves["lora_b"].grad[unused]) == 0


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_triton_lora_moe_regate_on_gpu(dtype, strategy):
    """The model's contrastive views: 256 picked tokens regated twice (routed, fused) beside the call."""
    rounded, experts = _lora_case(4096, 2560, 4096, 8, 16, 2, dtype, seed=11)
    gen = torch.Generator().manual_seed(12)
    picked = torch.randperm(4096, generator=gen)[:256]
    rows = picked.repeat(2)
    rows_weights = torch.cat([torch.tensor([[1.0, 0.0]]).expand(256, -1), rounded["weights"][picked]]).float()
    rows_experts = experts[rows]
    grad_rows = torch.randn(512, 4096, generator=gen, dtype=torch.float64).to(dtype).double()
    names = ("x", "lora_a", "lora_b", "weights")
    runs = []
    for _ in range(2):
        leaves = {n: rounded[n].to("cuda", dtype if n != "weights" else torch.float32).requires_grad_() for n in names}
        leaf_rows_weights = rows_weights.cuda().requires_grad_()
        y, y_rows = sdk.lora_moe(**leaves, experts=experts.cuda(), scaling=2.0, out=rounded["base"].to("cuda", dtype),
                                 regate=(rows.cuda(), leaf_rows_weights, rows_experts.cuda()), backend="triton",
                                 strategy=strategy)
        ((y.double() * rounded["grad_y"].cuda()).sum() + (y_rows.double() * grad_rows.cuda()).sum()).backward()
        runs.append([y.detach(), y_rows.detach(), leaf_rows_weights.grad] + [leaves[n].grad for n in names])
    for first, again in zip(*runs):
        assert torch.equal(first, again)
    oracle = {n: rounded[n].clone().requires_grad_() for n in names}
    oracle_rows_weights = rows_weights.double().requires_grad_()
    want, want_rows = sdk.lora_moe(**oracle, experts=experts, scaling=2.0, backend="torch",
                                   regate=(rows, oracle_rows_weights, rows_experts))
    want = want + rounded["base"]
    ((want * rounded["grad_y"]).sum() + (want_rows * grad_rows).sum()).backward()
    assert_close_scaled(runs[0][0], want, dtype, "y")
    assert_close_scaled(runs[0][1], want_rows, dtype, "regated rows")
    assert_close_scaled(runs[0][2], oracle_rows_weights.grad, dtype, "grad regate weights")
    for got, n in zip(runs[0][3:], names):
        assert_close_scaled(got, oracle[n].grad, dtype, f"grad {n}")


def test_triton_lora_moe_is_bitwise_deterministic_on_gpu():
    rounded, experts = _lora_case(4097, 512, 768, 8, 16, 2, torch.bfloat16, seed=3)
    runs = []
    for _ in range(3):
        leaves = {n: rounded[n].to("cuda", torch.bfloat16).requires_grad_() for n in ("x", "lora_a", "lora_b")}
        weights = rounded["weights"].float().cuda().requires_grad_()
        y = sdk.lora_moe(**leaves, weights=weights, experts=experts.cuda(), backend="triton")
        y.backward(rounded["grad_y"].to("cuda", torch.bfloat16))
        runs.append([y.detach()] + [t.grad for t in (*leaves.values(), weights)])
    for later in runs[1:]:
        for first, again in zip(runs[0], later):
            assert torch.equal(first, again)


@pytest.mark.parametrize("with_out", [False, True])
def test_triton_lora_moe_empty_and_out_of_range_on_gpu(with_out):
    x = torch.zeros(0, 8, device="cuda", requires_grad=True)
    lora_a = torch.randn(3, 2, 8, device="cuda", requires_grad=True)
    lora_b = torch.randn(3, 5, 2, device="cuda", requires_grad=True)
    weights = torch.zeros(0, 2, device="cuda", requires_grad=True)
    experts = torch.zeros(0, 2, dtype=torch.int32, device="cuda")
    out = torch.zeros(0, 5, device="cuda") if with_out else None
    y = sdk.lora_moe(x, lora_a, lora_b, weights, experts, out=out, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 5) and torch.count_nonzero(lora_a.grad) == 0 and torch.count_nonzero(lora_b.grad) == 0

    x = torch.randn(6, 8, device="cuda", requires_grad=True)
    weights = torch.rand(6, 2, device="cuda", requires_grad=True)
    experts = torch.tensor([[0, 1], [-1, 2], [3, 1], [7, -9], [2, 2], [1, 100]], dtype=torch.int32, device="cuda")
    y = sdk.lora_moe(x, lora_a, lora_b, weights, experts, backend="triton", validate=False)
    want = sdk.lora_moe(x.detach().cpu(), lora_a.detach().cpu(), lora_b.detach().cpu(), weights.detach().cpu(),
                        experts.cpu(), backend="torch", validate=False)
    assert_close_scaled(y, want, torch.float32, "y")
    y.sum().backward()
    assert torch.count_nonzero(y[3]) == 0 and torch.count_nonzero(x.grad[3]) == 0
    assert weights.grad[1, 0] == 0 and weights.grad[5, 1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_lora_moe_strided_out_and_non_finite_unused_expert_on_gpu(dtype):
    """A transposed `out` gets the delta in its own elements only; NaN/inf weights of an expert no token chose
    reach nothing; `out=x` is refused."""
    rounded, experts = _lora_case(300, 96, 80, 6, 8, 2, dtype, seed=11)  # expert 5 gets no token
    rounded["lora_a"][5, 0, 0] = float("nan")
    rounded["lora_b"][5, 1, 1] = float("inf")
    names = ("x", "lora_a", "lora_b", "weights")
    leaves = {n: rounded[n].to("cuda", dtype if n != "weights" else torch.float32).requires_grad_() for n in names}
    buffer = torch.full((80 + 3, 300), float("nan"), device="cuda", dtype=dtype)
    out = buffer[3:].T
    out.copy_(rounded["base"].to("cuda", dtype))
    got = sdk.lora_moe(**leaves, experts=experts.cuda(), scaling=2.0, out=out, backend="triton")
    want = rounded["base"] + reference_in_float64(rounded, experts, names)
    assert got is out and buffer[:3].isnan().all()
    assert_close_scaled(got, want, dtype, "y")
    (got.double() * rounded["grad_y"].cuda()).sum().backward()
    for n in names:
        assert leaves[n].grad.isfinite().all(), n
    with pytest.raises(ValueError, match="out shares memory with x"):
        sdk.lora_moe(leaves["x"].detach(), leaves["lora_a"].detach(), leaves["lora_a"].detach().transpose(1, 2),
                     leaves["weights"].detach(), experts.cuda(), out=leaves["x"].detach(), backend="triton")


def reference_in_float64(rounded, experts, names):
    """The float64 torch reference on the CPU (itself tested against the brute-force loops)."""
    return sdk.lora_moe(*(rounded[n] for n in names), experts, scaling=2.0, backend="torch")


def test_route_and_lora_moe_capture_in_a_cuda_graph():
    """Capture fails on any host synchronisation: forward and backward of both ops must be sync-free."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 64, device="cuda", generator=gen, requires_grad=True)
    router = torch.randn(8, 64, device="cuda", generator=gen, requires_grad=True)
    lora_a = torch.randn(8, 4, 64, device="cuda", generator=gen, requires_grad=True)
    lora_b = torch.randn(8, 48, 4, device="cuda", generator=gen, requires_grad=True)
    params = (x, router, lora_a, lora_b)

    def step():
        routing = sdk.route(x @ router.T, 2, backend="triton", validate=False)
        y = sdk.lora_moe(x, lora_a, lora_b, routing.weights, routing.experts, backend="triton", validate=False)
        loss = y.square().mean() + sdk.load_balance_loss(routing)
        return loss, torch.autograd.grad(loss, params)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile the kernels outside the capture
            eager_loss, eager_grads = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss, graph_grads = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_loss, eager_loss)
    for got, want in zip(graph_grads, eager_grads):
        torch.testing.assert_close(got, want)


def test_fullgraph_compile_with_triton_on_gpu():
    torch._dynamo.reset()
    x = torch.randn(129, 32, device="cuda")
    router = torch.randn(6, 32, device="cuda", requires_grad=True)
    lora_a = torch.randn(6, 4, 32, device="cuda", requires_grad=True)
    lora_b = torch.randn(6, 40, 4, device="cuda", requires_grad=True)
    base = torch.randn(40, 32, device="cuda")

    def layer(x, router, lora_a, lora_b):
        routing = sdk.route(x @ router.T, 2)
        y = sdk.lora_moe(x, lora_a, lora_b, routing.weights, routing.experts, out=x @ base.T)
        return y.square().mean() + sdk.load_balance_loss(routing)

    params = (router, lora_a, lora_b)
    eager = layer(x, *params)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(layer, fullgraph=True)(x, *params)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, params), eager_grads):
        torch.testing.assert_close(got, want)


def _queue_case(num_experts, capacity, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    queue = sdk.ExpertQueue(num_experts, capacity, dim, dtype=dtype)
    queue.keys.copy_(torch.randn(queue.keys.shape, generator=gen))
    queue.ptr.copy_(torch.randint(0, capacity, (num_experts,), generator=gen))
    queue.size.copy_(torch.randint(0, capacity + 1, (num_experts,), generator=gen))
    return queue, gen


@pytest.mark.parametrize("backend", gpu_backends("ExpertQueue.enqueue"))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("num_experts, capacity, rows", [(8, 1024, 16384), (64, 37, 5000), (3, 5, 4000), (1, 7, 0)])
def test_enqueue_on_gpu(num_experts, capacity, rows, dtype, backend):
    """Bit-exact against the row-by-row oracle; many more rows than slots, so racing writers would show."""
    queue, gen = _queue_case(num_experts, capacity, 16, dtype, seed=rows + num_experts)
    on_gpu = _on_gpu(queue)
    for _ in range(3):
        keys = torch.randn(rows, 16, generator=gen)
        experts = torch.randint(-1, num_experts + 1, (rows,), generator=gen, dtype=torch.int32)
        expected = brute.enqueue(queue.keys, queue.ptr, queue.size, keys.to(dtype), experts)
        queue.keys.copy_(expected[0].to(dtype)), queue.ptr.copy_(expected[1]), queue.size.copy_(expected[2])
        on_gpu.enqueue(keys.cuda(), experts.cuda(), backend=backend, validate=False)
        for name in ("keys", "ptr", "size"):
            assert torch.equal(getattr(on_gpu, name).cpu(), getattr(queue, name)), name


@pytest.mark.parametrize("backend", gpu_backends("infonce_queue_loss"))
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("num_rows, num_experts, capacity, dim", [(1000, 8, 300, 128), (77, 64, 33, 50), (0, 2, 4, 8)])
def test_infonce_on_gpu(num_rows, num_experts, capacity, dim, normalize, dtype, backend):
    queue, gen = _queue_case(num_experts, capacity, dim, torch.float32, seed=num_rows + dim)
    queue.keys.copy_(torch.nn.functional.normalize(queue.keys, dim=-1))
    query = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64).to(dtype).double()
    positive = (query + torch.randn(num_rows, dim, generator=gen, dtype=torch.float64)).to(dtype).double()
    experts = torch.randint(0, num_experts, (num_rows,), generator=gen)
    upstream = torch.randn(num_rows, generator=gen, dtype=torch.float64)
    leaves = [t.to("cuda", dtype).requires_grad_() for t in (query, positive)]
    oracle = [t.clone().requires_grad_() for t in (query, positive)]
    got = sdk.infonce_queue_loss(*leaves, _on_gpu(queue), experts.cuda(),
                                 normalize=normalize, reduction="none", backend=backend)
    want = sdk.infonce_queue_loss(*oracle, (queue.keys.double(), queue.size), experts, normalize=normalize,
                                  reduction="none", backend="torch")
    assert_close_scaled(got, want, torch.float32, "loss")
    (got.double() * upstream.cuda()).sum().backward()
    (want * upstream).sum().backward()
    for leaf, ref, name in zip(leaves, oracle, ("query", "positive")):
        assert_close_scaled(leaf.grad, ref.grad, dtype, f"grad {name}")


def _on_gpu(queue):
    copy = sdk.ExpertQueue(queue.num_experts, queue.capacity, queue.dim, dtype=queue.keys.dtype, device="cuda")
    copy.load_state_dict(queue.state_dict())
    return copy


def test_queue_and_infonce_capture_in_a_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(1)
    queue = sdk.ExpertQueue(8, 64, 32, device="cuda")
    query = torch.randn(500, 32, device="cuda", generator=gen, requires_grad=True)
    experts = torch.randint(0, 8, (500,), device="cuda", generator=gen)

    def step():
        loss = sdk.infonce_queue_loss(query, query.tanh(), queue, experts, backend="triton", validate=False)
        queue.enqueue(query.detach(), experts, backend="triton", validate=False)
        return loss, torch.autograd.grad(loss, query)[0]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    queue.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_loss, graph_grad = step()
    queue.reset()
    eager_loss, eager_grad = step()
    queue.reset()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graph_loss, eager_loss)
    torch.testing.assert_close(graph_grad, eager_grad)


@pytest.mark.parametrize("shape", [(256, 8, 8), (256, 16, 16), (64, 64, 64), (5, 3, 2)])
def test_group_infonce_on_gpu(shape):
    """The router term's kernel on the GPU against autograd of the formula in float64, bit-for-bit twice."""
    num_rows, dim, num_groups = shape
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.softmax(torch.randn(num_rows, dim, generator=gen, dtype=torch.float64) * 2, -1)
    groups = torch.randint(-1, num_groups, (num_rows,), generator=gen)
    leaf = x.clone().requires_grad_()
    want = brute.group_infonce(leaf, groups, num_groups, 0.07)
    want.backward()
    runs = []
    for _ in range(2):
        got_leaf = x.float().cuda().requires_grad_()
        got = sdk.group_infonce(got_leaf, groups.cuda(), num_groups, backend="triton")
        got.backward()
        runs.append((got.detach(), got_leaf.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert_close_scaled(runs[0][0], want, torch.float32, "loss")
    assert_close_scaled(runs[0][1], leaf.grad, torch.float32, "grad x")


def test_a_batch_of_group_infonce_problems_on_gpu():
    """The model's router term of every module in one launch: each problem's loss and gradient as alone."""
    gen = torch.Generator().manual_seed(7)
    x = torch.softmax(torch.randn(28, 256, 8, generator=gen, dtype=torch.float64) * 2, -1)
    groups = torch.randint(-1, 8, (28, 256), generator=gen)
    weights = torch.rand(28, generator=gen, dtype=torch.float64)
    got_leaf = x.float().cuda().requires_grad_()
    got = sdk.group_infonce(got_leaf, groups.cuda(), 8, backend="triton")
    (got.double() * weights.cuda()).sum().backward()
    for problem in range(28):
        leaf = x[problem].clone().requires_grad_()
        want = brute.group_infonce(leaf, groups[problem], 8, 0.07)
        (want * weights[problem]).backward()
        assert_close_scaled(got[problem], want, torch.float32, f"loss {problem}")
        assert_close_scaled(got_leaf.grad[problem], leaf.grad, torch.float32, f"grad x {problem}")


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_decoding_call_captures_in_a_cuda_graph(num_tokens):
    """What a decoding layer calls (`routed_lora_moe` without autograd, Triton backend) is sync-free: it captures
    in a CUDA graph and the replay gives the eager result."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(num_tokens, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    router = torch.randn(8, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    lora_a = torch.randn(8, 16, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    lora_b = torch.randn(8, 96, 16, device="cuda", generator=gen, dtype=torch.bfloat16)
    base = torch.randn(num_tokens, 96, device="cuda", generator=gen, dtype=torch.bfloat16)
    out = base.clone()

    def decode():
        out.copy_(base)
        return sdk.routed_lora_moe(x, router, lora_a, lora_b, 2, scaling=2.0, out=out)

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                eager = decode().clone()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode()
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)


def test_generation_under_cuda_graphs_matches_eager():
    """Greedy decoding of an adapted tiny Qwen3 on the GPU: a static cache with the forward compiled in
    `reduce-overhead` mode (CUDA graphs) gives the eager tokens."""
    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor
    from sparsedoctor_kernels.model.tiny import tiny_qwen3

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = apply_sparsedoctor(tiny_qwen3(seed=0, num_layers=2), SparseDoctorConfig(num_experts=4, top_k=2, r=4))
    model = model.cuda().eval()
    with torch.no_grad():
        for module in model.adapted_modules().values():
            module.lora_b.normal_(std=0.1)
    ids = torch.randint(0, 500, (2, 6), device="cuda")
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    eager = model.generate(input_ids=ids, **settings)
    model.forward = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    graphed = model.generate(input_ids=ids, cache_implementation="static", **settings)
    assert torch.equal(graphed, eager)


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_triton_sibling_lora_moe_on_gpu(dtype):
    """q/k/v of a Qwen3-4B layer as one group on the Triton kernels, against float64 brute force per sibling,
    gradients included, and capturable in a CUDA graph (no host synchronisation)."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, d_in, widths, num_experts, rank, top_k = 301, 2560, (4096, 1024, 1024), 8, 16, 2
    x = torch.randn(num_tokens, d_in, generator=gen, dtype=torch.float64)
    lora_a = [torch.randn(num_experts, rank, d_in, generator=gen, dtype=torch.float64) / d_in**0.5 for _ in widths]
    lora_b = [torch.randn(num_experts, w, rank, generator=gen, dtype=torch.float64) / rank**0.5 for w in widths]
    routings = [sdk.route(torch.randn(num_tokens, num_experts, generator=gen), top_k) for _ in widths]
    weights, experts = [r.weights for r in routings], [r.experts for r in routings]
    expected = [brute.lora_moe(x, a, b, w, e, 2.0) for a, b, w, e in zip(lora_a, lora_b, weights, experts)]
    cuda = torch.device("cuda")
    leaves = [t.to(cuda, dtype).requires_grad_() for t in (x, *lora_a, *lora_b)]
    gpu_x, gpu_a, gpu_b = leaves[0], leaves[1:4], leaves[4:]
    results = sdk.sibling_lora_moe(gpu_x, gpu_a, gpu_b, [w.to(cuda) for w in weights],
                                   [e.to(cuda) for e in experts], scaling=2.0, backend="triton")
    for got, want in zip(results, expected):
        assert_close_scaled(got, want, dtype, "y")
    grads = [torch.randn(want.shape, generator=gen, dtype=torch.float64) for want in expected]
    torch.autograd.backward(results, [g.to(cuda, dtype) for g in grads])
    oracle = [t.detach().requires_grad_() for t in (x, *lora_a, *lora_b)]
    ref = [brute.lora_moe(oracle[0], a, b, w, e, 2.0)
           for a, b, w, e in zip(oracle[1:4], oracle[4:], weights, experts)]
    torch.autograd.backward(ref, grads)
    for leaf, want in zip(leaves, oracle):
        assert_close_scaled(leaf.grad, want.grad, dtype, "grad")
    graph, outs = torch.cuda.CUDAGraph(), [torch.zeros(num_tokens, w, device=cuda, dtype=dtype) for w in widths]
    with torch.no_grad():
        args = (gpu_x.detach(), [a.detach() for a in gpu_a], [b.detach() for b in gpu_b],
                [w.to(cuda) for w in weights], [e.to(cuda) for e in experts])
        sdk.sibling_lora_moe(*args, scaling=2.0, outs=outs, backend="triton")  # warm: compile outside the capture
        for out in outs:
            out.zero_()
        with torch.cuda.graph(graph):
            sdk.sibling_lora_moe(*args, scaling=2.0, outs=outs, backend="triton")
        graph.replay()
    for got, want in zip(outs, expected):
        assert_close_scaled(got, want, dtype, "y from the graph")
