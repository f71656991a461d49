"""`lora_moe(..., regate=(rows, weights2, experts2))`: some rows again under other gates, from the same call.

Checked against the float64 brute force of a second call on x[rows] (rows outside [0, T) give zero rows),
forward and every gradient, on each backend and strategy."""

import importlib
import os

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.cost import ENV_STRATEGY, STRATEGIES

import brute
from conftest import TOLERANCES, assert_close, backend_supports, cpu_backends

BACKENDS = cpu_backends("lora_moe")
NAMES = ("x", "lora_a", "lora_b", "weights", "rows_weights")


@pytest.fixture(autouse=True, params=STRATEGIES)
def strategy(request, monkeypatch):
    monkeypatch.setenv(ENV_STRATEGY, request.param)
    return request.param


def make_inputs(gen, num_tokens, d_in, d_out, num_experts, rank, top_k, num_rows, rows_top_k, dtype=torch.float32):
    f64 = dict(generator=gen, dtype=torch.float64)
    pool = num_experts - 1 if num_experts > top_k else num_experts  # the last expert gets no token
    experts = torch.stack([torch.randperm(pool, generator=gen)[:top_k] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, top_k, dtype=torch.long)
    rows = torch.randint(0, max(num_tokens, 1), (num_rows,), generator=gen)
    if num_rows > 2:
        rows[1] = rows[0]  # a row twice (the model regates each picked token twice)
    return dict(
        x=torch.randn(num_tokens, d_in, **f64).to(dtype),
        lora_a=(torch.randn(num_experts, rank, d_in, **f64) / d_in**0.5).to(dtype),
        lora_b=(torch.randn(num_experts, d_out, rank, **f64) / rank**0.5).to(dtype),
        weights=torch.rand(num_tokens, top_k, **f64).float(),
        experts=experts.int(),
        rows=rows if num_tokens else torch.zeros(num_rows, dtype=torch.long),
        rows_weights=torch.rand(num_rows, rows_top_k, **f64).float(),
        rows_experts=torch.randint(0, num_experts, (num_rows, rows_top_k), generator=gen),
    )


def oracle_rows(x, lora_a, lora_b, rows_weights, rows, rows_experts, scaling):
    """The regated rows as a plain second call on x[rows]: what `regate` promises."""
    num_tokens = x.shape[0]
    valid = (rows >= 0) & (rows < num_tokens)
    if num_tokens == 0:
        return x.new_zeros(rows.shape[0], lora_b.shape[1]) + 0 * (lora_a.sum() + lora_b.sum() + rows_weights.sum())
    experts = torch.where(valid[:, None], rows_experts, -1)
    return brute.lora_moe(x[torch.where(valid, rows, 0)], lora_a, lora_b, rows_weights, experts, scaling)


def out_of_layout(base_leaf, layout):
    """`out` as the layer passes it (True: a fresh tensor), or a view: transposed storage, or the first columns
    of a wider buffer whose other columns hold 7."""
    if layout is True:
        return base_leaf * 1
    if layout == "transposed":
        return (base_leaf.T * 1).T
    wide = torch.cat([base_leaf * 1, torch.full_like(base_leaf[:, :3], 7.0)], dim=1)
    return wide[:, :base_leaf.shape[1]]


def run_and_compare(inputs, gen, backend, with_out, scaling=1.5, validate=None):
    dtype = inputs["x"].dtype
    leaves = {n: inputs[n].clone().requires_grad_() for n in NAMES}
    oracle = {n: inputs[n].double().requires_grad_() for n in NAMES}
    num_tokens, d_out = inputs["x"].shape[0], inputs["lora_b"].shape[1]
    base = torch.randn(num_tokens, d_out, generator=gen, dtype=torch.float64).to(dtype)
    base_leaf = base.clone().requires_grad_()
    out = out_of_layout(base_leaf, with_out) if with_out else None
    regate = (inputs["rows"], leaves["rows_weights"], inputs["rows_experts"])
    y, y_rows = sdk.lora_moe(leaves["x"], leaves["lora_a"], leaves["lora_b"], leaves["weights"], inputs["experts"],
                             scaling=scaling, out=out, regate=regate, backend=backend, validate=validate)
    if with_out:
        assert y is out
    expected = brute.lora_moe(oracle["x"], oracle["lora_a"], oracle["lora_b"], oracle["weights"], inputs["experts"],
                              scaling)
    base_oracle = base.double().requires_grad_()
    if with_out:
        expected = expected + base_oracle
    expected_rows = oracle_rows(oracle["x"], oracle["lora_a"], oracle["lora_b"], oracle["rows_weights"],
                                inputs["rows"], inputs["rows_experts"], scaling)
    assert y.dtype == y_rows.dtype == dtype and y_rows.shape == (inputs["rows"].shape[0], d_out)
    assert_close(y, expected, dtype, name="y")
    assert_close(y_rows, expected_rows, dtype, name="regated rows")

    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    grad_rows = torch.randn(y_rows.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    ((y.double() * grad_y).sum() + (y_rows.double() * grad_rows).sum()).backward()
    ((expected * grad_y).sum() + (expected_rows * grad_rows).sum()).backward()
    for n in NAMES:
        coarser = max((dtype, leaves[n].dtype), key=lambda d: TOLERANCES[d][0])
        assert leaves[n].grad is not None and leaves[n].grad.dtype == leaves[n].dtype, n
        scale = 2.0
        if os.environ[ENV_STRATEGY] == "grouped" and coarser in (torch.bfloat16, torch.float16):
            # Two calls: autograd adds their gradients in the parameter's dtype, each rounded at its own size.
            scale *= max(1.0, float(oracle[n].grad.abs().max()))
        assert_close(leaves[n].grad, oracle[n].grad, coarser, scale=scale, name=f"grad {n}")
    if with_out:
        assert_close(base_leaf.grad, base_oracle.grad, dtype, name="grad through out")
    if with_out == "columns":
        assert bool((out._base[:, d_out:] == 7).all()), "the buffer's other columns must be left alone"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_out", [False, True])
# (T, d_in, d_out, E, r, k, m, k2): odd sizes, 1s, more rows than one 64-row tile, E = 64 with k = 8, a
# regate with more slots than the call, and one with a single slot (the model's routed view).
@pytest.mark.parametrize("shape", [(29, 24, 19, 5, 3, 2, 11, 2), (1, 1, 1, 1, 1, 1, 1, 1),
                                   (80, 33, 70, 4, 5, 2, 70, 3),
                                   pytest.param((40, 16, 18, 64, 2, 8, 9, 8), marks=pytest.mark.slow),
                                   (17, 9, 7, 6, 4, 3, 5, 1)])
def test_regate_matches_a_second_call(shape, with_out, dtype, backend, gen):
    if not backend_supports(backend, dtype):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    run_and_compare(make_inputs(gen, *shape, dtype=dtype), gen, backend, with_out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "columns"])
def test_regate_into_a_view_of_out(layout, backend, gen):
    """`out` may be any strided view (the docs say so): autograd refuses a two-output function that writes into
    a view, so the dense strategy adds its fresh delta into such an `out` instead."""
    run_and_compare(make_inputs(gen, 29, 24, 19, 5, 3, 2, 11, 2), gen, backend, with_out=layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [(0, 5), (7, 0), (0, 0)])
def test_regate_empty_call_or_no_rows(sizes, backend, gen):
    num_tokens, num_rows = sizes
    run_and_compare(make_inputs(gen, num_tokens, 6, 5, 4, 3, 2, num_rows, 2), gen, backend, with_out=True,
                    validate=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regate_rows_and_ids_out_of_range_give_zero_rows_without_validation(backend, gen):
    inputs = make_inputs(gen, 12, 7, 6, 4, 2, 2, 6, 2)
    inputs["rows"][2] = -1
    inputs["rows"][4] = 12
    inputs["rows_experts"][0, 1] = 4  # one slot outside [0, E): that slot adds nothing
    inputs["rows_experts"][5, :] = -3
    run_and_compare(inputs, gen, backend, with_out=True, validate=False)
    _, y_rows = sdk.lora_moe(inputs["x"], inputs["lora_a"], inputs["lora_b"], inputs["weights"], inputs["experts"],
                             regate=(inputs["rows"], inputs["rows_weights"], inputs["rows_experts"]),
                             backend=backend, validate=False)
    for row in (2, 4, 5):
        assert torch.count_nonzero(y_rows[row]) == 0


def test_regate_validation_names_the_bad_row_or_id(gen):
    inputs = make_inputs(gen, 5, 4, 3, 3, 2, 2, 3, 2)
    call = (inputs["x"], inputs["lora_a"], inputs["lora_b"], inputs["weights"], inputs["experts"])
    rows, rows_weights, rows_experts = inputs["rows"], inputs["rows_weights"], inputs["rows_experts"]
    with pytest.raises(ValueError, match=r"regate rows holds row 5, outside \[0, 5\)"):
        sdk.lora_moe(*call, regate=(torch.tensor([0, 5, 1]), rows_weights, rows_experts), validate=True)
    with pytest.raises(ValueError, match=r"regate experts holds expert id 3"):
        sdk.lora_moe(*call, regate=(rows, rows_weights, torch.full_like(rows_experts, 3)), validate=True)
    with pytest.raises(ValueError, match=r"regate weights must have shape \[m=3, k2=2\]"):
        sdk.lora_moe(*call, regate=(rows, rows_weights[:, :1], rows_experts))
    with pytest.raises(TypeError, match="regate rows must"):
        sdk.lora_moe(*call, regate=(rows.float(), rows_weights, rows_experts))
    with pytest.raises(TypeError, match="regate must be a tuple"):
        sdk.lora_moe(*call, regate=rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regate_is_bitwise_deterministic(backend, gen):
    """Repeated rows add up in a fixed order: the same bits twice."""
    inputs = make_inputs(gen, 131, 20, 18, 4, 6, 3, 40, 2)
    inputs["rows"][:20] = inputs["rows"][20:]
    runs = []
    for _ in range(2):
        leaves = {n: inputs[n].clone().requires_grad_() for n in NAMES}
        y, y_rows = sdk.lora_moe(leaves["x"], leaves["lora_a"], leaves["lora_b"], leaves["weights"],
                                 inputs["experts"], scaling=0.5, backend=backend,
                                 regate=(inputs["rows"], leaves["rows_weights"], inputs["rows_experts"]))
        (y.sum() + (y_rows * torch.linspace(-1, 1, y_rows.numel()).view_as(y_rows)).sum()).backward()
        runs.append([y.detach(), y_rows.detach()] + [leaves[n].grad for n in NAMES])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_regate_gradcheck(gen, strategy):
    inputs = make_inputs(gen, 6, 5, 4, 3, 2, 2, 4, 2, dtype=torch.float64)
    inputs["weights"], inputs["rows_weights"] = inputs["weights"].double(), inputs["rows_weights"].double()

    def regated(x, lora_a, lora_b, weights, rows_weights):
        y, y_rows = sdk.lora_moe(x, lora_a, lora_b, weights, inputs["experts"], scaling=0.7, backend="torch",
                                 regate=(inputs["rows"], rows_weights, inputs["rows_experts"]))
        return y, y_rows

    leaves = [inputs[n].clone().requires_grad_() for n in NAMES]
    assert torch.autograd.gradcheck(regated, leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regate_custom_ops_pass_opcheck(backend, gen):
    module = importlib.import_module("sparsedoctor_kernels.ops.lora_moe")
    inputs = make_inputs(gen, 7, 5, 4, 3, 2, 2, 4, 2)
    call = (inputs["x"], inputs["lora_a"], inputs["lora_b"], inputs["weights"], inputs["experts"], 0.5)
    regate = (inputs["rows"], inputs["rows_weights"], inputs["rows_experts"])
    for accumulate in (False, True):
        torch.library.opcheck(module._lora_moe_regate_forward,
                              (*call, torch.randn(7, 4, generator=gen), accumulate, *regate, backend),
                              test_utils=("test_schema", "test_faketensor"))
    _, h = module._lora_moe_regate_forward(*call, torch.randn(7, 4, generator=gen), True, *regate, backend)
    grads = (torch.randn(7, 4, generator=gen), torch.randn(4, 4, generator=gen))
    torch.library.opcheck(module._lora_moe_regate_backward, (*grads, *call[:5], h, *regate, 0.5, backend),
                          test_utils=("test_schema", "test_faketensor"))


def test_regate_compiles_without_graph_breaks(gen, strategy):
    inputs = make_inputs(gen, 9, 6, 5, 4, 3, 2, 4, 2)

    def call(x, lora_a, lora_b, weights, experts, rows, rows_weights, rows_experts):
        y, y_rows = sdk.lora_moe(x, lora_a, lora_b, weights, experts, validate=False,
                                 regate=(rows, rows_weights, rows_experts))
        return y.sum() + y_rows.sum()

    args = [inputs[n] for n in ("x", "lora_a", "lora_b", "weights", "experts", "rows", "rows_weights",
                                "rows_experts")]
    compiled = torch.compile(call, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(*args), call(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regate_takes_int32_rows_and_weights_in_x_dtype(backend, gen):
    """The other accepted dtypes: int32 rows and ids, and weights2 in x's dtype (float64 here, so that the
    Triton interpreter runs it too)."""
    inputs = make_inputs(gen, 21, 9, 8, 4, 3, 2, 7, 3, dtype=torch.float64)
    inputs["rows"], inputs["rows_experts"] = inputs["rows"].int(), inputs["rows_experts"].int()
    inputs["rows_weights"] = inputs["rows_weights"].double()
    run_and_compare(inputs, gen, backend, with_out=True)
