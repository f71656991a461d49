"""Grouped top-k LoRA experts: y[t] = s * sum_j w[t,j] * B[e_tj] @ (A[e_tj] @ x[t]).

Work is organised by expert, on the device and without a host sync:
- the plan: the (token, slot) pairs stably sorted by (expert, slot), the group bounds, and tile tables
  (expert, first row, end row) with a grid bounded from the shapes alone (cdiv(pairs, BLOCK_M) + E + 1 tiles
  at most); built by two kernels (below), reused by the backward;
- shrink: per expert tile, h = x[tokens] @ A[e]^T into a [T*k, r] buffer kept for the backward;
- expand: per expert tile of one slot, out[tokens] (+)= (s * w * h) @ B[e]^T. A token appears once per slot,
  so slot by slot every tile owns its output rows: no atomics, and a fixed order of addition (slot 0 first)
  makes the result bitwise reproducible; with `out=` the add happens in the kernel's epilogue;
- backward: the same shrink over grad_y with B^T gives u = B^T gy (fused with dweights = s <u, h> and
  grad_h = s w u), the same expand with A gives dx, and one program per (expert, tile of A or B) loops over
  that expert's pairs in order for dA and dB: deterministic, and experts without pairs write zeros.
Pairs whose expert id is outside [0, E) are sorted into an extra group E whose tiles never touch the weights:
they contribute zero and get zero gradient.

The plan build, 2 launches, no host sync, grids from the shapes (`_build_plan_reference` is the eager torch
build it replaced, about 60 launches: a sort, searchsorted, two tile tables of cumsum/gather/stack, ...). A
pair's bin is (g, j): g its expert id, or E for ids outside [0, E), and j its slot, in a [next_pow2(E + 2),
next_pow2(k)] grid laid out in the sort-key order. One program per PLAN_BLOCK_P = 1024 pairs:
1. `_plan_count_kernel`: each program's histogram of its pairs' bins into a [blocks, bins] buffer.
2. `_plan_build_kernel`: each program sums every block's histogram into the totals, whose cumsum gives each
   bin's first sorted row; program 0 writes the bounds, and the tile-table chunks are dealt out among all
   programs, each tile's group found by counting the group ends before it (a histogram over the chunk, then
   a cumsum). Each program then adds the histograms of the blocks before its own, ranks its pairs 64 at a
   time (pairwise comparisons and a running row per bin: a stable rank, no [pairs, bins] one-hot) and writes
   their ids into the order.
Bytes: the ids read twice (P x 4 or 8 B), blocks x bins x 4 B of histograms written, then read by every
program (all of them, and the earlier blocks' again: 1.5 x blocks^2 rows, from L2), the plan written once
(4 B x plan_numel), nothing else. At the model's shapes (T = 4096, E = 8, k = 2, int64 ids): 8 programs,
32 bins, 1 KiB of histograms written and 11.5 KiB read, 2 x 64 KiB of ids, a 35 KiB plan. At E = 256, k = 8,
T = 4096: 32 programs, 4096 bins, 512 KiB written and 24 MiB read, 2 x 256 KiB of ids, a 175 KiB plan.
Beyond PLAN_MAX_BINS bins (E > 510 at k = 8) the torch build runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.triton._dtypes import dot_config

BLOCK_M = 64  # pairs per tile; every tile holds pairs of one expert (and one slot in the expand)
BLOCK_D = 64  # reduction chunk over d_in (forward shrink) or d_out (backward shrink)
BLOCK_N = 64  # output columns per program in the expand and the weight gradients
MAX_BLOCK_R = 64  # rank columns per program; a larger r loops (expand) or adds programs (shrink, grads)
PLAN_BLOCK_P = 1024  # pairs per program of the plan build: its programs each read every program's histogram
PLAN_RANK_BLOCK = 64  # pairs ranked at a time within a plan program's block
PLAN_TILE_CHUNK = 256  # tile-table entries a plan program writes per step
PLAN_MAX_BINS = 4096  # bins of the plan build: E + 2 and k, each rounded up to a power of two: E <= 510 at k = 8
PLAN_WIDE_BINS = 256  # above this many bins the plan kernels take PLAN_WARPS warps: a bin vector is spread
PLAN_WARPS = 8  # over more threads (4096 bins on 4 warps need 225 registers, on 8 about 110, no spills)


@triton.jit
def _load_tile(tiles_ptr, max_tiles):
    """This program's (expert, first row, end row) in the sorted pair order."""
    tile = tl.program_id(0)
    expert = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + max_tiles + tile)
    end = tl.load(tiles_ptr + 2 * max_tiles + tile)
    return expert, start, end


