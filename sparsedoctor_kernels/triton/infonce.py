"""InfoNCE over the expert queue in two launches, split across the queue so that small batches fill the GPU.

1. `_infonce_forward_kernel`, grid (row blocks, queue splits): the queue's E*Q slots, flattened expert-major,
   are cut into contiguous splits. A program normalises its block of queries and divides them by the
   temperature (the prologue), then walks the filled slots of its split that belong to other experts in tiles
   with an online log-sum-exp (running max and sum, rescaled as in flash attention), and writes the partial
   (max m_s, sum l_s = sum_j exp(n_j - m_s), sum_j exp(n_j - m_s) * key_j) of each row. A split with no
   negative for a row writes (-inf, 0, 0).
2. `_infonce_merge_kernel`, grid (row blocks): starts each row's log-sum-exp at its positive score (m = s,
   l = 1), folds in the splits' partials in split order with the log-sum-exp rule (each side rescaled by
   exp(m_side - m_new)), and writes the loss, the gradients w.r.t. the normalised views and their chain back
   through v = u / max(||u||, eps) (the epilogue).

No [N, E*Q] score matrix exists, and the gradients of query and positive leave the forward, so the backward
never reads the queue. No atomics: every output element is written by one program, and the merge's order is
fixed, so results are bitwise equal run to run; the split count changes them only by rounding.

Triton passes float arguments as fp32, so the temperature travels as the int64 bit pattern of its float64
value (and the norm's eps as a constexpr one): float64 inputs stay exact for gradcheck.

Splits (`split_queue`): ceil(TARGET_PROGRAMS / row blocks) of them, so the grid holds about 512 programs
(four per SM of a 132-SM GPU, which runs one of these 8-warp programs per SM at a time: several waves even
out splits whose filled parts differ), but each at least MIN_TILES_PER_SPLIT tiles of slots long, and the
count then lowered until no split is empty. Large batches get one split: their row blocks fill the GPU.

Launches: the two kernels (the merge alone for an empty queue, none for N = 0) plus output allocation.
Rows whose expert id is -1 or outside [0, E) see every expert's keys, as in the reference.

Cost at the model's shapes (N = 256, E = 8, Q = 1024 full, p = 128, fp32; 16 row blocks x 32 splits of 256
slots). Split kernel: reads the 4 MiB queue once per row block (64 MiB, from L2 after the first: the queue
fits; half of it for a bf16 queue) and the queries once per split (4 MiB), writes 4.1 MiB of partials, and
computes 1.07 GFLOP of dots (two [16, 128] x [128, 32] products a tile; tf32x3 runs each as three) and 2.1M
exps. Merge: reads the 4.1 MiB of partials and 256 KiB of inputs, writes 257 KiB, computes about 4 MFLOP.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.reference.infonce import NORM_EPS
from sparsedoctor_kernels.triton._dtypes import compute_type

# The query block, its gradient accumulator and a key tile all live in registers: at p = 128 these sizes
# compile for sm_90 without spills (compile_check: 64x32 tiles spill 300+ bytes a thread). Untimed on a GPU.
BLOCK_Q = 32  # queue slots per tile
TILE_ELEMENTS = 2048  # query block x padded dim held per program
NUM_WARPS = 8
# The merge holds the two views, the merged accumulator and one partial: elementwise, so small row blocks
# give it more programs to read the partials with. 8 warps: at 4, float64 at p = 100 spilled (compile_check).
MERGE_ELEMENTS = 1024
MERGE_WARPS = 8
TARGET_PROGRAMS = 512  # split kernel programs wanted: about four waves on a 132-SM GPU
MIN_TILES_PER_SPLIT = 4  # a program's key reads (>= 4 tiles) dwarf its partial write (one [rows, p] block)
MAX_SPLITS = 65535  # the grid's second dimension


def _float64_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


NORM_EPS_BITS = tl.constexpr(_float64_bits(NORM_EPS))


@triton.jit
def _from_float64_bits(bits, COMPUTE: tl.constexpr):
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)


@triton.jit
def _norm_eps(COMPUTE: tl.constexpr):
    return _from_float64_bits(tl.full([], NORM_EPS_BITS, tl.int64), COMPUTE)


@triton.jit
def _normalized_rows(ptr, offsets, mask, NORMALIZE: tl.constexpr, COMPUTE: tl.constexpr):
    """(v, ||u||, max(||u||, eps)) of a block of rows u, in the compute type; v = u when not normalising."""
    u = tl.load(ptr + offsets, mask=mask, other=0.0).to(COMPUTE)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(u * u, axis=1))
        denom = tl.maximum(norm, _norm_eps(COMPUTE))
        return u / denom[:, None], norm, denom
    ones = tl.full([u.shape[0]], 1.0, COMPUTE)
    return u, ones, ones


@triton.jit
def _normalize_backward(grad_v, v, norm, denom, NORMALIZE: tl.constexpr, COMPUTE: tl.constexpr):
    """Gradient through v = u / max(||u||, eps), as reference.normalize_rows_backward: below eps the
    denominator is a constant."""
    if NORMALIZE:
        projected = grad_v - v * tl.sum(v * grad_v, axis=1)[:, None]
        above_eps = norm > _norm_eps(COMPUTE)
        return tl.where(above_eps[:, None], projected, grad_v) / denom[:, None]
    return grad_v


@triton.jit(do_not_specialize=["temperature_bits"])
def _infonce_forward_kernel(
    # The name is compile_check's: it compiles this kernel with PRECISION as on CUDA.
    query_ptr, keys_ptr, size_ptr, experts_ptr,
    part_max_ptr, part_sum_ptr, part_keys_ptr,  # [splits, N], [splits, N], [splits, N, p]
    temperature_bits, num_rows, dim, capacity, num_slots, slots_per_split,
    NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
    COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_P)
    row_ok = rows < num_rows
    col_ok = cols < dim
    offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    query, _, _ = _normalized_rows(query_ptr, offsets, mask, NORMALIZE, COMPUTE)
    query = query / _from_float64_bits(temperature_bits, COMPUTE)
    own = tl.load(experts_ptr + rows, mask=row_ok, other=-1).to(tl.int64)

    running_max = tl.full([BLOCK_N], float("-inf"), dtype=COMPUTE)
    running_sum = tl.zeros([BLOCK_N], dtype=COMPUTE)
    weighted_keys = tl.zeros([BLOCK_N, BLOCK_P], dtype=COMPUTE)
    slots = tl.arange(0, BLOCK_Q)
    first = split * slots_per_split
    last = tl.minimum(first + slots_per_split, num_slots)
    for expert in range(first // capacity, tl.cdiv(last, capacity)):
        # This split's slots of this expert, cut at the expert's fill.
        filled = tl.minimum(tl.maximum(tl.load(size_ptr + expert), 0), capacity).to(tl.int32)
        stop = tl.minimum(last - expert * capacity, filled)
        is_other = own != expert
        for start in range(tl.maximum(first - expert * capacity, 0), stop, BLOCK_Q):
            slot_ok = start + slots < stop
            key_rows = (expert * capacity + start + slots).to(tl.int64)
            keys = tl.load(keys_ptr + key_rows[:, None] * dim + cols[None, :], mask=slot_ok[:, None] & col_ok[None, :],
                           other=0.0).to(COMPUTE)
            scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION, out_dtype=COMPUTE)
            scores = tl.where(is_other[:, None] & slot_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            # Rows with no negative yet stay at max -inf: shift them by 0 so that no exp(-inf - -inf) = NaN.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            rescale = tl.exp(running_max - shift)
            probs = tl.exp(scores - shift[:, None])
            running_sum = running_sum * rescale + tl.sum(probs, axis=1)
            weighted_keys = weighted_keys * rescale[:, None] + tl.dot(probs, keys, input_precision=PRECISION,
                                                                       out_dtype=COMPUTE)
            running_max = new_max
    part_rows = split.to(tl.int64) * num_rows + rows
    tl.store(part_max_ptr + part_rows, running_max, mask=row_ok)
    tl.store(part_sum_ptr + part_rows, running_sum, mask=row_ok)
    tl.store(part_keys_ptr + part_rows[:, None] * dim + cols[None, :], weighted_keys, mask=mask)


@triton.jit(do_not_specialize=["temperature_bits"])
def _infonce_merge_kernel(
    query_ptr, positive_ptr, part_max_ptr, part_sum_ptr, part_keys_ptr,
    loss_ptr, grad_query_ptr, grad_positive_ptr,
    temperature_bits, num_rows, dim, num_splits,
    NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_P)
    row_ok = rows < num_rows
    offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
    mask = row_ok[:, None] & (cols < dim)[None, :]
    temperature = _from_float64_bits(temperature_bits, COMPUTE)
    query, query_norm, query_denom = _normalized_rows(query_ptr, offsets, mask, NORMALIZE, COMPUTE)
    positive, positive_norm, positive_denom = _normalized_rows(positive_ptr, offsets, mask, NORMALIZE, COMPUTE)
    positive_score = tl.sum(query * positive, axis=1) / temperature

    # The positive starts the log-sum-exp (max = its score, sum = exp(0) = 1): the max stays finite, so a
    # split's -inf max (no negatives) rescales its zero sums by exp(-inf) = 0.
    merged_max = positive_score
    merged_sum = tl.full([BLOCK_N], 1.0, dtype=COMPUTE)
    merged_keys = tl.zeros([BLOCK_N, BLOCK_P], dtype=COMPUTE)
    for split in range(num_splits):  # in split order: the same sums every run
        part_rows = split * num_rows + rows.to(tl.int64)
        part_max = tl.load(part_max_ptr + part_rows, mask=row_ok, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + part_rows, mask=row_ok, other=0.0)
        part_keys = tl.load(part_keys_ptr + part_rows[:, None] * dim + cols[None, :], mask=mask, other=0.0)
        new_max = tl.maximum(merged_max, part_max)
        merged_scale = tl.exp(merged_max - new_max)
        part_scale = tl.exp(part_max - new_max)
        merged_sum = merged_sum * merged_scale + part_sum * part_scale
        merged_keys = merged_keys * merged_scale[:, None] + part_keys * part_scale[:, None]
        merged_max = new_max

    log_sum_exp = merged_max + tl.log(merged_sum)
    positive_coef = tl.exp(positive_score - log_sum_exp) - 1.0  # d loss / d s; d loss / d n_j = p_j
    grad_query = (positive_coef[:, None] * positive + merged_keys / merged_sum[:, None]) / temperature
    grad_positive = positive_coef[:, None] * query / temperature
    grad_query = _normalize_backward(grad_query, query, query_norm, query_denom, NORMALIZE, COMPUTE)
    grad_positive = _normalize_backward(grad_positive, positive, positive_norm, positive_denom, NORMALIZE, COMPUTE)
    tl.store(loss_ptr + rows, log_sum_exp - positive_score, mask=row_ok)
    tl.store(grad_query_ptr + offsets, grad_query, mask=mask)
    tl.store(grad_positive_ptr + offsets, grad_positive, mask=mask)


def split_queue(num_row_blocks: int, num_slots: int, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, slots per split) of a queue of `num_slots` slots, none empty; (0, 1) for an empty queue.

    By default TARGET_PROGRAMS / row blocks splits of whole tiles, each at least MIN_TILES_PER_SPLIT tiles
    long; `num_splits` forces a count (cut at any slot, for tests), reduced where splits would be empty."""
    if num_slots == 0:
        return 0, 1
    if num_splits is None:
        tiles = triton.cdiv(num_slots, BLOCK_Q)
        wanted = min(triton.cdiv(TARGET_PROGRAMS, num_row_blocks), max(1, tiles // MIN_TILES_PER_SPLIT))
        slots_per_split = triton.cdiv(tiles, wanted) * BLOCK_Q
    else:
        slots_per_split = triton.cdiv(num_slots, max(1, min(num_splits, num_slots, MAX_SPLITS)))
    return triton.cdiv(num_slots, slots_per_split), slots_per_split


def _row_block(dim_block: int, elements: int) -> int:
    """Rows a program holds: at least 16 (tl.dot's smallest M), at most 64."""
    return max(16, min(64, elements // dim_block))


def forward(query, positive, queue_keys, queue_size, query_experts, temperature: float, normalize: bool, *,
            num_splits: int | None = None):
    """Returns (loss [N], d loss_i / d query_i [N, p], d loss_i / d positive_i [N, p]) in the compute dtype.
    `num_splits` forces the number of queue splits (tests); by default it follows the shapes (split_queue)."""
    num_experts, capacity, dim = queue_keys.shape
    num_rows = query.shape[0]
    dtype = compute_dtype(query.dtype, positive.dtype)
    device = query.device
    loss = empty((num_rows,), dtype, device)
    grad_query = empty((num_rows, dim), dtype, device)
    grad_positive = empty((num_rows, dim), dtype, device)
    if num_rows == 0:
        return loss, grad_query, grad_positive
    query, positive, queue_keys = query.contiguous(), positive.contiguous(), queue_keys.contiguous()
    queue_size, query_experts = queue_size.contiguous(), query_experts.contiguous()  # no copy from the op
    block_p = max(16, triton.next_power_of_2(dim))
    block_n = _row_block(block_p, TILE_ELEMENTS)
    row_blocks = triton.cdiv(num_rows, block_n)
    splits, slots_per_split = split_queue(row_blocks, num_experts * capacity, num_splits)
    part_max, part_sum = empty((splits, num_rows), dtype, device), empty((splits, num_rows), dtype, device)
    part_keys = empty((splits, num_rows, dim), dtype, device)
    temperature_bits = _float64_bits(temperature)
    common = dict(NORMALIZE=bool(normalize), BLOCK_P=block_p, COMPUTE=compute_type(dtype))
    if splits > 0:
        exact = dtype == torch.float64 or device.type != "cuda"
        _infonce_forward_kernel[(row_blocks, splits)](
            query, queue_keys, queue_size, query_experts, part_max, part_sum, part_keys,
            temperature_bits, num_rows, dim, capacity, num_experts * capacity, slots_per_split,
            BLOCK_N=block_n, BLOCK_Q=BLOCK_Q, **common,
            # fp32 on the GPU: three TF32 products recover fp32 accuracy (scores are divided by a small
            # temperature, so plain TF32 errors would show in the loss).
            PRECISION="ieee" if exact else "tf32x3", num_warps=NUM_WARPS,
        )
    merge_rows = max(1, MERGE_ELEMENTS // block_p)
    _infonce_merge_kernel[(triton.cdiv(num_rows, merge_rows),)](
        query, positive, part_max, part_sum, part_keys, loss, grad_query, grad_positive,
        temperature_bits, num_rows, dim, splits,
        BLOCK_N=merge_rows, **common, num_warps=MERGE_WARPS,
    )
    return loss, grad_query, grad_positive
