"""torch.compile(fullgraph=True) traces every op (torch backend, CPU) and matches eager, gradients included."""

import pytest
import torch

import sparsedoctor_kernels as sdk

from conftest import cpu_backends


def moe_layer(x, router, lora_a, lora_b, base_weight, queue, proj):
    routing = sdk.route(x @ router.T, 2)
    out = x @ base_weight.T
    y = sdk.lora_moe(x, lora_a, lora_b, routing.weights, routing.experts, scaling=2.0, out=out)
    views = y @ proj
    contrastive = sdk.infonce_queue_loss(views, views.tanh(), queue, routing.experts[:, 0].long())
    return y.square().mean() + sdk.load_balance_loss(routing) + contrastive


def enqueue_step(queue, keys, experts):
    queue.enqueue(keys, experts)
    return queue.keys.sum()


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(13, 8, generator=gen)
    params = [torch.randn(5, 8, generator=gen), torch.randn(5, 3, 8, generator=gen) / 3,
              torch.randn(5, 7, 3, generator=gen) / 2, torch.randn(7, 8, generator=gen)]
    queue = sdk.ExpertQueue(5, 4, 6)
    queue.enqueue(torch.randn(12, 6, generator=gen), torch.randint(0, 5, (12,), generator=gen))
    proj = torch.randn(7, 6, generator=gen)
    return x, [p.requires_grad_() for p in params], queue, proj


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.slow
def test_fullgraph_compile_matches_eager(compiler):
    torch._dynamo.reset()
    x, params, queue, proj = _inputs()
    eager = moe_layer(x, *params, queue, proj)
    eager_grads = torch.autograd.grad(eager, params)
    compiled_fn = torch.compile(moe_layer, fullgraph=True, backend=compiler)
    compiled = compiled_fn(x, *params, queue, proj)
    compiled_grads = torch.autograd.grad(compiled, params)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fullgraph_compile_of_enqueue():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    eager_queue, compiled_queue = sdk.ExpertQueue(3, 4, 2), sdk.ExpertQueue(3, 4, 2)
    compiled_step = torch.compile(enqueue_step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        keys, experts = torch.randn(7, 2, generator=gen), torch.randint(0, 3, (7,), generator=gen)
        enqueue_step(eager_queue, keys, experts)
        compiled_step(compiled_queue, keys, experts)
    for name in ("keys", "ptr", "size"):
        assert torch.equal(getattr(compiled_queue, name), getattr(eager_queue, name))


def routed_lora(x, router, lora_a, lora_b, base_weight, backend):
    routing = sdk.route(x @ router.T, 2, backend=backend)
    out = x @ base_weight.T
    y = sdk.lora_moe(x, lora_a, lora_b, routing.weights, routing.experts, scaling=2.0, out=out, backend=backend)
    return y.square().mean() + sdk.load_balance_loss(routing)


@pytest.mark.parametrize("backend", cpu_backends("lora_moe"))
def test_fullgraph_compile_of_route_and_lora_moe_per_backend(backend):
    """The Triton ops' fake implementations (plan sizes included) trace like the reference's."""
    torch._dynamo.reset()
    x, params, _, _ = _inputs(seed=2)
    eager = routed_lora(x, *params, backend)
    eager_grads = torch.autograd.grad(eager, params)
    compiled_fn = torch.compile(routed_lora, fullgraph=True, backend="aot_eager")
    compiled = compiled_fn(x, *params, backend)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, params), eager_grads):
        torch.testing.assert_close(got, want)
