import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.cost import ENV_STRATEGY, STRATEGIES

import brute
from conftest import TOLERANCES, assert_close, backend_supports, cpu_backends

BACKENDS = cpu_backends("lora_moe")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(autouse=True, params=STRATEGIES)
def strategy(request, monkeypatch):
    """Every test here runs with each strategy (grouped and dense) on each backend."""
    monkeypatch.setenv(ENV_STRATEGY, request.param)
    return request.param


def isolation_only_in_grouped(strategy):
    if strategy == "dense":
        pytest.skip("the dense strategy documents that a NaN weight of an unchosen expert reaches the token")


def make_inputs(gen, num_tokens, d_in, d_out, num_experts, rank, top_k, dtype=torch.float32,
                weights_dtype=torch.float32, ids_dtype=torch.int32, unused_expert=True):
    """Random inputs; with `unused_expert` the last expert gets no token (when E > k)."""
    pool = num_experts - 1 if unused_expert and num_experts > top_k else num_experts
    experts = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, top_k, dtype=torch.long)
    f64 = dict(generator=gen, dtype=torch.float64)
    return dict(
        x=torch.randn(num_tokens, d_in, **f64).to(dtype),
        lora_a=(torch.randn(num_experts, rank, d_in, **f64) / d_in**0.5).to(dtype),
        lora_b=(torch.randn(num_experts, d_out, rank, **f64) / rank**0.5).to(dtype),
        weights=torch.rand(num_tokens, top_k, **f64).to(weights_dtype),
        experts=experts.to(ids_dtype),
    )


def run_and_compare(inputs, gen, scaling=1.5, with_out=False, backend="torch"):
    names = ("x", "lora_a", "lora_b", "weights")
    leaves = {n: inputs[n].clone().requires_grad_() for n in names}
    oracle = {n: inputs[n].double().requires_grad_() for n in names}
    num_tokens, d_out = inputs["x"].shape[0], inputs["lora_b"].shape[1]
    dtype = inputs["x"].dtype
    if with_out:
        base_in = torch.randn(num_tokens, d_out, generator=gen, dtype=torch.float64)
        base_leaf = base_in.to(dtype).requires_grad_()
        out = base_leaf * 2  # produced by an op, as a frozen layer's output would be
        result = sdk.lora_moe(**leaves, experts=inputs["experts"], scaling=scaling, out=out, backend=backend)
        assert result is out
        oracle["base"] = base_leaf.detach().double().requires_grad_()
        expected = brute.lora_moe(**{n: oracle[n] for n in names}, experts=inputs["experts"], scaling=scaling)
        expected = expected + 2 * oracle["base"]
    else:
        result = sdk.lora_moe(**leaves, experts=inputs["experts"], scaling=scaling, backend=backend)
        expected = brute.lora_moe(**oracle, experts=inputs["experts"], scaling=scaling)
    assert result.dtype == dtype and result.shape == (num_tokens, d_out)
    assert_close(result, expected, dtype, name="y")

    # Representable in x's dtype: the gradient enters the backward exactly, the oracle sees the same one.
    grad_y = torch.randn(num_tokens, d_out, generator=gen, dtype=torch.float64).to(dtype).double()
    (result.double() * grad_y).sum().backward()
    (expected * grad_y).sum().backward()
    for n in names:
        assert leaves[n].grad.dtype == leaves[n].dtype, n
        # The upstream gradient enters in x's dtype and each gradient leaves in its input's: the coarser rules.
        coarser = max((dtype, leaves[n].dtype), key=lambda d: TOLERANCES[d][0])
        assert_close(leaves[n].grad, oracle[n].grad, coarser, scale=2.0, name=f"grad {n}")
    if with_out:
        assert_close(base_leaf.grad, oracle["base"].grad, dtype, name="grad through out")
    return leaves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_out", [False, True])