@triton.jit
def _load_pairs(order_ptr, start, end, top_k, BLOCK_M: tl.constexpr):
    """Rows [start, start + BLOCK_M) of the sorted order, clipped at `end`: (valid mask, pair ids, token ids)."""
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    pairs = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return row_ok, pairs, pairs // top_k


@triton.jit
def _shrink_kernel(
    src_ptr, stride_src,  # [T, D]: x, or grad_y in the backward
    weight_ptr, stride_we, stride_wr, stride_wd,  # [E, R, D] view: A, or B^T in the backward
    order_ptr, tiles_ptr, max_tiles,
    proj_ptr,  # out [P, R]: h, or grad_h = s * w * u in the backward
    h_ptr, coef_ptr, grad_gate_ptr,  # backward only: h, s * w, and out [R blocks, P] partial <u, h>
    num_experts, rank, depth, top_k, num_pairs,
    BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    expert, start, end = _load_tile(tiles_ptr, max_tiles)
    if start >= end:
        return
    row_ok, pairs, tokens = _load_pairs(order_ptr, start, end, top_k, BLOCK_M)
    r_block = tl.program_id(1)
    ranks = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=ACC)
    if expert < num_experts:  # the group of out-of-range ids reads no weights and yields zeros
        weight_rows = weight_ptr + expert.to(tl.int64) * stride_we + ranks[None, :] * stride_wr
        for d0 in range(0, depth, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < depth
            src = tl.load(src_ptr + tokens[:, None] * stride_src + cols[None, :],
                          mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            weight = tl.load(weight_rows + cols[:, None] * stride_wd, mask=col_ok[:, None] & rank_ok[None, :],
                             other=0.0)
            acc = tl.dot(src.to(DOT), weight.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    offsets = pairs[:, None] * rank + ranks[None, :]
    mask = row_ok[:, None] & rank_ok[None, :]
    if BACKWARD:
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0)
        tl.store(grad_gate_ptr + r_block * num_pairs + pairs, tl.sum(acc * h, axis=1), mask=row_ok)
        coef = tl.load(coef_ptr + pairs, mask=row_ok, other=0.0)
        acc = acc * coef[:, None]
    tl.store(proj_ptr + offsets, acc, mask=mask)


@triton.jit
def _expand_kernel(
    proj_ptr, coef_ptr,  # [P, R] rank-space rows (h, or grad_h), and [P] s * w when HAS_COEF
    weight_ptr, stride_we, stride_wn, stride_wr,  # [E, N, R] view: B, or A^T for dx
    out_ptr, stride_out,  # [T, N]
    order_ptr, tiles_ptr, max_tiles,
    num_experts, rank, width, top_k,
    HAS_COEF: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    expert, start, end = _load_tile(tiles_ptr, max_tiles)
    if start >= end:
        return
    row_ok, pairs, tokens = _load_pairs(order_ptr, start, end, top_k, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    if expert < num_experts:
        weight_cols = weight_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
        for r0 in range(0, rank, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < rank
            proj = tl.load(proj_ptr + pairs[:, None] * rank + ranks[None, :],
                           mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            if HAS_COEF:
                proj = proj * tl.load(coef_ptr + pairs, mask=row_ok, other=0.0)[:, None]
            weight = tl.load(weight_cols + ranks[:, None] * stride_wr, mask=rank_ok[:, None] & col_ok[None, :],
                             other=0.0)
            acc = tl.dot(proj.to(DOT), weight.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    out_ptrs = out_ptr + tokens[:, None] * stride_out + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_grad_kernel(
    proj_ptr, coef_ptr,  # [P, R] rank-space rows (grad_h, or h scaled by [P] s * w when HAS_COEF)
    src_ptr, stride_src,  # [T, N]: x for dA, grad_y for dB
    out_ptr, stride_oe, stride_or, stride_on,  # [E, R, N] view of dA, or of dB [E, N, R]
    order_ptr, bounds_ptr,  # expert e's pairs: order[bounds[e * k] : bounds[(e + 1) * k]]
    rank, width, top_k,
    HAS_COEF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    expert = tl.program_id(0)
    start = tl.load(bounds_ptr + expert * top_k)
    end = tl.load(bounds_ptr + (expert + 1) * top_k)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    ranks = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=ACC)
    # One program walks all of the expert's pairs in sorted order: a fixed summation order, no atomics.
    for s0 in range(start, end, BLOCK_M):
        row_ok, pairs, tokens = _load_pairs(order_ptr, s0, end, top_k, BLOCK_M)
        proj = tl.load(proj_ptr + pairs[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                       other=0.0)
        if HAS_COEF:
            proj = proj * tl.load(coef_ptr + pairs, mask=row_ok, other=0.0)[:, None]
        src = tl.load(src_ptr + tokens[:, None] * stride_src + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                      other=0.0)
        acc = tl.dot(tl.trans(proj.to(DOT)), src.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    out_ptrs = out_ptr + expert.to(tl.int64) * stride_oe + ranks[:, None] * stride_or + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _pair_bins(experts_ptr, stride_t, stride_k, first, num_pairs, num_experts, top_k,
               BINS_PER_GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """Pairs first .. first + BLOCK (flat id t * k + j): (valid mask, bin g * BINS_PER_GROUP + j), g the expert
    id or E for ids outside [0, E). The range check comes before the narrowing, so an int64 id such as
    2**32 + 1 goes to group E rather than being read as expert 1."""
    pairs = first + tl.arange(0, BLOCK)
    pair_ok = pairs < num_pairs
    tokens, slots = pairs // top_k, pairs % top_k
    raw = tl.load(experts_ptr + tokens.to(tl.int64) * stride_t + slots * stride_k, mask=pair_ok, other=0)
    group = tl.where((raw >= 0) & (raw < num_experts), raw, num_experts).to(tl.int32)
    return pair_ok, group * BINS_PER_GROUP + slots


@triton.jit
def _plan_count_kernel(
    experts_ptr, stride_t, stride_k, counts_ptr,  # counts: out [blocks, NUM_BINS] pairs per bin of each block
    num_pairs, num_experts, top_k,
    BINS_PER_GROUP: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    block = tl.program_id(0)
    pair_ok, bins = _pair_bins(experts_ptr, stride_t, stride_k, block * BLOCK_P, num_pairs, num_experts, top_k,
                               BINS_PER_GROUP, BLOCK_P)
    counts = tl.histogram(bins, NUM_BINS, mask=pair_ok)
    tl.store(counts_ptr + block * NUM_BINS + tl.arange(0, NUM_BINS), counts)


@triton.jit
def _scatter_block_order(experts_ptr, stride_t, stride_k, order_ptr, next_row, block,
                         num_pairs, num_experts, top_k,
                         BINS_PER_GROUP: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_P: tl.constexpr,
                         RANK_BLOCK: tl.constexpr):
    """Writes this block's pair ids at their rows of the stably sorted order. `next_row[bin]` starts at the
    row of the bin's first pair of this block and advances over RANK_BLOCK pairs at a time; inside those a
    pair's rank is the number of earlier pairs of its bin ([RANK_BLOCK, RANK_BLOCK] comparisons: no
    [pairs, bins] one-hot, which would be 4096 wide at E = 256, k = 8)."""
    position = tl.arange(0, RANK_BLOCK)
    before = position[None, :] < position[:, None]
    block_pairs = tl.minimum(BLOCK_P, num_pairs - block * BLOCK_P)
    for first in range(block * BLOCK_P, block * BLOCK_P + block_pairs, RANK_BLOCK):
        pair_ok, bins = _pair_bins(experts_ptr, stride_t, stride_k, first, num_pairs, num_experts, top_k,
                                   BINS_PER_GROUP, RANK_BLOCK)
        bins = tl.where(pair_ok, bins, NUM_BINS)  # past the end: matches no pair's bin
        rank = tl.sum((before & (bins[None, :] == bins[:, None])).to(tl.int32), axis=1)
        rows = tl.gather(next_row, tl.minimum(bins, NUM_BINS - 1), 0) + rank
        tl.store(order_ptr + rows, first + position, mask=pair_ok)
        next_row += tl.histogram(bins, NUM_BINS, mask=pair_ok)


@triton.jit
def _store_bounds(bounds_ptr, starts, num_pairs, num_experts, top_k,
                  BINS_PER_GROUP: tl.constexpr, NUM_BINS: tl.constexpr):
    """bounds[g * k + j] = first sorted row of group g's slot j, and bounds[(E + 1) * k] = P. The padding of
    the bins (a spare group row) makes NUM_BINS > (E + 1) * k, so one vector holds every bound."""
    keys = tl.arange(0, NUM_BINS)
    num_keys = (num_experts + 1) * top_k
    bins = tl.minimum((keys // top_k) * BINS_PER_GROUP + keys % top_k, NUM_BINS - 1)
    bounds = tl.where(keys < num_keys, tl.gather(starts, bins, 0), num_pairs)
    tl.store(bounds_ptr + keys, bounds, mask=keys <= num_keys)


@triton.jit
def _store_tile_chunk(table_ptr, size, first_tile, starts, ends, first_slot, last_slot, num_groups,
                      BINS_PER_GROUP: tl.constexpr, GROUPS_PAD: tl.constexpr, TILE_CHUNK: tl.constexpr,
                      TILE_ROWS: tl.constexpr):
    """Entries [first_tile, first_tile + TILE_CHUNK) of a [3, size] tile table (group, first row, end row) over
    groups whose rows are bins (g, first_slot) .. (g, last_slot): `_tile_table`, with searchsorted done by
    counting the group ends that fall before each tile (a histogram of them over this chunk, then a cumsum)."""
    groups = tl.arange(0, GROUPS_PAD)
    group_start = tl.gather(starts, groups * BINS_PER_GROUP + first_slot, 0)
    group_end = tl.gather(ends, groups * BINS_PER_GROUP + last_slot, 0)
    tiles = (group_end - group_start + TILE_ROWS - 1) // TILE_ROWS
    tiles_end = tl.cumsum(tiles, 0)
    row_base = group_start - (tiles_end - tiles) * TILE_ROWS  # tile i of group g starts at row_base[g] + i * rows
    real = groups < num_groups
    ends_before = tl.sum((real & (tiles_end < first_tile)).to(tl.int32), 0)
    in_chunk = real & (tiles_end >= first_tile) & (tiles_end < first_tile + TILE_CHUNK)
    ends_in_chunk = tl.histogram(tiles_end - first_tile, TILE_CHUNK, mask=in_chunk)
    tile = first_tile + tl.arange(0, TILE_CHUNK)
    used = tile < tl.sum(tiles, 0)
    group = tl.minimum(ends_before + tl.cumsum(ends_in_chunk, 0), num_groups - 1)
    first_row = tl.where(used, tl.gather(row_base, group, 0) + tile * TILE_ROWS, 0)
    end_row = tl.where(used, tl.gather(group_end, group, 0), 0)
    in_table = tile < size
    tl.store(table_ptr + tile, group, mask=in_table)
    tl.store(table_ptr + size + tile, first_row, mask=in_table)
    tl.store(table_ptr + 2 * size + tile, end_row, mask=in_table)


@triton.jit
def _plan_build_kernel(
    experts_ptr, stride_t, stride_k, counts_ptr,  # counts: [blocks, NUM_BINS] from _plan_count_kernel
    plan_ptr, bounds_at, shrink_at, expand_at,  # out: the packed plan, and where its parts start
    num_pairs, num_experts, top_k, num_blocks, shrink_tiles, expand_tiles,
    BINS_PER_GROUP: tl.constexpr, NUM_BINS: tl.constexpr, GROUPS_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
    RANK_BLOCK: tl.constexpr, TILE_CHUNK: tl.constexpr, TILE_ROWS: tl.constexpr,
):
    block = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    totals = tl.zeros([NUM_BINS], dtype=tl.int32)
    for other in range(num_blocks):
        totals += tl.load(counts_ptr + other * NUM_BINS + bins)
    # Bins are laid out group-major like the sort keys (padding bins are empty): sorted rows [starts, ends).
    ends = tl.cumsum(totals, 0)
    starts = ends - totals
    if block == 0:
        _store_bounds(plan_ptr + bounds_at, starts, num_pairs, num_experts, top_k, BINS_PER_GROUP, NUM_BINS)
    # Every program has the totals: the tile tables' chunks are dealt out among them.
    shrink_chunks = tl.cdiv(shrink_tiles, TILE_CHUNK)
    expand_chunks = tl.cdiv(expand_tiles, TILE_CHUNK)
    for chunk in range(block, shrink_chunks + top_k * expand_chunks, num_blocks):
        is_shrink = chunk < shrink_chunks
        slot = tl.where(is_shrink, 0, (chunk - shrink_chunks) // expand_chunks)
        table_at = tl.where(is_shrink, shrink_at, expand_at + slot * 3 * expand_tiles)
        size = tl.where(is_shrink, shrink_tiles, expand_tiles)
        first_tile = tl.where(is_shrink, chunk, (chunk - shrink_chunks) % expand_chunks) * TILE_CHUNK
        # A shrink tile holds an expert's pairs of every slot (bins (g, 0) .. (g, last)), an expand tile one slot's.
        last_slot = tl.where(is_shrink, BINS_PER_GROUP - 1, slot)
        _store_tile_chunk(plan_ptr + table_at, size, first_tile, starts, ends, slot, last_slot, num_experts + 1,
                          BINS_PER_GROUP, GROUPS_PAD, TILE_CHUNK, TILE_ROWS)
    # Rows of the blocks before this one, summed after the tables so that starts, ends and this sum are never
    # live at once (three bin vectors at 4096 bins spilled).
    next_row = starts
    for other in range(block):
        next_row += tl.load(counts_ptr + other * NUM_BINS + bins)
    _scatter_block_order(experts_ptr, stride_t, stride_k, plan_ptr, next_row, block,
                         num_pairs, num_experts, top_k, BINS_PER_GROUP, NUM_BINS, BLOCK_P, RANK_BLOCK)

# ----------------------------------------------------------------------------------------------------------------
# Launchers

def _block_r(rank: int) -> int:
    return min(MAX_BLOCK_R, max(16, triton.next_power_of_2(rank)))


def _max_tiles(num_rows: int, num_groups: int) -> int:
    """Tiles of BLOCK_M rows over groups of any sizes summing to at most num_rows: one partial tile per group."""
    return triton.cdiv(num_rows, BLOCK_M) + num_groups


def _plan_sizes(num_tokens: int, top_k: int, num_experts: int) -> list[int]:
    """Lengths of the plan's parts: sorted pair order, group bounds, shrink tiles, per-slot expand tiles."""
    num_pairs, groups = num_tokens * top_k, num_experts + 1
    shrink_tiles, expand_tiles = _max_tiles(num_pairs, groups), top_k * _max_tiles(num_tokens, groups)
    return [num_pairs, groups * top_k + 1, 3 * shrink_tiles, 3 * expand_tiles]


def saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int) -> tuple[int, ...]:
    """h as kept for the backward: one rank-r row per (token, slot) pair."""
    return (num_tokens, top_k, rank)


def plan_numel(num_tokens: int, top_k: int, num_experts: int) -> int:
    return sum(_plan_sizes(num_tokens, top_k, num_experts))


def _tile_table(starts: torch.Tensor, ends: torch.Tensor, max_tiles: int) -> torch.Tensor:
    """[..., G] group row ranges -> [..., 3, max_tiles] (group, first row, end row); unused tiles are empty."""
    num_groups = starts.shape[-1]
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tiles.cumsum(-1)
    index = torch.arange(max_tiles, device=starts.device).expand(*starts.shape[:-1], max_tiles).contiguous()
    group = torch.searchsorted(tiles_end, index, right=True)
    used = group < num_groups
    group = group.clamp(max=num_groups - 1)
    first_tile = tiles_end.gather(-1, group) - tiles.gather(-1, group)
    first_row = starts.gather(-1, group) + (index - first_tile) * BLOCK_M
    end_row = torch.where(used, ends.gather(-1, group), 0)
    return torch.stack([group, torch.where(used, first_row, 0), end_row], -2).to(torch.int32)


def _build_plan_reference(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The plan in eager torch ops (about 60 launches): the definition `_build_plan` reproduces bit for bit, and
    its fallback for more bins than the plan kernels hold."""
    num_tokens, top_k = experts.shape
    device = experts.device
    valid = (experts >= 0) & (experts < num_experts)
    slots = torch.arange(top_k, device=device, dtype=torch.int32)
    keys = (torch.where(valid, experts, num_experts).to(torch.int32) * top_k + slots).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    num_groups = (num_experts + 1) * top_k
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_groups + 1, device=device, dtype=torch.int32))
    by_expert = bounds[::top_k]  # [E + 2]: expert e's pairs (all slots) start at by_expert[e]
    shrink_tiles = _tile_table(by_expert[:-1], by_expert[1:], _max_tiles(num_tokens * top_k, num_experts + 1))
    by_slot = bounds[:-1].view(num_experts + 1, top_k).T, bounds[1:].view(num_experts + 1, top_k).T
    expand_tiles = _tile_table(*by_slot, _max_tiles(num_tokens, num_experts + 1))
    return torch.cat([order.to(torch.int32), bounds.to(torch.int32), shrink_tiles.flatten(), expand_tiles.flatten()])


def _plan_bins(num_experts: int, top_k: int) -> tuple[int, int]:
    """(groups, bins per group) of the plan kernels' histograms: E + 1 groups and a spare one (so the bounds
    fit one vector), k slots, each padded to a power of two."""
    return triton.next_power_of_2(num_experts + 2), triton.next_power_of_2(top_k)


def _build_plan(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Everything the kernels index by, packed in one int32 tensor (see `_unpack_plan`), in two launches:
    per-block histograms of the pairs' bins, then per block the sorted rows of its pairs, the bounds and the
    tile tables. Equal, element for element, to `_build_plan_reference`."""
    num_tokens, top_k = experts.shape
    groups_pad, bins_per_group = _plan_bins(num_experts, top_k)
    num_bins = groups_pad * bins_per_group
    if num_bins > PLAN_MAX_BINS:
        return _build_plan_reference(experts, num_experts)
    sizes = _plan_sizes(num_tokens, top_k, num_experts)
    num_pairs = sizes[0]
    plan = empty((sum(sizes),), torch.int32, experts.device)
    num_blocks = max(1, triton.cdiv(num_pairs, PLAN_BLOCK_P))  # one program even for T = 0: it writes the tables
    counts = empty((num_blocks, num_bins), torch.int32, experts.device)
    bins = dict(BINS_PER_GROUP=bins_per_group, NUM_BINS=num_bins, BLOCK_P=PLAN_BLOCK_P)
    warps = PLAN_WARPS if num_bins > PLAN_WIDE_BINS else 4
    _plan_count_kernel[(num_blocks,)](experts, *experts.stride(), counts, num_pairs, num_experts, top_k,
                                      **bins, num_warps=warps)
    _plan_build_kernel[(num_blocks,)](
        experts, *experts.stride(), counts, plan, sizes[0], sum(sizes[:2]), sum(sizes[:3]),
        num_pairs, num_experts, top_k, num_blocks, sizes[2] // 3, sizes[3] // (3 * top_k),
        **bins, GROUPS_PAD=groups_pad, RANK_BLOCK=PLAN_RANK_BLOCK, TILE_CHUNK=PLAN_TILE_CHUNK, TILE_ROWS=BLOCK_M,
        num_warps=warps,
    )
    return plan


def _unpack_plan(plan: torch.Tensor, num_tokens: int, top_k: int, num_experts: int):
    order, bounds, shrink_tiles, expand_tiles = plan.split(_plan_sizes(num_tokens, top_k, num_experts))
    return order, bounds, shrink_tiles, expand_tiles.view(top_k, -1)


def _shrink(src, weight_view, order, tiles, rank, top_k, num_experts, *, acc_dtype, dot, backward=None):
    """h = src[tokens] @ W[e]^T per pair, W viewed [E, R, D]; with `backward=(h, coef)` also returns the
    per-pair <u, h> and stores coef * u."""
    num_pairs, depth = order.numel(), src.shape[1]
    block_r = _block_r(rank)
    r_blocks = triton.cdiv(rank, block_r)
    proj = empty((num_pairs, rank), acc_dtype, src.device)
    h, coef = backward if backward is not None else (proj, proj)
    grad_gate = empty((r_blocks, num_pairs), proj.dtype, src.device) if backward is not None else proj
    max_tiles = tiles.numel() // 3
    _shrink_kernel[(max_tiles, r_blocks)](
        src, src.stride(0), weight_view, *weight_view.stride(), order, tiles, max_tiles,
        proj, h, coef, grad_gate, num_experts, rank, depth, top_k, num_pairs,
        BACKWARD=backward is not None, BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_D=BLOCK_D, **dot,
    )
    return proj, (grad_gate.sum(0) if backward is not None else None)


def _expand(proj, coef, weight_view, out, order, slot_tiles, rank, top_k, num_experts, *, accumulate, dot):
    """out[tokens] (+)= (coef * proj) @ W[e]^T, W viewed [E, N, R], one launch per slot in slot order."""
    width = out.shape[1]
    max_tiles = slot_tiles.shape[1] // 3
    grid = (max_tiles, triton.cdiv(width, BLOCK_N))
    for slot in range(top_k):
        _expand_kernel[grid](
            proj, coef, weight_view, *weight_view.stride(), out, out.stride(0), order, slot_tiles[slot], max_tiles,
            num_experts, rank, width, top_k,
            HAS_COEF=coef is not None, ACCUMULATE=accumulate or slot > 0,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(rank), **dot,
        )


def _expert_grad(proj, coef, src, out_view, order, bounds, rank, top_k, num_experts, *, dot):
    """out[e] = (coef * proj)[pairs of e]^T @ src[tokens of e], written into out viewed [E, R, N]."""
    width = src.shape[1]
    block_r = _block_r(rank)
    grid = (num_experts, triton.cdiv(width, BLOCK_N), triton.cdiv(rank, block_r))
    _expert_grad_kernel[grid](
        proj, coef if coef is not None else proj, src, src.stride(0), out_view, *out_view.stride(), order, bounds,
        rank, width, top_k,
        HAS_COEF=coef is not None, BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_N=BLOCK_N, **dot,
    )


def _forward(x, lora_a, lora_b, weights, experts, scaling, out, *, accumulate):
    """Writes (or adds, with `accumulate`) the delta into `out`; returns (h [T, k, r], plan)."""
    num_tokens, top_k = experts.shape
    num_experts, rank, _ = lora_a.shape
    acc_dtype = compute_dtype(x.dtype)
    dot = dot_config(x.dtype, acc_dtype)
    plan = _build_plan(experts, num_experts)
    if num_tokens == 0:
        return torch.zeros(0, top_k, rank, dtype=acc_dtype, device=x.device), plan
    order, _, shrink_tiles, expand_tiles = _unpack_plan(plan, num_tokens, top_k, num_experts)
    h, _ = _shrink(x, lora_a, order, shrink_tiles, rank, top_k, num_experts, acc_dtype=acc_dtype, dot=dot)
    coef = (weights.to(acc_dtype) * scaling).flatten()
    _expand(h, coef, lora_b, out, order, expand_tiles, rank, top_k, num_experts, accumulate=accumulate, dot=dot)
    return h.view(num_tokens, top_k, rank), plan


def forward(x, lora_a, lora_b, weights, experts, scaling: float):
    """Returns (y [T, d_out] in x's dtype, h [T, k, r] in the compute dtype, plan)."""
    y = empty((x.shape[0], lora_b.shape[1]), x.dtype, x.device)
    h, plan = _forward(x, lora_a, lora_b, weights, experts, scaling, y, accumulate=False)
    return y, h, plan


def forward_into(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor):
    """Adds y into `out` inside the expand kernel (no [T, d_out] temporary); returns (h, plan). The kernel
    addresses output columns with unit stride, so an `out` laid out otherwise (a transposed view) gets the
    delta through a contiguous temporary."""
    if out.shape[1] > 1 and out.stride(1) != 1:
        y, h, plan = forward(x, lora_a, lora_b, weights, experts, scaling)
        out.add_(y)
        return h, plan
    return _forward(x, lora_a, lora_b, weights, experts, scaling, out, accumulate=True)


def backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling: float):
    num_tokens, top_k = experts.shape
    num_experts, rank, d_in = lora_a.shape
    acc_dtype = h.dtype
    dot = dot_config(x.dtype, acc_dtype)
    order, bounds, shrink_tiles, expand_tiles = _unpack_plan(plan, num_tokens, top_k, num_experts)
    if num_tokens == 0:
        return (torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b), torch.zeros_like(weights))
    h = h.view(num_tokens * top_k, rank)
    coef = (weights.to(acc_dtype) * scaling).flatten()
    # u = B[e]^T gy per pair; stored as grad_h = s w u, with <u, h> for the gate gradient.
    grad_h, u_dot_h = _shrink(grad_y, lora_b.transpose(1, 2), order, shrink_tiles, rank, top_k, num_experts,
                              acc_dtype=acc_dtype, dot=dot, backward=(h, coef))
    grad_weights = (u_dot_h * scaling).view(num_tokens, top_k).to(weights.dtype)
    grad_x = empty((num_tokens, d_in), x.dtype, x.device)
    _expand(grad_h, None, lora_a.transpose(1, 2), grad_x, order, expand_tiles, rank, top_k, num_experts,
            accumulate=False, dot=dot)
    grad_a = empty(lora_a.shape, lora_a.dtype, x.device)
    _expert_grad(grad_h, None, x, grad_a, order, bounds, rank, top_k, num_experts, dot=dot)
    grad_b = empty(lora_b.shape, lora_b.dtype, x.device)
    _expert_grad(h, coef, grad_y, grad_b.transpose(1, 2), order, bounds, rank, top_k, num_experts, dot=dot)
    return grad_x, grad_a, grad_b, grad_weights
