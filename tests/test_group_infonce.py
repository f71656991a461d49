"""`group_infonce` against autograd of the plain formula (brute.group_infonce) in float64: the loss and
the gradient w.r.t. x, on every backend; odd shapes, empty input, groups without partners or negatives, ids
outside [0, S), a single group, and poisoned outputs (conftest) so that an unwritten gradient row fails."""

import importlib

import pytest
import torch

import sparsedoctor_kernels as sdk

import brute
from conftest import assert_close, cpu_backends

BACKENDS = cpu_backends("group_infonce")


def oracle(x, groups, num_groups, temperature):
    leaf = x.detach().double().requires_grad_()
    value = brute.group_infonce(leaf, groups, num_groups, temperature)
    (grad,) = torch.autograd.grad(value, leaf) if value.requires_grad else (torch.zeros_like(leaf),)
    return value.detach(), grad


def check(x, groups, num_groups, backend, temperature=0.3):
    leaf = x.clone().requires_grad_()
    got = sdk.group_infonce(leaf, groups, num_groups, temperature=temperature, backend=backend)
    got.backward()
    want, want_grad = oracle(x, groups, num_groups, temperature)
    assert got.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert_close(got, want, x.dtype, name="loss")
    assert leaf.grad.dtype == x.dtype
    assert_close(leaf.grad, want_grad, x.dtype, name="grad x")
    return got, leaf.grad


def probabilities(gen, num_rows, dim, dtype=torch.float64):
    return torch.softmax(torch.randn(num_rows, dim, generator=gen, dtype=torch.float64) * 2, -1).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# (n, d, S): odd sizes, a single row, many groups, the model's default subset (256 tokens, 8 experts, a batch of
