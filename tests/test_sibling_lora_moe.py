"""sibling_lora_moe: S sibling projections' experts from one pass over x, checked against float64 brute force
per sibling (outputs and every gradient), and bit for bit against lora_moe's dense strategy on the torch backend."""

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.cost import ENV_STRATEGY

import brute
from conftest import assert_close, backend_supports, cpu_backends

BACKENDS = cpu_backends("sibling_lora_moe")


def make_siblings(gen, num_tokens, d_in, d_outs, num_experts, rank, top_k, dtype=torch.float32, unused_expert=True):
    """x and per-sibling (lora_a, lora_b, weights, experts); with `unused_expert` each sibling's last expert gets
    no token."""
    f64 = dict(generator=gen, dtype=torch.float64)
    pool = num_experts - 1 if unused_expert and num_experts > top_k else num_experts
    siblings = []
    for d_out in d_outs:
        experts = (torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(num_tokens)])
                   if num_tokens else torch.zeros(0, top_k, dtype=torch.long))
        siblings.append(dict(lora_a=(torch.randn(num_experts, rank, d_in, **f64) / d_in**0.5).to(dtype),
                             lora_b=(torch.randn(num_experts, d_out, rank, **f64) / rank**0.5).to(dtype),
                             weights=torch.rand(num_tokens, top_k, **f64).to(
                                 dtype if dtype == torch.float64 else torch.float32),
                             experts=experts.to(torch.int32)))
    return torch.randn(num_tokens, d_in, **f64).to(dtype), siblings


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def run_and_compare(x, siblings, gen, backend, dtype, with_outs=True, scaling=1.5):
    names = ("lora_a", "lora_b", "weights")
    leaves = {n: _leaves([s[n] for s in siblings]) for n in names}
    x_leaf = x.clone().requires_grad_()
    num_tokens = x.shape[0]
    bases = [torch.randn(num_tokens, s["lora_b"].shape[1], generator=gen, dtype=torch.float64) for s in siblings]
    base_leaves = [b.to(dtype).requires_grad_() for b in bases]
    outs = [b * 2 for b in base_leaves] if with_outs else None  # produced by an op, as frozen outputs are
    results = sdk.sibling_lora_moe(x_leaf, leaves["lora_a"], leaves["lora_b"], leaves["weights"],
                                   [s["experts"] for s in siblings], scaling=scaling, outs=outs, backend=backend)
    assert len(results) == len(siblings)
    if with_outs:
        assert all(r is o for r, o in zip(results, outs))
    x64 = x.double().requires_grad_()
    oracle = {n: [t.detach().double().requires_grad_() for t in leaves[n]] for n in names}
    base64 = [b.detach().double().requires_grad_() for b in base_leaves]
    expected = [brute.lora_moe(x64, a, b, w, s["experts"], scaling)
                for a, b, w, s in zip(oracle["lora_a"], oracle["lora_b"], oracle["weights"], siblings)]
    if with_outs:
        expected = [e + 2 * b for e, b in zip(expected, base64)]
    grads = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in expected]
    for i, (got, want) in enumerate(zip(results, expected)):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(got, want, dtype, name=f"y[{i}]")
    torch.autograd.backward(list(results), [g.to(dtype) for g in grads])
    torch.autograd.backward(expected, grads)
    scale = len(siblings) * max(1, x.shape[1] // 16)
    assert_close(x_leaf.grad, x64.grad, dtype, scale=scale, name="grad x")
    for n in names:
        for i, (leaf, ref) in enumerate(zip(leaves[n], oracle[n])):
            assert_close(leaf.grad, ref.grad, dtype, scale=max(1, num_tokens // 8), name=f"grad {n}[{i}]")
    if with_outs:
        for leaf, ref in zip(base_leaves, base64):
            assert_close(leaf.grad, ref.grad, dtype, name="grad of an out's producer")
    return leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    # T, d_in, d_outs (q/k/v-like: one wider sibling), E, r, k; odd sizes, and one sibling
    (23, 19, (17, 7, 7), 5, 3, 2),
    (9, 33, (29, 29), 4, 2, 3),
    (5, 8, (3,), 3, 1, 1),
    (21, 9, (70, 130, 3), 3, 2, 2),  # outputs of several column blocks (64 each on Triton) in one expand
    (11, 10, (6, 5, 4, 3), 3, 2, 2),  # more siblings than one expand launch takes
])
def test_matches_brute_force_per_sibling(gen, backend, dtype, shape):
    if not backend_supports(backend, dtype):
        pytest.skip("the Triton interpreter has no bfloat16")
    num_tokens, d_in, d_outs, num_experts, rank, top_k = shape
    x, siblings = make_siblings(gen, num_tokens, d_in, d_outs, num_experts, rank, top_k, dtype)
    leaves = run_and_compare(x, siblings, gen, backend, dtype)
    if num_experts > top_k:  # the unused last expert of each sibling gets exactly zero gradient
        for a, b in zip(leaves["lora_a"], leaves["lora_b"]):
            assert torch.count_nonzero(a.grad[-1]) == 0 and torch.count_nonzero(b.grad[-1]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_results_without_outs(gen, backend):
    x, siblings = make_siblings(gen, 11, 13, (6, 4), 4, 2, 2)
    run_and_compare(x, siblings, gen, backend, torch.float32, with_outs=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(gen, backend):
    x, siblings = make_siblings(gen, 0, 6, (5, 3), 3, 2, 2)
    x = x.requires_grad_()
    a = _leaves([s["lora_a"] for s in siblings])
    results = sdk.sibling_lora_moe(x, a, [s["lora_b"] for s in siblings], [s["weights"] for s in siblings],
                                   [s["experts"] for s in siblings], backend=backend)
    assert [tuple(r.shape) for r in results] == [(0, 5), (0, 3)]
    sum(r.sum() for r in results).backward()
    assert all(torch.count_nonzero(leaf.grad) == 0 for leaf in a)


def test_each_output_is_lora_moe_dense_bit_for_bit(gen, monkeypatch):
    """On the torch backend the shared pass changes no output bit: a column block of the stacked shrink is the
    sibling's own shrink, and its expand is lora_moe's."""
    monkeypatch.setenv(ENV_STRATEGY, "dense")
    x, siblings = make_siblings(gen, 40, 48, (48, 16, 16), 8, 4, 2)
    outs = [torch.randn(40, s["lora_b"].shape[1], generator=gen) for s in siblings]
    alone = [sdk.lora_moe(x, s["lora_a"], s["lora_b"], s["weights"], s["experts"], scaling=0.5, out=o.clone())
             for s, o in zip(siblings, outs)]
    together = sdk.sibling_lora_moe(x, [s["lora_a"] for s in siblings], [s["lora_b"] for s in siblings],
                                    [s["weights"] for s in siblings], [s["experts"] for s in siblings], scaling=0.5,
                                    outs=[o.clone() for o in outs])
    for got, want in zip(together, alone):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_strategy_and_no_grad_calls_agree(gen, backend, monkeypatch):
    x, siblings = make_siblings(gen, 17, 12, (10, 5), 6, 2, 2)
    args = (x, [s["lora_a"] for s in siblings], [s["lora_b"] for s in siblings], [s["weights"] for s in siblings],
            [s["experts"] for s in siblings])
    expected = [brute.lora_moe(x, s["lora_a"], s["lora_b"], s["weights"], s["experts"], 2.0) for s in siblings]
    for strategy in ("grouped", "dense"):
        with torch.no_grad():
            results = sdk.sibling_lora_moe(*args, scaling=2.0, backend=backend, strategy=strategy)
        for got, want in zip(results, expected):
            assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ids_out_of_range(gen, backend):
    """An id outside [0, E) adds nothing (it never selects another sibling's expert in the stacked columns);
    validate=True raises for it."""
    x, siblings = make_siblings(gen, 7, 9, (5, 5), 3, 2, 2)
    siblings[0]["experts"][0, 0] = 3  # would be sibling 1's expert 0 in the stacked layout
    siblings[1]["experts"][2, 1] = -1
    args = (x, [s["lora_a"] for s in siblings], [s["lora_b"] for s in siblings], [s["weights"] for s in siblings],
            [s["experts"] for s in siblings])
    with pytest.raises(ValueError, match=r"experts\[0\]"):
        sdk.sibling_lora_moe(*args, backend=backend, validate=True)
    results = sdk.sibling_lora_moe(*args, backend=backend, validate=False, strategy="dense")
    for got, s in zip(results, siblings):
        assert_close(got, brute.lora_moe(x, s["lora_a"], s["lora_b"], s["weights"], s["experts"]), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_token_stays_in_its_own_rows(gen, backend):
    """A NaN or inf in one token's input reaches that token's outputs (of every sibling) and no other row: the
    shared shrink mixes siblings, never tokens. Every other row matches brute force."""
    x, siblings = make_siblings(gen, 9, 10, (6, 4), 4, 2, 2)
    x[3, 2], x[6, 0] = float("nan"), float("inf")
    results = sdk.sibling_lora_moe(x, [s["lora_a"] for s in siblings], [s["lora_b"] for s in siblings],
                                   [s["weights"] for s in siblings], [s["experts"] for s in siblings],
                                   backend=backend, strategy="dense")
    finite_rows = [t for t in range(9) if t not in (3, 6)]
    for got, s in zip(results, siblings):
        assert not torch.isfinite(got[3]).any() and not torch.isfinite(got[6]).any()
        want = brute.lora_moe(x[finite_rows], s["lora_a"], s["lora_b"], s["weights"][finite_rows],
                              s["experts"][finite_rows])
        assert_close(got[finite_rows], want, torch.float32)


def test_bad_arguments_are_named(gen):
    x, siblings = make_siblings(gen, 4, 6, (5, 3), 3, 2, 2)
    a, b = [s["lora_a"] for s in siblings], [s["lora_b"] for s in siblings]
    w, e = [s["weights"] for s in siblings], [s["experts"] for s in siblings]
    with pytest.raises(TypeError, match="lora_a must be a list"):
        sdk.sibling_lora_moe(x, a[0], b, w, e)
    with pytest.raises(ValueError, match="at least one sibling"):
        sdk.sibling_lora_moe(x, [], [], [], [])
    with pytest.raises(ValueError, match=r"lora_b must have one tensor per sibling \(2\), got 1"):
        sdk.sibling_lora_moe(x, a, b[:1], w, e)
    with pytest.raises(ValueError, match="siblings must share E, r and k"):
        sdk.sibling_lora_moe(x, [a[0], a[1][:2]], [b[0], b[1][:2]], w, e)
    with pytest.raises(ValueError, match="lora_b"):
        sdk.sibling_lora_moe(x, a, [b[0], b[1][:, :, :1]], w, e)
    with pytest.raises(ValueError, match="out"):
        sdk.sibling_lora_moe(x, a, b, w, e, outs=[torch.zeros(4, 5), torch.zeros(4, 4)])
    with pytest.raises(ValueError, match=r"outs\[0\] shares memory with x"):
        sdk.sibling_lora_moe(x, a, b, w, e, outs=[x[:, :5], torch.zeros(4, 3)])
    with pytest.raises(ValueError, match=r"outs\[1\] has overlapping elements"):
        sdk.sibling_lora_moe(x, a, b, w, e, outs=[torch.zeros(4, 5), torch.zeros(1, 3).expand(4, 3)])


@pytest.mark.slow
def test_fullgraph_compile_matches_eager(gen):
    torch._dynamo.reset()
    x, siblings = make_siblings(gen, 13, 8, (7, 3), 4, 3, 2)
    params = [t.requires_grad_() for s in siblings for t in (s["lora_a"], s["lora_b"])]
    routers = [torch.randn(4, 8, generator=gen) for _ in siblings]

    def layer(x, a0, b0, a1, b1):
        routings = [sdk.route(x @ r.T, 2) for r in routers]
        outs = [x @ torch.ones(8, b.shape[1]) for b in (b0, b1)]
        ys = sdk.sibling_lora_moe(x, [a0, a1], [b0, b1], [r.weights for r in routings],
                                  [r.experts for r in routings], scaling=2.0, outs=outs)
        return sum(y.square().mean() for y in ys)

    eager = layer(x, *params)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, *params)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(torch.autograd.grad(compiled, params), eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
