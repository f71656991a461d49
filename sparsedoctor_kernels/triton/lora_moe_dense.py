"""Folded dense-expert `lora_moe`: every expert of every token from one read of x, gates selected in.

LoRA's rank is small, so the E*r columns of all experts cost FLOPs that are nearly free while the bytes of x,
grad_y and [T, d_out] decide the time (see `sparsedoctor_kernels.cost`). Per call, with A_cat = [E*r, d_in]
(lora_a as stored) and B_cat = [E*r, d_out] (lora_b viewed per rank row):
- forward, two launches: `_dense_shrink_kernel` h = x @ A_cat^T, one read of x; `_dense_expand_kernel`
  out (+)= (s * g ⊙ h) @ B_cat, the gate g[t, e] = sum of the token's weights on expert e applied in the
  prologue (columns of experts the token did not choose are *selected* out), one read-modify-write of out
  for all k slots at once, any out strides;
- backward, from one read of grad_y for u: the shrink over grad_y with B gives u = grad_y @ B_cat^T, its
  epilogue the selected grad_h = s * g ⊙ u and per-slot dweights = s <u_e, h_e> (partials per column block,
  summed in a fixed order); the expand with A^T gives dx; `_dense_weight_grad_kernel` gives dA = grad_h^T x
  and dB = grad_y^T (s * g ⊙ h), each program walking its token range in order and partial sums over token
  splits added in a fixed order: deterministic, no atomics.
What this strategy cannot promise: a non-finite weight of an expert that a token did not choose is multiplied
by a zero gate inside the dot products (0 * NaN = NaN). Use the grouped strategy for that guarantee.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.triton._dtypes import dot_config

BLOCK_T = 64  # tokens per program
BLOCK_D = 64  # reduction chunk over d_in (forward shrink) or d_out (backward shrink)
BLOCK_N = 64  # output columns per program in the expand and the weight gradients
BLOCK_K = 64  # rank-space columns (of all experts) per reduction step in the expand and weight gradients
MAX_SHRINK_COLUMNS = 128  # rank-space columns one shrink program holds: all of them up to E*r = 128
TARGET_PROGRAMS = 264  # weight gradients split the tokens until the grid has about this many programs


@triton.jit
def _gates(weights_ptr, experts_ptr, rows, row_ok, cols, rank, scaling, TOP_K: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_T, BLOCK] s * (sum of the token's weights on the column's expert), and whether the token chose
    that expert at all. Ids outside [0, E) match no column."""
    column_expert = (cols // rank).to(tl.int64)
    gate = tl.zeros([rows.shape[0], cols.shape[0]], dtype=ACC)
    chosen = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.int1)
    for slot in tl.static_range(TOP_K):
        expert = tl.load(experts_ptr + rows * TOP_K + slot, mask=row_ok, other=-1).to(tl.int64)
        weight = tl.load(weights_ptr + rows * TOP_K + slot, mask=row_ok, other=0.0).to(ACC)
        hit = expert[:, None] == column_expert[None, :]
        gate += tl.where(hit, weight[:, None], 0.0)
        chosen = chosen | hit
    return gate * scaling, chosen


@triton.jit
def _sibling_gates(weights_ptr, experts_ptr, rows, row_ok, cols, col_ok, rank, experts_per_sibling, num_tokens,
                   scaling, TOP_K: tl.constexpr, ACC: tl.constexpr):
    """`_gates` for siblings stacked in the columns (sibling s owns columns [s*E*R, (s+1)*E*R)) with their own
    gates and ids [S, T, k]: each column reads its sibling's. An id outside [0, E) matches no column, so it
    never selects another sibling's expert."""
    width = experts_per_sibling * rank
    sibling = (cols // width).to(tl.int64)
    column_expert = (cols % width) // rank
    slots = (sibling[None, :] * num_tokens + rows.to(tl.int64)[:, None]) * TOP_K
    mask = row_ok[:, None] & col_ok[None, :]
    gate = tl.zeros([rows.shape[0], cols.shape[0]], dtype=ACC)
    chosen = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.int1)
    for slot in tl.static_range(TOP_K):
        expert = tl.load(experts_ptr + slots + slot, mask=mask, other=-1).to(tl.int64)
        weight = tl.load(weights_ptr + slots + slot, mask=mask, other=0.0).to(ACC)
        hit = expert == column_expert[None, :]
        gate += tl.where(hit, weight, 0.0)
        chosen = chosen | hit
    return gate * scaling, chosen