# 8 sequences), wide d, and more groups than rows.
@pytest.mark.parametrize("shape", [(13, 5, 4), (1, 1, 1), (37, 3, 11), (256, 8, 8), (40, 33, 3), (9, 4, 20)])
def test_group_infonce_matches_autograd_of_the_formula(shape, dtype, backend, gen):
    num_rows, dim, num_groups = shape
    x = probabilities(gen, num_rows, dim, dtype)
    groups = torch.randint(0, num_groups, (num_rows,), generator=gen)
    groups[::7] = -1  # padding rows take no part
    check(x, groups, num_groups, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("problems, num_rows, dim, num_groups", [(3, 13, 5, 4), (7, 256, 8, 8), (1, 9, 3, 2),
                                                                  (0, 5, 4, 2), (2, 0, 4, 3)])
def test_a_batch_of_problems_gives_each_problem_its_own_loss(problems, num_rows, dim, num_groups, dtype, backend,
                                                             gen):
    """x [B, n, d] with groups [B, n]: loss [B], each problem's the formula's on its own rows (a weighted sum of
    the losses gives each problem's gradient its own weight); a problem of padding alone gives 0."""
    x = torch.stack([probabilities(gen, num_rows, dim, dtype) for _ in range(problems)]) if problems else (
        torch.empty(0, num_rows, dim, dtype=dtype))
    groups = torch.randint(-1, num_groups, (problems, num_rows), generator=gen)
    if problems > 1:
        groups[1] = -1  # a problem without a member
    leaf = x.clone().requires_grad_()
    got = sdk.group_infonce(leaf, groups, num_groups, temperature=0.3, backend=backend)
    assert got.shape == (problems,)
    weights = torch.arange(1, problems + 1, dtype=got.dtype)
    (got * weights).sum().backward()
    for problem in range(problems):
        want, want_grad = oracle(x[problem], groups[problem], num_groups, 0.3)
        assert_close(got[problem], want, dtype, name=f"loss {problem}")
        assert_close(leaf.grad[problem], want_grad * (problem + 1), dtype, name=f"grad x {problem}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_outside_every_group_change_nothing_and_get_no_gradient(backend, gen):
    x = probabilities(gen, 12, 4)
    groups = torch.randint(0, 3, (12,), generator=gen)
    groups[[2, 5]] = torch.tensor([-1, 3])  # -1 and S: in no group
    x_poisoned = x.clone()
    x_poisoned[[2, 5]] = float("nan")  # they are selected out, never multiplied by zero
    got, grad = check(x_poisoned.nan_to_num(0.5), groups, 3, backend)
    again = sdk.group_infonce(x_poisoned.clone().requires_grad_(), groups, 3, backend=backend, temperature=0.3)
    torch.testing.assert_close(again, got)
    assert torch.count_nonzero(grad[[2, 5]]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["empty", "no member", "no partner", "one group", "singletons and a pair"])
def test_degenerate_groups(case, backend, gen):
    x = probabilities(gen, 0 if case == "empty" else 6, 4)
    groups = {"empty": torch.zeros(0, dtype=torch.long), "no member": torch.full((6,), -1),
              "no partner": torch.arange(6), "one group": torch.zeros(6, dtype=torch.long),
              "singletons and a pair": torch.tensor([0, 1, 2, 2, 3, 4])}[case]
    got, grad = check(x, groups, 6, backend)
    if case in ("empty", "no member", "no partner"):
        assert got == 0 and torch.count_nonzero(grad) == 0
    if case == "one group":  # a positive and no negatives: logsumexp of one score minus itself
        assert float(got) == pytest.approx(0.0, abs=1e-12)


def test_group_infonce_gradcheck(gen):
    x = probabilities(gen, 9, 4).requires_grad_()
    groups = torch.tensor([0, 0, 1, 1, 1, 2, -1, 2, 3])
    assert torch.autograd.gradcheck(lambda t: sdk.group_infonce(t, groups, 4, backend="torch"), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_infonce_is_bitwise_deterministic(backend, gen):
    x = probabilities(gen, 100, 8, torch.float32)
    groups = torch.randint(-1, 7, (100,), generator=gen)
    runs = []
    for _ in range(2):
        leaf = x.clone().requires_grad_()
        value = sdk.group_infonce(leaf, groups, 7, backend=backend)
        value.backward()
        runs.append((value.detach(), leaf.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(x=torch.zeros(4, 3, dtype=torch.int64)), TypeError, "x must"),
        (dict(x=torch.zeros(4)), ValueError, r"x must have shape \[n, d\]"),
        (dict(x=torch.zeros(2, 4, 3, 1)), ValueError, r"x must have shape \[n, d\]"),
        (dict(x=torch.rand(2, 4, 3)), ValueError, r"groups must have shape \[B=2, n=4\]"),
        (dict(groups=torch.zeros(4)), TypeError, "groups must"),
        (dict(groups=torch.zeros(5, dtype=torch.long)), ValueError, r"groups must have shape \[n=4\]"),
        (dict(num_groups=0), ValueError, "num_groups must be an int >= 1"),
        (dict(num_groups=2.0), ValueError, "num_groups must be an int >= 1"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    ],
)
def test_group_infonce_rejects_bad_input(overrides, error, match):
    arguments = dict(x=torch.rand(4, 3), groups=torch.zeros(4, dtype=torch.long), num_groups=2, temperature=0.1)
    arguments.update(overrides)
    with pytest.raises(error, match=match):
        sdk.group_infonce(arguments.pop("x"), arguments.pop("groups"), arguments.pop("num_groups"), **arguments)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton (the interpreter on CPU)")
def test_shapes_beyond_one_program_take_the_reference_or_are_refused(gen):
    x = probabilities(gen, 600, 64, torch.float32)  # 1024 x 64 padded: beyond one program's tile
    groups = torch.randint(0, 8, (600,), generator=gen)
    with pytest.raises(ValueError, match="use backend='torch'"):
        sdk.group_infonce(x, groups, 8, backend="triton")
    wide = probabilities(gen, 10, 128, torch.float32)  # few rows, but the S x d tile of 64 x 128 is too large
    with pytest.raises(ValueError, match=r"S x d .* got n=10, d=128, S=64"):
        sdk.group_infonce(wide, torch.randint(0, 64, (10,), generator=gen), 64, backend="triton")
    # The automatic choice on a GPU takes the reference for it (decided from the shape alone, no GPU needed).
    implementation = importlib.import_module("sparsedoctor_kernels.ops.group_infonce")
    assert implementation._backend(None, torch.device("cuda"), (600, 64, 8)) == "torch"
    assert implementation._backend(None, torch.device("cuda"), (256, 8, 8)) == "triton"


def test_group_infonce_custom_op_passes_opcheck(gen):
    module = importlib.import_module("sparsedoctor_kernels.ops.group_infonce")
    x = probabilities(gen, 7, 3, torch.float32)
    groups = torch.tensor([0, 0, 1, 1, 2, -1, 2])
    batch, batch_groups = torch.stack([x, x.flip(0)]), torch.stack([groups, groups.flip(0)])
    for backend in BACKENDS:
        for arguments in ((x, groups), (batch, batch_groups)):
            torch.library.opcheck(module._group_infonce_forward, (*arguments, 3, 0.2, backend),
                                  test_utils=("test_schema", "test_faketensor"))


def test_group_infonce_compiles_without_graph_breaks(gen):
    x = probabilities(gen, 10, 4, torch.float32)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, -1, 3, 3])

    def term(t):
        return sdk.group_infonce(t, groups, 4) * 2

    compiled = torch.compile(term, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), term(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_rows_compute_in_float32_and_get_their_gradient_in_their_dtype(dtype, gen):
    """The torch backend on 16-bit x (the Triton interpreter has no bf16): float32 loss, gradient in x's dtype."""
    x = probabilities(gen, 30, 6, dtype)
    groups = torch.randint(-1, 4, (30,), generator=gen)
    leaf = x.clone().requires_grad_()
    got = sdk.group_infonce(leaf, groups, 4, temperature=0.3, backend="torch")
    got.backward()
    want, want_grad = oracle(x, groups, 4, 0.3)
    assert got.dtype == torch.float32 and leaf.grad.dtype == dtype
    assert_close(got, want, dtype, name="loss")
    assert_close(leaf.grad, want_grad, dtype, name="grad x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_take_the_norm_clamp_like_the_formula(backend, gen):
    x = probabilities(gen, 8, 3)
    x[2] = 0.0  # a member row of norm 0: F.normalize's clamp decides its query and its partner's positive
    check(x, torch.tensor([0, 0, 1, 1, 2, 2, 3, -1]), 4, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_lower_the_scores_precision(backend, gen):
    """Under bfloat16 autocast the op still scores in float32, as outside it."""
    x = probabilities(gen, 29, 7, torch.float32).requires_grad_()
    groups = torch.randint(0, 4, (29,), generator=gen)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = sdk.group_infonce(x, groups, 4, temperature=0.3, backend=backend)
        assert loss.dtype == torch.float32
        results.append((loss, *torch.autograd.grad(loss, x)))
    for plain, autocast in zip(*results):
        torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)
