import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsedoctor_kernels as sdk

import brute
from conftest import backend_supports, cpu_backends

BACKENDS = cpu_backends("ExpertQueue.enqueue")


def poisoned_queue(gen, num_experts, capacity, dim, dtype=torch.float32):
    """A queue whose every slot, pointer and size starts at random values: untouched state must survive."""
    queue = sdk.ExpertQueue(num_experts, capacity, dim, dtype=dtype)
    queue.keys.copy_(torch.randn(queue.keys.shape, generator=gen))
    if capacity:
        queue.ptr.copy_(torch.randint(0, capacity, (num_experts,), generator=gen))
        queue.size.copy_(torch.randint(0, capacity + 1, (num_experts,), generator=gen))
    return queue


def enqueue_and_compare(queue, keys, experts, **kwargs):
    expected = brute.enqueue(queue.keys, queue.ptr, queue.size, keys.to(queue.keys.dtype), experts)
    queue.enqueue(keys, experts, **kwargs)
    torch.testing.assert_close(queue.keys.double(), expected[0], rtol=0, atol=0)  # a copy: bit exact
    torch.testing.assert_close(queue.ptr, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(queue.size, expected[2], rtol=0, atol=0)


def test_fresh_queue_state():
    queue = sdk.ExpertQueue(3, 5, 4)
    assert queue.keys.shape == (3, 5, 4) and queue.keys.dtype == torch.float32
    assert queue.ptr.dtype == torch.int64 and queue.size.dtype == torch.int64
    assert not queue.keys.any() and not queue.ptr.any() and not queue.size.any()
    assert set(queue.state_dict()) == {"keys", "ptr", "size"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sequential_semantics_over_many_calls(dtype, backend, gen):
    if not backend_supports(backend, dtype):
        pytest.skip(f"{backend} on CPU does not run {dtype}")
    queue = poisoned_queue(gen, 5, 7, 3, dtype=dtype)
    for rows in (0, 3, 12, 30, 1, 9):  # includes > Q rows of one expert in one call, and wrap-around
        experts = torch.randint(-2, 6, (rows,), generator=gen)  # -2, -1 and 5 are out of range: dropped
        enqueue_and_compare(queue, torch.randn(rows, 3, generator=gen), experts, validate=False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_beyond_int32_are_dropped_not_narrowed(backend, gen):
    """2**32 + 1 narrowed to int32 is 1 and -2**32 + 2 is 2: both must be dropped as out of range, in the
    counts that advance ptr and size as well as in the copy."""
    queue = poisoned_queue(gen, 3, 4, 2)
    experts = torch.tensor([2**32 + 1, 1, -(2**32) + 2, 2**31, 2**63 - 1, 0, 1])
    enqueue_and_compare(queue, torch.randn(7, 2, generator=gen), experts, validate=False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
# Batches longer than the Triton position scan's block (1024 ids for E <= 16, 256 for E = 64), int32 ids.
@pytest.mark.parametrize("num_experts, capacity, rows", [(3, 7, 2500), (64, 5, 700), (1, 1000, 1500)])
def test_long_batches_keep_sequential_semantics(num_experts, capacity, rows, backend, gen):
    queue = poisoned_queue(gen, num_experts, capacity, 5)
    experts = torch.randint(-1, num_experts + 1, (rows,), generator=gen, dtype=torch.int32)
    enqueue_and_compare(queue, torch.randn(rows, 5, generator=gen), experts, validate=False, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_than_capacity_rows_of_one_expert_keep_the_last_ones(backend):
    queue = sdk.ExpertQueue(2, 4, 1)
    keys = torch.arange(11, dtype=torch.float32)[:, None]
    queue.enqueue(keys, torch.zeros(11, dtype=torch.int64), backend=backend)
    # Sequential writes: rows 8, 9, 10 land in slots 0, 1, 2 and row 7 in slot 3.
    assert queue.keys[0, :, 0].tolist() == [8.0, 9.0, 10.0, 7.0]
    assert queue.ptr.tolist() == [3, 0] and queue.size.tolist() == [4, 0]
    assert not queue.keys[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrap_around_across_calls(backend):
    queue = sdk.ExpertQueue(1, 3, 1)
    queue.enqueue(torch.tensor([[1.0], [2.0]]), torch.tensor([0, 0]), backend=backend)
    queue.enqueue(torch.tensor([[3.0], [4.0]]), torch.tensor([0, 0]), backend=backend)
    assert queue.keys[0, :, 0].tolist() == [4.0, 2.0, 3.0]
    assert queue.ptr.tolist() == [1] and queue.size.tolist() == [3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_are_dropped_or_rejected(backend, gen):
    queue = poisoned_queue(gen, 3, 4, 2)
    before = queue.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    queue.enqueue(torch.randn(3, 2, generator=gen), torch.tensor([-1, 3, 100]), validate=False, backend=backend)
    for name, value in queue.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match=r"experts holds expert id 3, outside \[0, 3\)"):
        queue.enqueue(torch.randn(2, 2), torch.tensor([0, 3]))  # validate defaults to True on CPU


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_capacity_queue_stores_nothing(backend, gen):
    queue = sdk.ExpertQueue(2, 0, 3)
    queue.enqueue(torch.randn(4, 3, generator=gen), torch.tensor([0, 1, 1, 0]), backend=backend)
    assert queue.keys.shape == (2, 0, 3) and queue.size.tolist() == [0, 0]


def test_keys_are_detached_and_cast(gen):
    queue = sdk.ExpertQueue(2, 3, 2, dtype=torch.bfloat16)
    keys = torch.randn(2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    queue.enqueue(keys * 2, torch.tensor([1, 1], dtype=torch.int32))
    assert not queue.keys.requires_grad
    torch.testing.assert_close(queue.keys[1, :2], (keys * 2).detach().bfloat16(), rtol=0, atol=0)


def test_state_dict_round_trip(gen):
    queue = sdk.ExpertQueue(3, 5, 4)
    queue.enqueue(torch.randn(9, 4, generator=gen), torch.randint(0, 3, (9,), generator=gen))
    restored = sdk.ExpertQueue(3, 5, 4)
    restored.load_state_dict(queue.state_dict())
    for name in ("keys", "ptr", "size"):
        assert torch.equal(getattr(restored, name), getattr(queue, name))
    keys, experts = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    queue.enqueue(keys, experts)
    restored.enqueue(keys, experts)
    assert torch.equal(restored.keys, queue.keys) and torch.equal(restored.ptr, queue.ptr)


def test_reset_and_repr():
    queue = sdk.ExpertQueue(2, 3, 4)
    queue.enqueue(torch.ones(2, 4), torch.tensor([0, 1]))
    queue.reset()
    assert not queue.keys.any() and not queue.size.any() and not queue.ptr.any()
    assert "num_experts=2, capacity=3, dim=4" in repr(queue)


def test_gather_without_process_group_is_a_plain_enqueue(gen):
    queue = poisoned_queue(gen, 3, 4, 2)
    enqueue_and_compare(queue, torch.randn(5, 2, generator=gen), torch.tensor([0, 2, 2, 1, 0]), gather=True)


@settings(max_examples=40, deadline=None)
@given(num_experts=st.integers(1, 6), capacity=st.integers(0, 9), dim=st.integers(1, 5),
       batches=st.lists(st.integers(0, 25), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1),
       backend=st.sampled_from(BACKENDS))
def test_enqueue_property(num_experts, capacity, dim, batches, seed, backend):
    gen = torch.Generator().manual_seed(seed)
    queue = poisoned_queue(gen, num_experts, capacity, dim)
    for rows in batches:
        experts = torch.randint(-1, num_experts + 1, (rows,), generator=gen)
        enqueue_and_compare(queue, torch.randn(rows, dim, generator=gen), experts, validate=False, backend=backend)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((0, 4, 2), {}, ValueError, "num_experts must be >= 1"),
        ((2, -1, 2), {}, ValueError, "capacity must be >= 0"),
        ((2, 4, 0), {}, ValueError, "dim must be >= 1"),
        ((2, 4.0, 2), {}, TypeError, "capacity must be an int"),
        ((2, 4, 2), {"dtype": torch.int32}, TypeError, "dtype must be a floating-point dtype"),
    ],
)
def test_queue_constructor_rejects_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        sdk.ExpertQueue(*args, **kwargs)


@pytest.mark.parametrize(
    "keys, experts, error, match",
    [
        (torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), ValueError, r"keys must have shape \[N, dim=4\]"),
        (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), TypeError, "keys must have dtype"),
        (torch.zeros(3, 4), torch.zeros(3), TypeError, "experts must have dtype int32, int64"),
        (torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64), ValueError, r"experts must have shape \[N=3\]"),
        (torch.zeros(3, 4, device="meta"), torch.zeros(3, dtype=torch.int64), ValueError, "same device"),
    ],
)
def test_enqueue_rejects_bad_input(keys, experts, error, match):
    with pytest.raises(error, match=match):
        sdk.ExpertQueue(2, 3, 4).enqueue(keys, experts)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
def test_triton_enqueue_writes_each_slot_at_most_once(gen):
    """The copy runs in parallel, so only rows that sequential writes would leave in place may be written:
    their destinations must be distinct (the interpreter runs programs in order and would hide a race)."""
    from sparsedoctor_kernels.triton.queue import enqueue_destinations

    queue = poisoned_queue(gen, 4, 6, 2)
    experts = torch.randint(-1, 5, (3000,), generator=gen)
    dest = enqueue_destinations(queue.keys, queue.ptr.clone(), queue.size.clone(), experts)
    written = dest[dest >= 0]
    assert written.unique().numel() == written.numel()
    for expert in range(4):
        arrived = int((experts == expert).sum())
        mine = written[(written >= expert * 6) & (written < (expert + 1) * 6)]
        assert mine.numel() == min(arrived, 6)
        # The survivors are the expert's last rows, in row order.
        rows = torch.nonzero(experts == expert).flatten()
        assert torch.equal(torch.nonzero(dest[rows] >= 0).flatten(), torch.arange(max(0, arrived - 6), arrived))