@triton.jit
def _source_rows(index_ptr, rows, row_ok, num_sources, GATHER: tl.constexpr):
    """(row of the [num_sources, E*R] source each output row reads, whether it reads one): the row itself, or,
    when GATHER, index[row]; an index outside [0, num_sources) reads nothing (zeros)."""
    if GATHER:
        source = tl.load(index_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
        source_ok = row_ok & (source >= 0) & (source < num_sources)
    else:
        source = rows.to(tl.int64)
        source_ok = row_ok
    return source, source_ok


@triton.jit
def _dense_shrink_kernel(
    src_ptr, stride_src,  # [T, D]: x, or grad_y in the backward
    weight_ptr, stride_we, stride_wr, stride_wd,  # [E, R, D] view: A, or B^T in the backward
    weights_ptr, experts_ptr,  # [T, k] gates and ids
    proj_ptr, gated_ptr,  # out [T, E*R]: h (forward only) and the selected s * g ⊙ (h or u)
    h_ptr, grad_gate_ptr,  # backward: h [T, E*R], and out [column blocks, T, k] partial s <u, h>
    index_ptr, safe_index_ptr, num_sources,  # GATHER: h row of each src row, out: that row or 0 where invalid
    num_tokens, rank, depth, num_columns, stride_rows, scaling,  # stride_rows: of proj, gated and h
    experts_per_sibling,  # SIBLINGS > 1 (forward only): E of each sibling, gates and ids [S, T, k]
    BACKWARD: tl.constexpr, GATHER: tl.constexpr, TOP_K: tl.constexpr, SIBLINGS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # Column blocks vary fastest, so programs that share a tile of src run side by side (and share it in L2).
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < num_columns
    weight_cols = weight_ptr + (cols // rank).to(tl.int64) * stride_we + (cols % rank) * stride_wr
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
    src_rows = src_ptr + rows.to(tl.int64)[:, None] * stride_src
    for d0 in range(0, depth, BLOCK_D):
        depths = d0 + tl.arange(0, BLOCK_D)
        depth_ok = depths < depth
        src = tl.load(src_rows + depths[None, :], mask=row_ok[:, None] & depth_ok[None, :], other=0.0)
        weight = tl.load(weight_cols[None, :] + depths[:, None] * stride_wd, mask=depth_ok[:, None] & col_ok[None, :],
                         other=0.0)
        acc = tl.dot(src.to(DOT), weight.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    if SIBLINGS == 1:
        gate, chosen = _gates(weights_ptr, experts_ptr, rows, row_ok, cols, rank, scaling, TOP_K, ACC)
    else:
        gate, chosen = _sibling_gates(weights_ptr, experts_ptr, rows, row_ok, cols, col_ok, rank,
                                      experts_per_sibling, num_tokens, scaling, TOP_K, ACC)
    offsets = rows.to(tl.int64)[:, None] * stride_rows + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    source, source_ok = _source_rows(index_ptr, rows, row_ok, num_sources, GATHER)
    # GATHER: a row that reads no h gets no gradient, and a safe index (0) for the scatter-add of its zeros.
    keep = chosen & source_ok[:, None]
    if GATHER and pid_c == 0:
        tl.store(safe_index_ptr + rows, tl.where(source_ok, source, 0), mask=row_ok)
    tl.store(gated_ptr + offsets, tl.where(keep, gate * acc, 0.0), mask=mask)
    if BACKWARD:
        h = tl.load(h_ptr + source[:, None] * stride_rows + cols[None, :], mask=source_ok[:, None] & col_ok[None, :],
                    other=0.0)
        u_h = tl.where(chosen, acc * h, 0.0)
        column_expert = (cols // rank).to(tl.int64)
        for slot in tl.static_range(TOP_K):
            expert = tl.load(experts_ptr + rows * TOP_K + slot, mask=row_ok, other=-1).to(tl.int64)
            partial = tl.sum(tl.where(expert[:, None] == column_expert[None, :], u_h, 0.0), axis=1)
            tl.store(grad_gate_ptr + (pid_c * num_tokens + rows) * TOP_K + slot, partial * scaling, mask=row_ok)
    else:
        tl.store(proj_ptr + offsets, acc, mask=mask)


@triton.jit
def _expand_tile(rows_ptr, stride_rows, source, source_ok, weight_ptr, stride_we, stride_wn, stride_wr,
                 out_ptr, stride_out_t, stride_out_n, rows, row_ok, outs, out_ok, weights_ptr, experts_ptr,
                 rank, num_columns, scaling, ACCUMULATE: tl.constexpr, GATE: tl.constexpr, TOP_K: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                 PRECISION: tl.constexpr, ACC: tl.constexpr):
    """out[rows, outs] (+)= rows' rank-space columns @ W (viewed [E, N, R]) for one [BLOCK_T, BLOCK_N] tile;
    GATE: the rows are ungated h, each selected by its token's own gates (weights / experts [T, k]) in the loop."""
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
    for c0 in range(0, num_columns, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        col_ok = cols < num_columns
        projected = tl.load(rows_ptr + source[:, None] * stride_rows + cols[None, :],
                            mask=source_ok[:, None] & col_ok[None, :], other=0.0)
        if GATE:  # the rows' own gates, selected in as the shrink's epilogue does
            gate, chosen = _gates(weights_ptr, experts_ptr, rows, row_ok, cols, rank, scaling, TOP_K, ACC)
            projected = tl.where(chosen, gate * projected, 0.0)
        weight_rows = weight_ptr + (cols // rank).to(tl.int64) * stride_we + (cols % rank) * stride_wr
        weight = tl.load(weight_rows[:, None] + outs[None, :] * stride_wn, mask=col_ok[:, None] & out_ok[None, :],
                         other=0.0)
        acc = tl.dot(projected.to(DOT), weight.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out_t + outs.to(tl.int64)[None, :] * stride_out_n
    mask = row_ok[:, None] & out_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dense_expand_kernel(
    rows_ptr,  # [T, E*R] rank-space rows, already gated; GATHER: ungated h [num_sources, E*R]
    weight_ptr, stride_we, stride_wn, stride_wr,  # [E, N, R] view: B, or A^T for dx
    out_ptr, stride_out_t, stride_out_n,  # [T, N], any strides
    index_ptr, weights_ptr, experts_ptr,  # GATHER: the h row of each output row, and its gates [T, k]
    num_tokens, rank, width, num_columns, stride_rows, num_sources, scaling,
    ACCUMULATE: tl.constexpr, GATHER: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    source, source_ok = _source_rows(index_ptr, rows, row_ok, num_sources, GATHER)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    _expand_tile(rows_ptr, stride_rows, source, source_ok, weight_ptr, stride_we, stride_wn, stride_wr, out_ptr,
                 stride_out_t, stride_out_n, rows, row_ok, outs, outs < width, weights_ptr, experts_ptr, rank,
                 num_columns, scaling, ACCUMULATE, GATHER, TOP_K, BLOCK_T, BLOCK_N, BLOCK_K, DOT, PRECISION, ACC)


@triton.jit
def _dense_sibling_expand_kernel(
    rows_ptr, stride_rows, num_tokens, rank, num_columns,  # gated [T, S*E*R]: sibling s owns E*R columns
    weight0_ptr, stride0_we, stride0_wn, out0_ptr, stride0_t, width0,  # B_0 [E, N_0, R] and out_0 [T, N_0]
    weight1_ptr, stride1_we, stride1_wn, out1_ptr, stride1_t, width1,
    weight2_ptr, stride2_we, stride2_wn, out2_ptr, stride2_t, width2,  # a copy of sibling 1's for S = 2
    stride_wr, stride_out_n,  # the siblings' common strides (1 for contiguous tensors: kept as constants)
    blocks0, blocks01,  # output column blocks of sibling 0, and of siblings 0 and 1 (all of them for S = 1, 2)
    weights_ptr, experts_ptr, scaling,  # GATE: every sibling's gates and ids [S, T, k]
    GATE: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Every sibling's out_s += gated_s @ B_s in one launch: the grid's column blocks run through sibling 0's
    output, then 1's, then 2's. Each program selects its sibling's addresses and sizes, then runs the one tile
    code (one copy of it, so the shared memory of one expand tile). GATE: the rows are ungated h, gated here by
    the sibling's own routing (the routing is computed after the shrink, from logits of the same pass)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    block = tl.program_id(1)
    second, third = block >= blocks0, block >= blocks01
    weight_ptr = tl.where(third, weight2_ptr, tl.where(second, weight1_ptr, weight0_ptr))
    stride_we = tl.where(third, stride2_we, tl.where(second, stride1_we, stride0_we))
    stride_wn = tl.where(third, stride2_wn, tl.where(second, stride1_wn, stride0_wn))
    out_ptr = tl.where(third, out2_ptr, tl.where(second, out1_ptr, out0_ptr))
    stride_out_t = tl.where(third, stride2_t, tl.where(second, stride1_t, stride0_t))
    width = tl.where(third, width2, tl.where(second, width1, width0))
    first_block = tl.where(third, blocks01, tl.where(second, blocks0, 0))
    sibling = tl.where(third, 2, tl.where(second, 1, 0))
    outs = (block - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
    slots = sibling * num_tokens * TOP_K
    _expand_tile(rows_ptr + sibling * num_columns, stride_rows, rows.to(tl.int64), row_ok, weight_ptr, stride_we,
                 stride_wn, stride_wr, out_ptr, stride_out_t, stride_out_n, rows, row_ok, outs, outs < width,
                 weights_ptr + slots, experts_ptr + slots, rank, num_columns, scaling, True, GATE, TOP_K, BLOCK_T,
                 BLOCK_N, BLOCK_K, DOT, PRECISION, ACC)


@triton.jit
def _dense_weight_grad_kernel(
    rows_ptr,  # [T, E*R] rank-space rows: grad_h (already gated), or h (gated here when GATE)
    weights_ptr, experts_ptr,  # [T, k], read only when GATE
    src_ptr, stride_src,  # [T, N]: x for dA, grad_y for dB
    partial_ptr,  # out [splits, E*R, N]
    index_ptr,  # GATHER: the row of rows_ptr ([num_sources, E*R]) each src row pairs with
    num_tokens, rank, width, num_columns, stride_rows, tokens_per_split, num_sources, scaling,
    GATE: tl.constexpr, GATHER: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < num_columns
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < width
    split = tl.program_id(2)
    first = split * tokens_per_split
    last = tl.minimum(first + tokens_per_split, num_tokens)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=ACC)
    # One program walks its token range in order: a fixed summation order, no atomics.
    for t0 in range(first, last, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < last
        source, source_ok = _source_rows(index_ptr, rows, row_ok, num_sources, GATHER)
        projected = tl.load(rows_ptr + source[:, None] * stride_rows + cols[None, :],
                            mask=source_ok[:, None] & col_ok[None, :], other=0.0)
        if GATE:
            gate, chosen = _gates(weights_ptr, experts_ptr, rows, row_ok, cols, rank, scaling, TOP_K, ACC)
            projected = tl.where(chosen, gate * projected, 0.0)
        src = tl.load(src_ptr + rows.to(tl.int64)[:, None] * stride_src + outs[None, :],
                      mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(projected.to(DOT)), src.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(partial_ptr + (split * num_columns + cols.to(tl.int64))[:, None] * width + outs[None, :], acc,
             mask=col_ok[:, None] & out_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def shrink_columns_block(num_columns: int) -> int:
    """All rank-space columns in one program up to MAX_SHRINK_COLUMNS, so x (or grad_y) is read once."""
    return min(MAX_SHRINK_COLUMNS, max(16, triton.next_power_of_2(num_columns)))


def token_splits(num_tokens: int, column_blocks: int, out_blocks: int) -> int:
    """Token splits of the weight gradients: enough programs to fill the GPU, never an empty split."""
    wanted = triton.cdiv(TARGET_PROGRAMS, max(1, column_blocks * out_blocks))
    return max(1, min(wanted, triton.cdiv(num_tokens, BLOCK_T)))


def plan_numel(num_tokens: int, top_k: int, num_experts: int) -> int:
    """The dense strategy keeps no routing plan between forward and backward."""
    return 0


def saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int) -> tuple[int, ...]:
    """h as kept for the backward: every expert's rank-space rows."""
    return (num_tokens, num_experts * rank)


def regate_saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int, num_rows: int) -> tuple[int, ...]:
    """The regated call keeps h whole: the rows read it in place."""
    return (num_tokens, num_experts * rank)


def _shrink(src, weight_view, weights, experts, scaling, rank, *, acc_dtype, dot, h=None, h_index=None, gated=None,
            siblings=1):
    """(h or None, gated rows, per-slot gate gradient or None, safe h_index or None): forward when `h` is None,
    backward otherwise; with `h_index` (backward only) src row i pairs with h row h_index[i]. `gated` (backward
    only): where to write the gated rows, a column block of a wider buffer with h's row stride. `siblings` > 1
    (forward only): weight_view stacks S siblings' experts and weights / experts are [S, T, k]."""
    num_tokens, depth = src.shape
    num_experts, top_k = weight_view.shape[0], experts.shape[-1]
    num_columns = num_experts * rank
    block_c = shrink_columns_block(num_columns)
    column_blocks = triton.cdiv(num_columns, block_c)
    backward = h is not None
    if gated is None:
        gated = empty((num_tokens, num_columns), acc_dtype, src.device)
    stride_rows = gated.stride(0)
    if backward and h.stride(0) != stride_rows:
        raise ValueError(f"h's row stride {h.stride(0)} differs from the gated rows' {stride_rows}")
    proj = gated if backward else empty((num_tokens, num_columns), acc_dtype, src.device)
    grad_gate = empty((column_blocks, num_tokens, top_k), acc_dtype, src.device) if backward else gated
    gather = h_index is not None
    safe_index = empty(h_index.shape, h_index.dtype, h_index.device) if gather else None
    _dense_shrink_kernel[(column_blocks, triton.cdiv(num_tokens, BLOCK_T))](
        src, src.stride(0), weight_view, *weight_view.stride(), weights, experts, proj, gated,
        h if backward else gated, grad_gate, h_index if gather else experts, safe_index if gather else experts,
        h.shape[0] if backward else num_tokens, num_tokens, rank, depth, num_columns, stride_rows, scaling,
        num_experts // siblings, BACKWARD=backward, GATHER=gather, TOP_K=top_k, SIBLINGS=siblings,
        BLOCK_T=BLOCK_T, BLOCK_C=block_c, BLOCK_D=BLOCK_D, **dot,
        num_warps=8 if block_c >= 128 else 4,
    )
    if backward:  # one column block (E*r <= 128, the usual case): its partial is the gradient, no reduction
        grad_gate = grad_gate[0] if column_blocks == 1 else grad_gate.sum(0)
    return (None if backward else proj), gated, (grad_gate if backward else None), safe_index


def _expand(rows, weight_view, out, rank, *, accumulate, dot, gather=None):
    """out (+)= rows @ W_cat, W viewed [E, N, R]; with `gather` = (index [n], weights [n, k], experts [n, k],
    scaling), out row i is the h row `rows[index[i]]` gated by its own weights and experts (zero for an index
    outside rows)."""
    num_tokens, width = out.shape
    index, weights, experts, scaling = gather if gather is not None else (rows, rows, rows, 1.0)
    _dense_expand_kernel[(triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(width, BLOCK_N))](
        rows, weight_view, *weight_view.stride(), out, out.stride(0), out.stride(1), index, weights, experts,
        num_tokens, rank, width, rows.shape[1], rows.stride(0), rows.shape[0], scaling,
        ACCUMULATE=accumulate, GATHER=gather is not None, TOP_K=experts.shape[1] if gather is not None else 1,
        # Gathered rows gate in the loop: half-width column steps and 8 warps keep the gate tiles beside the
        # accumulator in registers (no spills at k = 4); those rows are few (the picked tokens).
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K // 2 if gather is not None else BLOCK_K, **dot,
        num_warps=8 if gather is not None else 4,
    )


MAX_SIBLINGS_PER_EXPAND = 3  # q/k/v: the sibling expand kernel takes up to three (weight, output) sets


def sibling_expand_applies(lora_b: list, outs: list) -> bool:
    """Whether one `_dense_sibling_expand_kernel` launch serves these siblings: up to three, whose outputs share
    a column stride and whose B share a rank stride (the model's: contiguous)."""
    return (1 <= len(lora_b) <= MAX_SIBLINGS_PER_EXPAND and len({b.stride(2) for b in lora_b}) == 1
            and len({out.stride(1) for out in outs}) == 1)


def _sibling_expand(gated, lora_b: list, outs: list, rank: int, *, dot, gates=None) -> None:
    """outs[s] += gated[:, s*E*R:(s+1)*E*R] @ B_s for every sibling: one launch where
    `sibling_expand_applies`, else one each. `gates` = (weights [S, T, k], experts [S, T, k], scaling): the rows
    are ungated h, gated in the kernel (only where `sibling_expand_applies`)."""
    siblings = len(lora_b)
    num_tokens = gated.shape[0]
    width = gated.shape[1] // siblings
    if not sibling_expand_applies(lora_b, outs):
        if gates is not None:
            raise ValueError("gated sibling expand needs up to 3 siblings with common B and output strides")
        for sibling, (b, out) in enumerate(zip(lora_b, outs)):
            _expand(gated[:, sibling * width:(sibling + 1) * width], b, out, rank, accumulate=True, dot=dot)
        return
    blocks = [triton.cdiv(out.shape[1], BLOCK_N) for out in outs]
    sets = []
    padding = MAX_SIBLINGS_PER_EXPAND - siblings  # the last sibling again stands in for the missing (never read)
    for b, out in zip([*lora_b, *[lora_b[-1]] * padding], [*outs, *[outs[-1]] * padding]):
        sets += [b, b.stride(0), b.stride(1), out, out.stride(0), out.shape[1]]
    weights, experts, scaling = gates if gates is not None else (gated, gated, 1.0)
    _dense_sibling_expand_kernel[(triton.cdiv(num_tokens, BLOCK_T), sum(blocks))](
        gated, gated.stride(0), num_tokens, rank, width, *sets, lora_b[0].stride(2), outs[0].stride(1),
        blocks[0], sum(blocks[:2]), weights, experts, scaling, GATE=gates is not None,
        TOP_K=experts.shape[-1] if gates is not None else 1, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
        # Gating in the loop: half-width column steps and 8 warps, as the gathered expand (no register spills).
        BLOCK_K=BLOCK_K // 2 if gates is not None else BLOCK_K, **dot, num_warps=8 if gates is not None else 4,
    )


def _weight_grad(rows, src, weights, experts, scaling, rank, *, gate, acc_dtype, dot, rows_index=None):
    """[E*R, N] = (gated rows)^T @ src, summed over token splits in a fixed order; with `rows_index`, src row i
    pairs with rows[rows_index[i]] (zeros for an index outside rows)."""
    num_tokens, width = src.shape
    num_columns = rows.shape[1]
    grid_cols, grid_outs = triton.cdiv(num_columns, BLOCK_K), triton.cdiv(width, BLOCK_N)
    splits = token_splits(num_tokens, grid_cols, grid_outs)
    tokens_per_split = triton.cdiv(triton.cdiv(num_tokens, splits), BLOCK_T) * BLOCK_T
    splits = triton.cdiv(num_tokens, tokens_per_split)
    partial = empty((splits, num_columns, width), acc_dtype, src.device)
    gather = rows_index is not None
    _dense_weight_grad_kernel[(grid_cols, grid_outs, splits)](
        rows, weights, experts, src, src.stride(0), partial, rows_index if gather else experts,
        num_tokens, rank, width, num_columns, rows.stride(0), tokens_per_split, rows.shape[0], scaling,
        GATE=gate, GATHER=gather, TOP_K=experts.shape[1], BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, **dot,
    )
    return partial[0] if splits == 1 else partial.sum(0)


def _forward(x, lora_a, lora_b, weights, experts, scaling, out, *, accumulate):
    num_tokens = x.shape[0]
    num_experts, rank, _ = lora_a.shape
    acc_dtype = compute_dtype(x.dtype)
    dot = dot_config(x.dtype, acc_dtype)
    if num_tokens == 0:
        return torch.zeros(0, num_experts * rank, dtype=acc_dtype, device=x.device)
    h, gated, _, _ = _shrink(x, lora_a, weights, experts, scaling, rank, acc_dtype=acc_dtype, dot=dot)
    _expand(gated, lora_b, out, rank, accumulate=accumulate, dot=dot)
    return h


def _no_plan(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=x.device)


def forward(x, lora_a, lora_b, weights, experts, scaling: float):
    """Returns (y [T, d_out] in x's dtype, h [T, E*r] in the compute dtype, an empty plan)."""
    y = empty((x.shape[0], lora_b.shape[1]), x.dtype, x.device)
    return y, _forward(x, lora_a, lora_b, weights, experts, scaling, y, accumulate=False), _no_plan(x)


def forward_into(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor):
    """Adds y into `out` (any strides) in the expand's epilogue; returns (h, plan)."""
    return _forward(x, lora_a, lora_b, weights, experts, scaling, out, accumulate=True), _no_plan(x)


def regate_forward(x, lora_a, lora_b, weights, experts, scaling: float, out, accumulate: bool, rows, rows_weights,
                   rows_experts):
    """The call into `out` (added, or written when not `accumulate`), and the regated rows from the same h:
    y2[i] = (s * g2_i ⊙ h[rows[i]]) @ B_cat with g2 from (rows_weights, rows_experts): one more expand, no
    second read of x. Returns (y2 [m, d_out] in x's dtype, h)."""
    h = _forward(x, lora_a, lora_b, weights, experts, scaling, out, accumulate=accumulate)
    y2 = empty((rows.shape[0], lora_b.shape[1]), x.dtype, x.device)
    if rows.shape[0]:
        dot = dot_config(x.dtype, h.dtype)
        _expand(h, lora_b, y2, lora_a.shape[1], accumulate=False, dot=dot,
                gather=(rows, rows_weights, rows_experts, scaling))
    return y2, h


def backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling: float):
    return _backward(grad_y, x, lora_a, lora_b, weights, experts, h, scaling)[:4]


def regate_backward(grad_y, grad_rows, x, lora_a, lora_b, weights, experts, h, rows, rows_weights, rows_experts,
                    scaling: float):
    """(grad x, grad A, grad B, grad weights, grad rows_weights). The regated rows' rank-space gradient is added
    into the call's before its dx and dA products, so they cost no pass of their own over x or d_in."""
    return _backward(grad_y, x, lora_a, lora_b, weights, experts, h, scaling,
                     regate=(grad_rows, rows, rows_weights, rows_experts))


def _backward(grad_y, x, lora_a, lora_b, weights, experts, h, scaling, regate=None):
    num_tokens, top_k = experts.shape
    num_experts, rank, d_in = lora_a.shape
    regated = regate is not None and regate[1].shape[0] > 0 and num_tokens > 0
    # The regated rows' weights get a zero gradient when there is no row, or no h row to regate (T = 0).
    grad_rows_weights = torch.zeros_like(regate[2]) if regate is not None and not regated else None
    if num_tokens == 0:  # no h row exists, so the regated rows are zero too
        return (torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b), torch.zeros_like(weights),
                grad_rows_weights)
    acc_dtype = h.dtype
    dot = dot_config(x.dtype, acc_dtype)
    b_transposed = lora_b.transpose(1, 2)
    _, grad_h, grad_gate, _ = _shrink(grad_y, b_transposed, weights, experts, scaling, rank,
                                      acc_dtype=acc_dtype, dot=dot, h=h)
    grad_b = _weight_grad(h, grad_y, weights, experts, scaling, rank, gate=True, acc_dtype=acc_dtype, dot=dot)
    if regated:
        grad_rows, rows, rows_weights, rows_experts = regate
        _, grad_h_rows, grad_rows_weights, safe_rows = _shrink(
            grad_rows, b_transposed, rows_weights, rows_experts, scaling, rank, acc_dtype=acc_dtype, dot=dot, h=h,
            h_index=rows)
        # Deterministic: index_put_ with accumulate sorts the indices (rows may repeat).
        grad_h.index_put_((safe_rows,), grad_h_rows, accumulate=True)
        grad_b = grad_b + _weight_grad(h, grad_rows, rows_weights, rows_experts, scaling, rank, gate=True,
                                       acc_dtype=acc_dtype, dot=dot, rows_index=rows)
        grad_rows_weights = grad_rows_weights.to(rows_weights.dtype)
    grad_x = empty((num_tokens, d_in), x.dtype, x.device)
    _expand(grad_h, lora_a.transpose(1, 2), grad_x, rank, accumulate=False, dot=dot)
    grad_a = _weight_grad(grad_h, x, weights, experts, scaling, rank, gate=False, acc_dtype=acc_dtype, dot=dot)
    return (grad_x, grad_a.view(lora_a.shape).to(lora_a.dtype),
            grad_b.view(num_experts, rank, -1).transpose(1, 2).to(lora_b.dtype).contiguous(),
            grad_gate.to(weights.dtype), grad_rows_weights)
