"""The grouped lora_moe's routing plan built by two Triton kernels equals, element for element, the eager torch
build it replaced (`_build_plan_reference`): same packed layout, same stable order, same bounds and tile tables.
Outputs are poisoned (conftest), so an element the kernels never write fails the comparison."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsedoctor_kernels._alloc
from sparsedoctor_kernels.launches import count_launches

from conftest import cpu_backends

pytestmark = pytest.mark.skipif("triton" not in cpu_backends("lora_moe"),
                                reason="needs Triton (the interpreter on CPU)")

EXPERTS = [1, 3, 8, 64, 256]
TOP_K = [1, 2, 4, 8]
IDS_DTYPES = [torch.int32, torch.int64]
# Ids outside [0, E) go to the extra group E; the int64 ones would land inside [0, E) if narrowed first
# (2**32 + 1 -> 1, 2**32 -> 0, 2**40 + 3 -> 3).
OUT_OF_RANGE = {torch.int32: [-1, -7, 2**31 - 1, -2**31],
                torch.int64: [-1, -7, 2**32 + 1, 2**32, 2**40 + 3, -2**32 + 2, 2**63 - 1]}


@pytest.fixture
def plan_module():
    from sparsedoctor_kernels.triton import lora_moe
    return lora_moe


def random_ids(gen, num_tokens, top_k, num_experts, dtype, out_of_range=0.15):
    """Ids in [0, E), a share of them replaced by out-of-range values (E itself and beyond included)."""
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen).to(dtype)
    bad_values = torch.tensor(OUT_OF_RANGE[dtype] + [num_experts, num_experts + 5], dtype=dtype)
    bad = torch.rand(num_tokens, top_k, generator=gen) < out_of_range
    picks = torch.randint(0, len(bad_values), (num_tokens, top_k), generator=gen)
    return torch.where(bad, bad_values[picks], ids)


def assert_plan_matches_reference(plan_module, ids, num_experts):
    got = plan_module._build_plan(ids, num_experts)
    want = plan_module._build_plan_reference(ids, num_experts)
    num_tokens, top_k = ids.shape
    assert got.dtype == torch.int32 and got.shape == (plan_module.plan_numel(num_tokens, top_k, num_experts),)
    sizes = plan_module._plan_sizes(num_tokens, top_k, num_experts)
    for name, a, b in zip(("order", "bounds", "shrink tiles", "expand tiles"), got.split(sizes), want.split(sizes)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    return got


@pytest.mark.parametrize("ids_dtype", IDS_DTYPES, ids=str)
@pytest.mark.parametrize("top_k", TOP_K)
@pytest.mark.parametrize("num_experts", EXPERTS)
def test_plan_equals_the_torch_build(plan_module, num_experts, top_k, ids_dtype, gen):
    # 523 tokens (odd): up to 4184 pairs, several blocks of the build's programs at k >= 2.
    assert_plan_matches_reference(plan_module, random_ids(gen, 523, top_k, num_experts, ids_dtype), num_experts)


@pytest.mark.parametrize("num_tokens", [0, 1, 2, 63, 64, 65, 129])
@pytest.mark.parametrize(("num_experts", "top_k"), [(1, 1), (3, 2), (8, 2), (256, 8)])
def test_plan_at_small_and_tile_edge_token_counts(plan_module, num_tokens, num_experts, top_k, gen):
    ids = random_ids(gen, num_tokens, top_k, num_experts, torch.int64)
    assert_plan_matches_reference(plan_module, ids, num_experts)


@pytest.mark.parametrize(("num_tokens", "top_k"), [(1029, 1), (2051, 2), (1031, 8)])
def test_plan_with_one_hot_expert_and_empty_experts(plan_module, num_tokens, top_k, gen):
    """Most pairs on one expert (far more than a tile and than a program's block of pairs), most experts
    without a pair: groups spanning many tiles and blocks, and groups of no tile."""
    num_experts = 64
    ids = torch.full((num_tokens, top_k), 5, dtype=torch.int64)
    scatter = torch.rand(num_tokens, top_k, generator=gen) < 0.1
    ids[scatter] = torch.randint(40, 44, (int(scatter.sum()),), generator=gen)
    ids[torch.rand(num_tokens, top_k, generator=gen) < 0.05] = -1
    assert_plan_matches_reference(plan_module, ids, num_experts)


def test_plan_orders_each_group_by_token(plan_module, gen):
    """Stability, stated directly: the backward's fixed summation order and the per-slot expand rely on it."""
    num_tokens, top_k, num_experts = 700, 4, 3
    ids = random_ids(gen, num_tokens, top_k, num_experts, torch.int64)
    plan = assert_plan_matches_reference(plan_module, ids, num_experts)
    order, bounds, _, _ = plan_module._unpack_plan(plan, num_tokens, top_k, num_experts)
    for key in range((num_experts + 1) * top_k):
        group = order[bounds[key]:bounds[key + 1]]
        assert torch.all(group % top_k == key % top_k), key
        assert torch.all(group[1:] > group[:-1]), key


def test_plan_reads_ids_through_their_strides(plan_module, gen):
    wide = random_ids(gen, 301, 6, 8, torch.int64)
    for ids in (wide[:, ::2], wide.t().contiguous().t()[:, :3], wide[::3, 1:4]):
        assert not ids.is_contiguous()
        assert_plan_matches_reference(plan_module, ids, 8)


def test_plan_beyond_the_kernels_bins_falls_back_to_the_torch_build(plan_module, gen):
    num_experts, top_k = 600, 8  # 1024 groups x 8 slots of bins: more than PLAN_MAX_BINS
    groups, slots = plan_module._plan_bins(num_experts, top_k)
    assert groups * slots > plan_module.PLAN_MAX_BINS
    assert_plan_matches_reference(plan_module, random_ids(gen, 45, top_k, num_experts, torch.int64), num_experts)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(0, 8, 2), (24, 8, 2), (1500, 256, 8)])
def test_plan_is_two_launches_without_host_sync(plan_module, num_tokens, num_experts, top_k, gen, monkeypatch):
    monkeypatch.setattr(sparsedoctor_kernels._alloc, "poison_outputs", False)  # the tests' fills are no launch
    ids = random_ids(gen, num_tokens, top_k, num_experts, torch.int64)
    counts = count_launches(lambda: plan_module._build_plan(ids, num_experts))
    assert counts == {"triton._plan_count_kernel": 1, "triton._plan_build_kernel": 1}
    with _RecordOps() as ops:
        plan_module._build_plan(ids, num_experts)
    syncing = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}
    assert not ops.names & syncing, ops.names
