"""Expert memory queue enqueue in two launches, no host sync, no data races.

1. `_enqueue_positions_kernel`, one program: counts each expert's rows in the batch, then walks the ids in
   blocks with a running per-expert counter (a one-hot cumulative sum inside each block), so row i of expert e
   gets its rank among e's rows in row order. Its slot is (ptr[e] + rank) % Q, and it survives only if it is
   among e's last Q rows: exactly the rows whose sequential writes are not overwritten in this call, and they
   land in distinct slots. It then advances ptr and size. Only ids are read here (4-8 bytes a row).
2. `_enqueue_copy_kernel`, many programs: copy every surviving row into its slot, cast to the queue's dtype.
   Survivors have distinct destinations, so the order of the copies does not matter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsedoctor_kernels._alloc import empty

SCAN_ELEMENTS = 4096  # one-hot elements ([ids, experts]) per step of the position scan
SCAN_WARPS = 8  # the scan is one program: give it a whole SM's worth of threads and registers
COPY_ELEMENTS = 4096  # elements of keys per program in the copy


@triton.jit
def _valid_ids(experts_ptr, rows, num_rows, num_experts):
    """The rows' expert ids as int32, -1 for rows past the end and ids outside [0, E). The range check comes
    before the narrowing, so an int64 id such as 2**32 + 1 is dropped rather than read as expert 1."""
    raw = tl.load(experts_ptr + rows, mask=rows < num_rows, other=-1)
    return tl.where((raw >= 0) & (raw < num_experts), raw, -1).to(tl.int32)


@triton.jit
def _enqueue_positions_kernel(
    experts_ptr, ptr_ptr, size_ptr, dest_ptr,
    num_rows, num_experts, capacity,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):
    experts_range = tl.arange(0, BLOCK_E)
    expert_ok = experts_range < num_experts
    # Counts and ranks fit in int32 (a batch has fewer than 2^31 rows): half the registers of int64.
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        ids = _valid_ids(experts_ptr, rows, num_rows, num_experts)
        counts += tl.sum((ids[:, None] == experts_range[None, :]).to(tl.int32), axis=0)

    ptr = tl.load(ptr_ptr + experts_range, mask=expert_ok, other=0)
    seen = tl.zeros([BLOCK_E], dtype=tl.int32)  # rows of each expert before this block
    for start in range(0, num_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < num_rows
        ids = _valid_ids(experts_ptr, rows, num_rows, num_experts)
        valid = ids >= 0
        one_hot = (ids[:, None] == experts_range[None, :]).to(tl.int32)  # zero rows for ids outside [0, E)
        rank_in_expert = tl.cumsum(one_hot, axis=0) - one_hot + seen[None, :]
        rank = tl.sum(one_hot * rank_in_expert, axis=1)
        count = tl.sum(one_hot * counts[None, :], axis=1)
        row_ptr = tl.sum(one_hot.to(tl.int64) * ptr[None, :], axis=1)
        survives = valid & (rank >= count - capacity)
        dest = tl.where(survives, ids.to(tl.int64) * capacity + (row_ptr + rank) % capacity, -1)
        tl.store(dest_ptr + rows, dest, mask=row_ok)
        seen += tl.sum(one_hot, axis=0)

    size = tl.load(size_ptr + experts_range, mask=expert_ok, other=0)
    tl.store(ptr_ptr + experts_range, (ptr + counts) % capacity, mask=expert_ok)
    tl.store(size_ptr + experts_range, tl.minimum(size + counts, capacity), mask=expert_ok)


@triton.jit
def _enqueue_copy_kernel(
    keys_ptr, stride_keys, dest_ptr, queue_ptr, num_rows, dim,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dest = tl.load(dest_ptr + rows, mask=rows < num_rows, other=-1)
    mask = (dest >= 0)[:, None] & (cols < dim)[None, :]
    values = tl.load(keys_ptr + rows[:, None].to(tl.int64) * stride_keys + cols[None, :], mask=mask)
    tl.store(queue_ptr + dest[:, None] * dim + cols[None, :], values.to(queue_ptr.dtype.element_ty), mask=mask)


def enqueue_destinations(queue_keys: torch.Tensor, ptr: torch.Tensor, size: torch.Tensor,
                         experts: torch.Tensor) -> torch.Tensor:
    """Flat slot (e * Q + slot) of each row that survives this call, -1 for the others; advances ptr and size."""
    num_experts, capacity, _ = queue_keys.shape
    dest = empty((experts.shape[0],), torch.int64, experts.device)
    block_e = triton.next_power_of_2(num_experts)
    _enqueue_positions_kernel[(1,)](
        experts, ptr, size, dest, experts.shape[0], num_experts, capacity,
        BLOCK_N=max(16, min(1024, SCAN_ELEMENTS // block_e)), BLOCK_E=block_e, num_warps=SCAN_WARPS,
    )
    return dest


def enqueue(queue_keys: torch.Tensor, ptr: torch.Tensor, size: torch.Tensor, keys: torch.Tensor,
            experts: torch.Tensor) -> None:
    num_rows, dim = keys.shape
    if num_rows == 0 or queue_keys.shape[1] == 0:
        return
    dest = enqueue_destinations(queue_keys, ptr, size, experts)
    block_d = min(triton.next_power_of_2(dim), 256)
    block_n = max(1, COPY_ELEMENTS // block_d)
    _enqueue_copy_kernel[(triton.cdiv(num_rows, block_n), triton.cdiv(dim, block_d))](
        keys, keys.stride(0), dest, queue_keys, num_rows, dim, BLOCK_N=block_n, BLOCK_D=block_d,
    )