# (T, d_in, d_out, E, r, k): odd sizes, 1s everywhere, k = E, E = 64 with k = 8, and sizes that cross the
# Triton kernels' tiles (more than 64 pairs of one expert, d_in and d_out over 64, r over 64).
@pytest.mark.parametrize("shape", [(29, 24, 19, 5, 3, 2), (1, 1, 1, 1, 1, 1), (17, 33, 7, 4, 1, 4),
                                   pytest.param((40, 16, 48, 64, 8, 8), marks=pytest.mark.slow),
                                   (150, 70, 67, 3, 5, 2), (9, 13, 11, 2, 67, 1)])
def test_lora_moe_matches_brute_force(shape, with_out, dtype, backend, gen):
    if not backend_supports(backend, dtype):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    inputs = make_inputs(gen, *shape, dtype=dtype)
    run_and_compare(inputs, gen, with_out=with_out, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_without_tokens_gets_exactly_zero_gradient(backend, gen):
    inputs = make_inputs(gen, 21, 10, 9, 6, 4, 2, unused_expert=True)
    leaves = run_and_compare(inputs, gen, backend=backend)
    assert not (inputs["experts"] == 5).any()
    assert torch.count_nonzero(leaves["lora_a"].grad[5]) == 0
    assert torch.count_nonzero(leaves["lora_b"].grad[5]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_weights_of_an_unused_expert_change_nothing(backend, gen, strategy):
    """The contract selects each token's experts: an expert nobody chose cannot reach any output or gradient,
    NaN/inf weights included (a dense product with zero gates would make every row NaN)."""
    isolation_only_in_grouped(strategy)
    inputs = make_inputs(gen, 23, 10, 9, 6, 4, 2, unused_expert=True)
    inputs["lora_a"][5, 1, 3] = float("nan")
    inputs["lora_b"][5, 2, 0] = float("inf")
    leaves = run_and_compare(inputs, gen, backend=backend)
    for name in ("x", "lora_a", "lora_b", "weights"):
        assert leaves[name].grad.isfinite().all(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_expert_reaches_only_the_tokens_that_chose_it(backend, gen, strategy):
    isolation_only_in_grouped(strategy)
    inputs = make_inputs(gen, 31, 12, 7, 5, 3, 2, unused_expert=False)
    sick = 2
    inputs["lora_a"][sick, 0, 4] = float("nan")
    inputs["lora_b"][sick, 3, 1] = float("nan")
    leaves = {n: inputs[n].clone().requires_grad_() for n in ("x", "lora_a", "lora_b", "weights")}
    y = sdk.lora_moe(**leaves, experts=inputs["experts"], scaling=0.5, backend=backend)
    (y * torch.randn(y.shape, generator=gen)).sum().backward()
    touched = (inputs["experts"] == sick).any(1)
    assert touched.any() and not touched.all()
    assert y[touched].isnan().any(1).all() and y[~touched].isfinite().all()
    assert leaves["x"].grad[~touched].isfinite().all()
    assert leaves["weights"].grad[~touched].isfinite().all()
    healthy = [e for e in range(5) if e != sick]
    for name in ("lora_a", "lora_b"):
        # Another expert's gradient sums over its own tokens; those that also chose the sick expert bring
        # finite u and x, so it stays finite.
        assert leaves[name].grad[healthy].isfinite().all(), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_sharing_memory_with_an_input_is_refused(backend, gen):
    """`out=x` would overwrite x while it is read and saved for the backward (a wrong lora_a gradient)."""
    inputs = make_inputs(gen, 9, 6, 6, 3, 2, 2)
    window = torch.randn(100, generator=gen)
    cases = [(inputs, inputs["x"]), (inputs, inputs["x"][:, :]),
             (dict(inputs, x=window[:54].view(9, 6)), window[30:84].view(9, 6))]  # overlapping windows
    for args, out in cases:
        with pytest.raises(ValueError, match="out shares memory with x"):
            sdk.lora_moe(**args, out=out, backend=backend)
    shared = torch.from_numpy(inputs["x"].numpy())  # another storage object over the same bytes
    with pytest.raises(ValueError, match="out shares memory with x"):
        sdk.lora_moe(**inputs, out=shared, backend=backend)
    packed = torch.randn(100, generator=gen)
    with pytest.raises(ValueError, match="out shares memory with lora_b"):
        sdk.lora_moe(**dict(inputs, lora_b=packed[:36].view(3, 6, 2)), out=packed[30:84].view(9, 6), backend=backend)
    with pytest.raises(ValueError, match="out has overlapping elements"):
        sdk.lora_moe(**inputs, out=torch.zeros(1, 6).expand(9, 6), backend=backend)
    # Disjoint parts of one buffer are fine, and so is an x the op copies to make it contiguous.
    buffer = torch.zeros(2, 9, 6)
    buffer[0] = inputs["x"]
    sdk.lora_moe(**dict(inputs, x=buffer[0]), out=buffer[1], backend=backend)
    assert_close(buffer[1], brute.lora_moe(**inputs), torch.float32)
    interleaved = torch.zeros(9, 12)
    interleaved[:, :6] = inputs["x"]
    sdk.lora_moe(**dict(inputs, x=interleaved[:, :6]), out=interleaved[:, 6:], backend=backend)
    assert_close(interleaved[:, 6:], brute.lora_moe(**inputs), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row_strided", "both"])
def test_out_with_any_strides(layout, backend, gen):
    """A transposed or strided `out` gets exactly the delta, in its own elements only, with gradients."""
    inputs = make_inputs(gen, 13, 8, 7, 4, 3, 2)
    shape = {"transposed": (7, 13), "row_strided": (13, 20), "both": (20, 13)}[layout]
    buffer = torch.full(shape, float("nan"))  # elements outside the view must stay NaN
    view = {"transposed": lambda b: b.T, "row_strided": lambda b: b[:, 5:12], "both": lambda b: b[3:10].T}[layout]
    out = view(buffer)
    assert out.shape == (13, 7) and not out.is_contiguous()
    base_leaf = torch.randn(13, 7, generator=gen).requires_grad_()
    out.copy_(base_leaf * 2)  # produced by an op, so the gradient must flow through out
    leaves = {n: inputs[n].clone().requires_grad_() for n in ("x", "lora_a", "lora_b", "weights")}
    result = sdk.lora_moe(**leaves, experts=inputs["experts"], scaling=1.5, out=out, backend=backend)
    assert result is out
    oracle = {n: inputs[n].double().requires_grad_() for n in leaves}
    expected = 2 * base_leaf.detach().double() + brute.lora_moe(**oracle, experts=inputs["experts"], scaling=1.5)
    assert_close(out, expected, torch.float32, name=f"out ({layout})")
    outside = torch.ones(shape, dtype=torch.bool)
    view(outside).fill_(False)
    assert buffer[outside].isnan().all()
    grad_y = torch.randn(13, 7, generator=gen, dtype=torch.float64)
    (out.double() * grad_y).sum().backward()
    (expected * grad_y).sum().backward()
    assert_close(base_leaf.grad, 2 * grad_y, torch.float32, name="grad through out")
    for n in leaves:
        assert_close(leaves[n].grad, oracle[n].grad, torch.float32, scale=2.0, name=f"grad {n}")


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weights_in_x_dtype", [False, True])
def test_lora_moe_accepts_id_and_weight_dtypes(ids_dtype, weights_in_x_dtype, gen):
    dtype = torch.bfloat16
    inputs = make_inputs(gen, 11, 8, 6, 3, 2, 2, dtype=dtype, ids_dtype=ids_dtype,
                         weights_dtype=dtype if weights_in_x_dtype else torch.float32)
    run_and_compare(inputs, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_out", [False, True])
def test_lora_moe_empty_input(with_out, backend, gen):
    inputs = make_inputs(gen, 0, 8, 6, 3, 2, 2)
    leaves = run_and_compare(inputs, gen, with_out=with_out, backend=backend)
    assert leaves["x"].grad.shape == (0, 8)
    assert torch.count_nonzero(leaves["lora_a"].grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_lora_moe_gradcheck(backend, gen):
    inputs = make_inputs(gen, 5, 4, 3, 3, 2, 2, dtype=torch.float64, weights_dtype=torch.float64)
    tensors = tuple(inputs[n].requires_grad_() for n in ("x", "lora_a", "lora_b", "weights"))
    options = dict(scaling=0.7, backend=backend)
    fast = backend == "triton"  # the interpreter pays per launch: random projections instead of every column
    assert torch.autograd.gradcheck(lambda *t: sdk.lora_moe(*t, inputs["experts"], **options), tensors,
                                    fast_mode=fast)
    base = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda b, *t: sdk.lora_moe(*t, inputs["experts"], out=b * 1.0, **options), (base, *tensors), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_moe_duplicate_expert_in_one_token_adds_up(backend, gen):
    inputs = make_inputs(gen, 6, 5, 4, 3, 2, 3)
    inputs["experts"][:, 1] = inputs["experts"][:, 0]
    run_and_compare(inputs, gen, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_moe_is_bitwise_deterministic(backend, gen):
    """Same inputs, same bits: output and every gradient (no float atomics in any backend)."""
    inputs = make_inputs(gen, 131, 20, 18, 4, 6, 3)
    runs = []
    for _ in range(2):
        leaves = {n: inputs[n].clone().requires_grad_() for n in ("x", "lora_a", "lora_b", "weights")}
        y = sdk.lora_moe(**leaves, experts=inputs["experts"], scaling=0.5, backend=backend)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        runs.append([y.detach()] + [leaves[n].grad for n in leaves])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_contribute_nothing_without_validation(backend, gen):
    inputs = make_inputs(gen, 9, 6, 5, 4, 2, 2)
    inputs["experts"][0, 0] = -1
    inputs["experts"][3, 1] = 4
    inputs["experts"][5, 0] = 1000
    inputs["experts"][7, :] = -5  # a token with no valid expert at all
    leaves = {n: inputs[n].clone().requires_grad_() for n in ("x", "lora_a", "lora_b", "weights")}
    y = sdk.lora_moe(**leaves, experts=inputs["experts"], validate=False, backend=backend)
    assert_close(y, brute.lora_moe(**inputs), torch.float32)
    assert torch.count_nonzero(y[7]) == 0
    y.sum().backward()
    assert leaves["weights"].grad[0, 0] == 0 and leaves["weights"].grad[3, 1] == 0
    assert torch.count_nonzero(leaves["x"].grad[7]) == 0 and torch.count_nonzero(leaves["weights"].grad[7]) == 0
    with pytest.raises(ValueError, match=r"experts holds expert id -5, outside \[0, 4\)"):
        sdk.lora_moe(**inputs, validate=True, backend=backend)
    with pytest.raises(ValueError, match="outside"):
        sdk.lora_moe(**inputs, backend=backend)  # validate defaults to True on CPU


@settings(max_examples=30, deadline=None)
@given(num_tokens=st.integers(0, 12), d_in=st.integers(1, 9), d_out=st.integers(1, 9),
       num_experts=st.integers(1, 6), rank=st.integers(1, 5), data=st.data(), seed=st.integers(0, 2**31 - 1),
       with_out=st.booleans(), backend=st.sampled_from(BACKENDS))
@pytest.mark.slow
def test_lora_moe_property(num_tokens, d_in, d_out, num_experts, rank, data, seed, with_out, backend):
    top_k = data.draw(st.integers(1, num_experts))
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs(gen, num_tokens, d_in, d_out, num_experts, rank, top_k,
                         unused_expert=data.draw(st.booleans()))
    run_and_compare(inputs, gen, scaling=data.draw(st.floats(0.1, 4.0)), with_out=with_out, backend=backend)


def _bad(**overrides):
    args = dict(x=torch.zeros(4, 6), lora_a=torch.zeros(3, 2, 6), lora_b=torch.zeros(3, 5, 2),
                weights=torch.zeros(4, 2), experts=torch.zeros(4, 2, dtype=torch.int32))
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(x=torch.zeros(4, 6, dtype=torch.int32)), TypeError, "x must have dtype"),
        (dict(x=torch.zeros(4)), ValueError, r"x must have shape \[T, d_in\]"),
        (dict(lora_a=torch.zeros(3, 2, 7)), ValueError, r"lora_a must have shape \[E, r, d_in=6\]"),
        (dict(lora_a=torch.zeros(3, 2, 6, dtype=torch.float64)), TypeError, "lora_a must have dtype float32"),
        (dict(lora_b=torch.zeros(3, 5, 3)), ValueError, r"lora_b must have shape \[E=3, d_out, r=2\]"),
        (dict(lora_b=torch.zeros(2, 5, 2)), ValueError, r"lora_b must have shape \[E=3, d_out, r=2\]"),
        (dict(experts=torch.zeros(4, 2)), TypeError, "experts must have dtype int32, int64"),
        (dict(experts=torch.zeros(5, 2, dtype=torch.int64)), ValueError, r"experts must have shape \[T=4, k\]"),
        (dict(weights=torch.zeros(4, 3)), ValueError, r"weights must have shape \[T=4, k=2\]"),
        (dict(weights=torch.zeros(4, 2, dtype=torch.float16)), TypeError, "weights must have dtype float32"),
        (dict(scaling="2"), TypeError, "scaling must be a Python float"),
        (dict(out=torch.zeros(4, 4)), ValueError, r"out must have shape \[T=4, d_out=5\]"),
        (dict(out=torch.zeros(4, 5, dtype=torch.float64)), TypeError, "out must have dtype float32"),
        (dict(lora_a=torch.zeros(3, 0, 6), lora_b=torch.zeros(3, 5, 0)), ValueError, "rank r >= 1"),
        (dict(x=torch.zeros(4, 6, device="meta")), ValueError, "must be on the same device as x"),
    ],
)
def test_lora_moe_rejects_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        sdk.lora_moe(**_bad(**overrides))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_moe_custom_ops_pass_opcheck(backend, gen, strategy):
    """Schema, fake (meta) implementations and autograd registration agree with the real kernels."""
    module = importlib.import_module("sparsedoctor_kernels.ops.lora_moe")  # the package re-exports the function

    inputs = make_inputs(gen, 7, 5, 4, 3, 2, 2)
    args = (inputs["x"], inputs["lora_a"], inputs["lora_b"], inputs["weights"], inputs["experts"], 0.5)
    torch.library.opcheck(module._lora_moe_forward, (*args, backend, strategy),
                          test_utils=("test_schema", "test_faketensor"))
    out = torch.randn(7, 4, generator=gen)
    torch.library.opcheck(module._lora_moe_forward_into, (*args, out, backend, strategy),
                          test_utils=("test_schema", "test_faketensor"))
    _, h, plan = module._lora_moe_forward(*args, backend, strategy)
    grad_y = torch.randn(7, 4, generator=gen)
    torch.library.opcheck(module._lora_moe_backward, (grad_y, *args[:5], h, plan, 0.5, backend, strategy),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
# (T, d_in, d_out, E, r, k): decoding (T * k <= E: the pairs one by one on the torch backend), a few tokens
# around that bound, and a batch.
@pytest.mark.parametrize("shape", [(1, 24, 19, 8, 3, 2), (3, 13, 11, 7, 5, 2), (4, 9, 10, 7, 2, 2),
                                   (29, 24, 19, 5, 3, 2)])
def test_calls_without_autograd_match_brute_force(shape, dtype, backend, gen):
    """Under no_grad the op skips its custom op and autograd Function (and, on the torch backend, decodes
    pair by pair): the same function, into `out` or fresh, ids outside [0, E) adding nothing."""
    if not backend_supports(backend, dtype):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    inputs = make_inputs(gen, *shape, dtype=dtype)
    inputs["experts"][0, -1] = -1  # one pair with no expert
    expected = brute.lora_moe(**inputs, scaling=1.5)
    base = torch.randn(shape[0], shape[2], generator=gen, dtype=torch.float64)
    with torch.no_grad():
        fresh = sdk.lora_moe(**inputs, scaling=1.5, backend=backend, validate=False)
        out = base.to(dtype, copy=True)
        into = sdk.lora_moe(**inputs, scaling=1.5, out=out, backend=backend, validate=False)
    assert into is out and fresh.dtype == dtype and fresh.grad_fn is None
    assert_close(fresh, expected, dtype, name="y")
    assert_close(into, expected + base, dtype, name="out + y")
