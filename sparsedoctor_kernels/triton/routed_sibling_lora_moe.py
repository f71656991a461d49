"""`routed_sibling_lora_moe` on Triton: up to three projections that read one x (q/k/v, gate/up, or one alone)
routed and computed from one pass over x, three launches forward and three backward for the whole group.

Per call, T tokens, S siblings of widths d_s, W = E*r rank-space columns per sibling, k slots (bytes of the
compute dtype b, fp32 rank-space rows):
- forward:
  1. `_group_shrink_kernel`: h = dropout(x) @ [A_1..A_S]^T ([T, S*W] fp32) and logits = x @ [R_1..R_S]^T
     ([S, T, E]); x read once from memory (the S*W/BLOCK_C column programs of a token tile run side by side
     and share it in L2), dropout drawn in the kernel (Philox, from a seed tensor: no mask in memory).
     Bytes ~ T*d_in*b + 4*T*S*W; FLOPs 2*T*d_in*S*(W + E).
  2. `route` on the [S, T, E] logits (one launch up to 512 tokens).
  3. `_dense_sibling_expand_kernel`: out_s += (s * g_s ⊙ h_s) @ B_s, gates selected in from the routing; each
     out_s read and written once. Bytes ~ 4*T*S*W + 2*T*sum(d_s)*b; FLOPs 2*T*W*sum(d_s).
- backward:
  1. `_group_grad_out_kernel`, two kinds of programs in one launch: grad_h_s = s * g_s ⊙ (grad_y_s @ B_s^T)
     with the gate gradients s <u_e, h_e>, and dB_s = (s * g_s ⊙ h_s)^T grad_y_s; grad_y_s read twice.
  2. `route`'s backward (the logits' own incoming gradient, such as the router term's, added in the kernel).
  3. `_group_grad_in_kernel`, two kinds of programs: dx = dropout'(sum_s grad_h_s @ A_s) + sum_s dlogits_s @ R_s
     (written once) and dA_s = grad_h_s^T dropout(x), dR_s = dlogits_s^T x (x read once more).
  Weight gradients walk their tokens in order per program (partials over token splits summed in a fixed
  order): deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.triton import routing
from sparsedoctor_kernels.triton._dtypes import dot_config
from sparsedoctor_kernels.triton.lora_moe_dense import (
    BLOCK_D,
    BLOCK_K,
    BLOCK_N,
    BLOCK_T,
    _gates,
    _sibling_expand,
    shrink_columns_block,
    sibling_expand_applies,
    token_splits,
)

MAX_SIBLINGS = 3  # the kernels select among three sets of addresses
MAX_EXPERTS = 64  # one tile of router columns: every expert's logit of a token in one program


@triton.jit
def _pick(sibling, value0, value1, value2):
    """Sibling 0's, 1's or 2's value (addresses or sizes): a program selects its sibling's in registers."""
    return tl.where(sibling == 2, value2, tl.where(sibling == 1, value1, value0))


@triton.jit
def _sibling_grad_y(sibling, g0_ptr, g1_ptr, g2_ptr, stride_g0, stride_g1, stride_g2, width0, width1, width2):
    """(address, row stride, width) of the sibling's grad_y."""
    return (_pick(sibling, g0_ptr, g1_ptr, g2_ptr), _pick(sibling, stride_g0, stride_g1, stride_g2),
            _pick(sibling, width0, width1, width2))


@triton.jit
def _dropout(x, seed_ptr, rows, depths, depth, p, scale, DROPOUT: tl.constexpr):
    """x's [rows, depths] tile with the call's dropout: element (t, d) kept where Philox(seed, t * depth + d)
    >= p, then scaled by 1 / (1 - p). The backward redraws the same numbers."""
    if DROPOUT:
        # Philox's 32-bit counter: the mask's numbers repeat past 2^32 elements of x (4.3e9: a million tokens of
        # 4096 features), as torch's own 32-bit offsets would.
        offsets = (rows.to(tl.int64)[:, None] * depth + depths[None, :]).to(tl.int32)
        keep = tl.rand(tl.load(seed_ptr), offsets) >= p
        if x.dtype == tl.float64:
            return tl.where(keep, x * scale, 0.0)
        return tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)  # one return type for both branches
    return x


@triton.jit
def _group_shrink_kernel(
    x_ptr, stride_x, seed_ptr, p, scale,
    a0_ptr, a1_ptr, a2_ptr, stride_ae, stride_ar, stride_ad,  # A_s [E, R, D]
    r0_ptr, r1_ptr, r2_ptr, stride_re, stride_rd,  # routers R_s [E, D]
    h_ptr, stride_h, logits_ptr,  # out: h [T, S*W] (sibling s's columns from s*W), logits [S, T, E] contiguous
    num_tokens, depth, rank, width, num_experts, column_blocks,
    DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # A sibling's column blocks, then the next sibling's, vary fastest: programs of one token tile run together.
    pid_c = tl.program_id(0)
    sibling = pid_c // column_blocks
    block = pid_c % column_blocks
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < width
    a_cols = (_pick(sibling, a0_ptr, a1_ptr, a2_ptr) + (cols // rank).to(tl.int64) * stride_ae
              + (cols % rank) * stride_ar)
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < tl.where(block == 0, num_experts, 0)  # the sibling's first block computes its logits
    router_rows = _pick(sibling, r0_ptr, r1_ptr, r2_ptr) + experts.to(tl.int64) * stride_re
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
    logits = tl.zeros([BLOCK_T, BLOCK_E], dtype=ACC)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    for d0 in range(0, depth, BLOCK_D):
        depths = d0 + tl.arange(0, BLOCK_D)
        depth_ok = depths < depth
        x = tl.load(x_rows + depths[None, :], mask=row_ok[:, None] & depth_ok[None, :], other=0.0)
        router = tl.load(router_rows[None, :] + depths[:, None] * stride_rd,
                         mask=depth_ok[:, None] & expert_ok[None, :], other=0.0)
        logits = tl.dot(x.to(DOT), router.to(DOT), logits, input_precision=PRECISION, out_dtype=ACC)
        a = tl.load(a_cols[None, :] + depths[:, None] * stride_ad, mask=depth_ok[:, None] & col_ok[None, :],
                    other=0.0)
        dropped = _dropout(x, seed_ptr, rows, depths, depth, p, scale, DROPOUT)
        acc = tl.dot(dropped.to(DOT), a.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_h + sibling * width + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])
    logit_rows = (sibling * num_tokens + rows).to(tl.int64) * num_experts
    tl.store(logits_ptr + logit_rows[:, None] + experts[None, :], logits.to(logits_ptr.dtype.element_ty),
             mask=row_ok[:, None] & expert_ok[None, :])


@triton.jit
def _grad_h_program(
    pid, g0_ptr, g1_ptr, g2_ptr, stride_g0, stride_g1, stride_g2, b0_ptr, b1_ptr, b2_ptr, stride_be0, stride_be1,
    stride_be2, stride_bn, stride_br, width0, width1, width2, weights_ptr, experts_ptr, h_ptr, stride_h, grad_h_ptr,
    grad_gate_ptr, num_tokens, rank, width, num_experts, column_blocks, token_tiles, scaling,
    SIBLINGS: tl.constexpr, OWNER: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """grad_h and the gate gradients of one (sibling, column block, token tile)."""
    tile = pid % token_tiles
    block = (pid // token_tiles) % column_blocks
    sibling = pid // (token_tiles * column_blocks)
    grad_y, stride_g, out_width = _sibling_grad_y(sibling, g0_ptr, g1_ptr, g2_ptr, stride_g0, stride_g1, stride_g2,
                                                  width0, width1, width2)
    rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < width
    b_cols = (_pick(sibling, b0_ptr, b1_ptr, b2_ptr)
              + (cols // rank).to(tl.int64) * _pick(sibling, stride_be0, stride_be1, stride_be2)
              + (cols % rank) * stride_br)
    u = tl.zeros([BLOCK_T, BLOCK_C], dtype=ACC)
    grad_rows = grad_y + rows.to(tl.int64)[:, None] * stride_g
    for n0 in range(0, out_width, BLOCK_D):
        outs = n0 + tl.arange(0, BLOCK_D)
        out_ok = outs < out_width
        g = tl.load(grad_rows + outs[None, :], mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        b = tl.load(b_cols[None, :] + outs[:, None] * stride_bn, mask=out_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.dot(g.to(DOT), b.to(DOT), u, input_precision=PRECISION, out_dtype=ACC)
    slots = sibling * num_tokens * TOP_K
    gate, chosen = _gates(weights_ptr + slots, experts_ptr + slots, rows, row_ok, cols, rank, scaling, TOP_K, ACC)
    offsets = rows.to(tl.int64)[:, None] * stride_h + sibling * width + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(grad_h_ptr + offsets, tl.where(chosen, gate * u, 0.0), mask=mask)
    u_h = tl.where(chosen, u * tl.load(h_ptr + offsets, mask=mask, other=0.0), 0.0)
    column_expert = (cols // rank).to(tl.int64)
    for slot in tl.static_range(TOP_K):
        expert = tl.load(experts_ptr + slots + rows * TOP_K + slot, mask=row_ok, other=-1).to(tl.int64)
        partial = tl.sum(tl.where(expert[:, None] == column_expert[None, :], u_h, 0.0), axis=1) * scaling
        if OWNER:  # the expert's columns lie in one block: that block writes the slot (block 0 a bad id's 0)
            bad = (expert < 0) | (expert >= num_experts)
            owner = tl.where(bad, 0, expert * rank // BLOCK_C)
            tl.store(grad_gate_ptr + slots + rows * TOP_K + slot, partial, mask=row_ok & (owner == block))
        else:
            tl.store(grad_gate_ptr + (block * SIBLINGS * num_tokens * TOP_K) + slots + rows * TOP_K + slot,
                     partial, mask=row_ok)


@triton.jit
def _grad_b_program(
    q, g0_ptr, g1_ptr, g2_ptr, stride_g0, stride_g1, stride_g2, width0, width1, width2, weights_ptr, experts_ptr,
    h_ptr, stride_h, grad_b_ptr, grad_b_numel, grad_b_base1, grad_b_base2, num_tokens, rank, width, rank_blocks,
    out_blocks0, out_blocks1, out_blocks2, splits, tokens_per_split, scaling,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dB of one (sibling, rank-column block, output block, token split)."""
    per0 = rank_blocks * out_blocks0 * splits
    per1 = rank_blocks * out_blocks1 * splits
    sibling = tl.where(q >= per0 + per1, 2, tl.where(q >= per0, 1, 0))
    q -= _pick(sibling, 0, per0, per0 + per1)
    out_blocks = _pick(sibling, out_blocks0, out_blocks1, out_blocks2)
    split = q % splits
    out_block = (q // splits) % out_blocks
    rank_block = q // (splits * out_blocks)
    grad_y, stride_g, out_width = _sibling_grad_y(sibling, g0_ptr, g1_ptr, g2_ptr, stride_g0, stride_g1, stride_g2,
                                                  width0, width1, width2)
    cols = rank_block * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < width
    outs = out_block * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ok = outs < out_width
    slots = sibling * num_tokens * TOP_K
    first_token = split * tokens_per_split
    last_token = tl.minimum(first_token + tokens_per_split, num_tokens)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=ACC)
    for t0 in range(first_token, last_token, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < last_token
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + sibling * width + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        gate, chosen = _gates(weights_ptr + slots, experts_ptr + slots, rows, row_ok, cols, rank, scaling, TOP_K, ACC)
        gated = tl.where(chosen, gate * h, 0.0)
        g = tl.load(grad_y + rows.to(tl.int64)[:, None] * stride_g + outs[None, :],
                    mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(gated.to(DOT)), g.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    base = split.to(tl.int64) * grad_b_numel + _pick(sibling, 0, grad_b_base1, grad_b_base2)
    offsets = ((cols // rank).to(tl.int64) * out_width * rank + cols % rank)[:, None] + outs[None, :] * rank
    tl.store(grad_b_ptr + base + offsets, acc, mask=col_ok[:, None] & out_ok[None, :])


@triton.jit
def _group_grad_out_kernel(
    g0_ptr, g1_ptr, g2_ptr, stride_g0, stride_g1, stride_g2,  # grad_y_s [T, d_s]
    b0_ptr, b1_ptr, b2_ptr, stride_be0, stride_be1, stride_be2, stride_bn, stride_br,  # B_s [E, d_s, R]
    width0, width1, width2,  # d_s
    weights_ptr, experts_ptr, h_ptr, stride_h,  # [S, T, k] gates and ids, h [T, S*W]
    grad_h_ptr, grad_gate_ptr,  # out: [T, S*W]; [S, T, k] (OWNER) or partials [column blocks, S, T, k]
    grad_b_ptr, grad_b_numel, grad_b_base1, grad_b_base2,  # out: [splits, numel], sibling s's [E, d_s, R] at base_s
    num_tokens, rank, width, num_experts, column_blocks, token_tiles, shrink_programs,
    rank_blocks, out_blocks0, out_blocks1, out_blocks2, splits, tokens_per_split, scaling,
    SIBLINGS: tl.constexpr, OWNER: tl.constexpr, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Two kinds of programs in one launch: the first `shrink_programs` compute grad_h and the gate gradients,
    the rest dB (each kind in its own function, so the two share no values)."""
    pid = tl.program_id(0)
    if pid < shrink_programs:
        _grad_h_program(pid, g0_ptr, g1_ptr, g2_ptr, stride_g0, stride_g1, stride_g2, b0_ptr, b1_ptr, b2_ptr,
                        stride_be0, stride_be1, stride_be2, stride_bn, stride_br, width0, width1, width2, weights_ptr,
                        experts_ptr, h_ptr, stride_h, grad_h_ptr, grad_gate_ptr, num_tokens, rank, width,
                        num_experts, column_blocks, token_tiles, scaling, SIBLINGS, OWNER, TOP_K, BLOCK_T, BLOCK_C,
                        BLOCK_D, DOT, PRECISION, ACC)
    else:
        _grad_b_program(pid - shrink_programs, g0_ptr, g1_ptr, g2_ptr, stride_g0, stride_g1, stride_g2, width0,
                        width1, width2, weights_ptr, experts_ptr, h_ptr, stride_h, grad_b_ptr, grad_b_numel,
                        grad_b_base1, grad_b_base2, num_tokens, rank, width, rank_blocks, out_blocks0, out_blocks1,
                        out_blocks2, splits, tokens_per_split, scaling, TOP_K, BLOCK_T, BLOCK_K, BLOCK_N, DOT,
                        PRECISION, ACC)


@triton.jit
def _grad_x_program(
    pid, grad_h_ptr, stride_h, grad_logits_ptr, seed_ptr, p, scale, a0_ptr, a1_ptr, a2_ptr, stride_ae, stride_ar,
    stride_ad, r0_ptr, r1_ptr, r2_ptr, stride_re, stride_rd, grad_x_ptr, stride_gx, num_tokens, depth, rank, width,
    num_experts, depth_blocks,
    SIBLINGS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dx of one [token tile, depth block]: every sibling's rank-space and logit gradients summed."""
    rows = (pid // depth_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    depths = (pid % depth_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    depth_ok = depths < depth
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=ACC)
    for sibling in tl.static_range(SIBLINGS):
        a_ptr = _pick(sibling, a0_ptr, a1_ptr, a2_ptr)
        for c0 in range(0, width, BLOCK_K):
            cols = c0 + tl.arange(0, BLOCK_K)
            col_ok = cols < width
            grad_h = tl.load(grad_h_ptr + rows.to(tl.int64)[:, None] * stride_h + sibling * width + cols[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            a = tl.load(a_ptr + ((cols // rank).to(tl.int64) * stride_ae + (cols % rank) * stride_ar)[:, None]
                        + depths[None, :] * stride_ad, mask=col_ok[:, None] & depth_ok[None, :], other=0.0)
            acc = tl.dot(grad_h.to(DOT), a.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    acc = _dropout(acc, seed_ptr, rows, depths, depth, p, scale, DROPOUT)
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    for sibling in tl.static_range(SIBLINGS):
        logit_rows = (sibling * num_tokens + rows).to(tl.int64) * num_experts
        grad_logits = tl.load(grad_logits_ptr + logit_rows[:, None] + experts[None, :],
                              mask=row_ok[:, None] & expert_ok[None, :], other=0.0)
        router = tl.load(_pick(sibling, r0_ptr, r1_ptr, r2_ptr) + experts.to(tl.int64)[:, None] * stride_re
                         + depths[None, :] * stride_rd, mask=expert_ok[:, None] & depth_ok[None, :], other=0.0)
        acc = tl.dot(grad_logits.to(DOT), router.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(grad_x_ptr + rows.to(tl.int64)[:, None] * stride_gx + depths[None, :],
             acc.to(grad_x_ptr.dtype.element_ty), mask=row_ok[:, None] & depth_ok[None, :])


@triton.jit
def _grad_weights_program(
    q, grad_h_ptr, stride_h, grad_logits_ptr, x_ptr, stride_x, seed_ptr, p, scale, grad_w_ptr, grad_w_numel,
    num_tokens, depth, rank, width, num_experts, depth_blocks, rank_blocks, splits, tokens_per_split,
    SIBLINGS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dA (and, in a sibling's first block, dR) of one (sibling, rank-column block, depth block, token split)."""
    split = q % splits
    depth_block = (q // splits) % depth_blocks
    rank_block = (q // (splits * depth_blocks)) % rank_blocks
    sibling = q // (splits * depth_blocks * rank_blocks)
    cols = rank_block * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < width
    depths = depth_block * BLOCK_N + tl.arange(0, BLOCK_N)
    depth_ok = depths < depth
    experts = tl.arange(0, BLOCK_E)
    expert_ok = experts < tl.where(rank_block == 0, num_experts, 0)
    first_token = split * tokens_per_split
    last_token = tl.minimum(first_token + tokens_per_split, num_tokens)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=ACC)
    acc_router = tl.zeros([BLOCK_E, BLOCK_N], dtype=ACC)
    for t0 in range(first_token, last_token, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < last_token
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + depths[None, :],
                    mask=row_ok[:, None] & depth_ok[None, :], other=0.0)
        logit_rows = (sibling * num_tokens + rows).to(tl.int64) * num_experts
        grad_logits = tl.load(grad_logits_ptr + logit_rows[:, None] + experts[None, :],
                              mask=row_ok[:, None] & expert_ok[None, :], other=0.0)
        acc_router = tl.dot(tl.trans(grad_logits.to(DOT)), x.to(DOT), acc_router, input_precision=PRECISION,
                            out_dtype=ACC)
        grad_h = tl.load(grad_h_ptr + rows.to(tl.int64)[:, None] * stride_h + sibling * width + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        dropped = _dropout(x, seed_ptr, rows, depths, depth, p, scale, DROPOUT)
        acc = tl.dot(tl.trans(grad_h.to(DOT)), dropped.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    base = grad_w_ptr + split.to(tl.int64) * grad_w_numel
    tl.store(base + (sibling * width + cols).to(tl.int64)[:, None] * depth + depths[None, :], acc,
             mask=col_ok[:, None] & depth_ok[None, :])
    router_rows = (SIBLINGS * width + sibling * num_experts + experts).to(tl.int64)
    tl.store(base + router_rows[:, None] * depth + depths[None, :], acc_router,
             mask=expert_ok[:, None] & depth_ok[None, :])


@triton.jit
def _group_grad_in_kernel(
    grad_h_ptr, stride_h, grad_logits_ptr,  # [T, S*W]; [S, T, E] contiguous
    x_ptr, stride_x, seed_ptr, p, scale,
    a0_ptr, a1_ptr, a2_ptr, stride_ae, stride_ar, stride_ad,  # A_s [E, R, D]
    r0_ptr, r1_ptr, r2_ptr, stride_re, stride_rd,  # routers R_s [E, D]
    grad_x_ptr, stride_gx,  # out [T, D] in x's dtype
    grad_w_ptr, grad_w_numel,  # out [splits, numel]: dA as [S*W, D], then dR as [S*E, D]
    num_tokens, depth, rank, width, num_experts, depth_blocks, dx_programs, rank_blocks, splits, tokens_per_split,
    SIBLINGS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Two kinds of programs in one launch: the first `dx_programs` compute dx, the rest dA and dR."""
    pid = tl.program_id(0)
    if pid < dx_programs:
        _grad_x_program(pid, grad_h_ptr, stride_h, grad_logits_ptr, seed_ptr, p, scale, a0_ptr, a1_ptr, a2_ptr,
                        stride_ae, stride_ar, stride_ad, r0_ptr, r1_ptr, r2_ptr, stride_re, stride_rd, grad_x_ptr,
                        stride_gx, num_tokens, depth, rank, width, num_experts, depth_blocks, SIBLINGS, DROPOUT,
                        BLOCK_T, BLOCK_N, BLOCK_K, BLOCK_E, DOT, PRECISION, ACC)
    else:
        _grad_weights_program(pid - dx_programs, grad_h_ptr, stride_h, grad_logits_ptr, x_ptr, stride_x, seed_ptr,
                              p, scale, grad_w_ptr, grad_w_numel, num_tokens, depth, rank, width, num_experts,
                              depth_blocks, rank_blocks, splits, tokens_per_split, SIBLINGS, DROPOUT, BLOCK_T,
                              BLOCK_N, BLOCK_K, BLOCK_E, DOT, PRECISION, ACC)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def applies(siblings: int, num_experts: int, lora_b: list, outs: list) -> bool:
    """Whether these kernels take the call: up to MAX_SIBLINGS siblings, E up to MAX_EXPERTS, and the siblings'
    B and outputs laid out alike (the sibling expand's condition)."""
    return 1 <= siblings <= MAX_SIBLINGS and num_experts <= MAX_EXPERTS and sibling_expand_applies(lora_b, outs)


def _three(values: list) -> list:
    """Three entries for the kernels' three address sets: the last sibling's repeated (never selected)."""
    return [*values, *[values[-1]] * (MAX_SIBLINGS - len(values))]


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _router_block(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def forward_into(x, routers: list, lora_a: list, lora_b: list, top_k: int, scaling: float, p: float, seed,
                 renormalize: bool, token_mask, outs: list):
    """Adds every sibling's experts into its out; returns (logits [S, T, E] in x's dtype, weights, experts, counts,
    probs_mean (the routing of [S, T, E], fields with the leading S), h [T, S*W] in the compute dtype)."""
    siblings = len(lora_a)
    num_tokens, depth = x.shape
    num_experts, rank, _ = lora_a[0].shape
    width = num_experts * rank
    acc_dtype = compute_dtype(x.dtype)
    dot = dot_config(x.dtype, acc_dtype)
    h = empty((num_tokens, siblings * width), acc_dtype, x.device)
    logits = empty((siblings, num_tokens, num_experts), x.dtype, x.device)
    if num_tokens > 0:
        block_c = shrink_columns_block(width)
        column_blocks = triton.cdiv(width, block_c)
        _group_shrink_kernel[(siblings * column_blocks, triton.cdiv(num_tokens, BLOCK_T))](
            x, x.stride(0), seed, p, _dropout_scale(p), *_three(lora_a), *lora_a[0].stride(), *_three(routers),
            *routers[0].stride(), h, h.stride(0), logits, num_tokens, depth, rank, width, num_experts, column_blocks,
            DROPOUT=p > 0, BLOCK_T=BLOCK_T, BLOCK_C=block_c, BLOCK_E=_router_block(num_experts), BLOCK_D=BLOCK_D,
            **dot, num_warps=8 if block_c >= 128 else 4,
        )
    weights, experts, counts, probs_mean = routing.forward(logits, top_k, renormalize, token_mask)
    if num_tokens > 0:
        _sibling_expand(h, lora_b, outs, rank, dot=dot, gates=(weights, experts, float(scaling)))
    return logits, weights, experts, counts, probs_mean, h


def backward(grad_ys: list, grad_logits, grad_weights, grad_probs_mean, x, routers: list, lora_a: list,
             lora_b: list, logits, weights, experts, h, seed, p: float, scaling: float, renormalize: bool,
             token_mask) -> list:
    """[grad x, the weight gradients as one flat buffer (dA of every sibling as [S, E, r, d_in], then dR as
    [S, E, d_in]), dB as one flat buffer (each sibling's [E, d_out_s, r] in turn)], in the compute dtype but x's
    (`split_gradients` views them per parameter). `grad_logits` / `grad_weights`: the logits' and the gates'
    own incoming gradients (None when nothing else used them); `grad_probs_mean` the balance term's."""
    siblings = len(lora_a)
    num_tokens, depth = x.shape
    num_experts, rank, _ = lora_a[0].shape
    width = num_experts * rank
    top_k = experts.shape[-1]
    acc_dtype = h.dtype
    if num_tokens == 0:
        return [torch.zeros_like(x), torch.zeros(siblings * (width + num_experts) * depth, dtype=acc_dtype,
                                                 device=x.device),
                torch.zeros(sum(b.numel() for b in lora_b), dtype=acc_dtype, device=x.device)]
    dot = dot_config(x.dtype, acc_dtype)
    widths = [b.shape[1] for b in lora_b]
    # 1. grad_h, gate gradients and dB.
    block_c = shrink_columns_block(width)
    column_blocks = triton.cdiv(width, block_c)
    owner = column_blocks == 1 or block_c % rank == 0
    token_tiles = triton.cdiv(num_tokens, BLOCK_T)
    shrink_programs = siblings * column_blocks * token_tiles
    rank_blocks = triton.cdiv(width, BLOCK_K)
    out_blocks = [triton.cdiv(w, BLOCK_N) for w in widths]
    splits, tokens_per_split = _splits(num_tokens, rank_blocks * siblings, max(out_blocks))
    grad_b_sizes = [num_experts * w * rank for w in widths]
    grad_b_numel = sum(grad_b_sizes)
    grad_b_flat = empty((splits, grad_b_numel), acc_dtype, x.device)
    grad_h = empty(h.shape, acc_dtype, x.device)
    grad_gate = empty((siblings, num_tokens, top_k) if owner else (column_blocks, siblings, num_tokens, top_k),
                      acc_dtype, x.device)
    strides_be = [b.stride(0) for b in lora_b]
    _group_grad_out_kernel[(shrink_programs + rank_blocks * sum(out_blocks) * splits,)](
        *_three(grad_ys), *_three([g.stride(0) for g in grad_ys]), *_three(lora_b), *_three(strides_be),
        lora_b[0].stride(1), lora_b[0].stride(2), *_three(widths), weights, experts, h, h.stride(0), grad_h, grad_gate,
        grad_b_flat, grad_b_numel, grad_b_sizes[0], sum(grad_b_sizes[:2]), num_tokens, rank, width, num_experts,
        column_blocks, token_tiles, shrink_programs, rank_blocks, *_three(out_blocks), splits, tokens_per_split,
        float(scaling), SIBLINGS=siblings, OWNER=owner, TOP_K=top_k, BLOCK_T=BLOCK_T, BLOCK_C=block_c,
        BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, **dot, num_warps=8 if block_c >= 128 else 4,
    )
    if not owner:
        grad_gate = grad_gate.sum(0)
    if grad_weights is not None:
        grad_gate = grad_gate + grad_weights
    if grad_probs_mean is None:
        grad_probs_mean = torch.zeros(siblings, num_experts, dtype=acc_dtype, device=x.device)
    # 2. The routing's backward, the logits' own gradient added in.
    grad_logits = routing.backward(grad_gate, grad_probs_mean.contiguous(), logits, experts, renormalize,
                                   token_mask, extra=grad_logits)
    # 3. dx, dA and dR.
    depth_blocks = triton.cdiv(depth, BLOCK_N)
    dx_programs = token_tiles * depth_blocks
    w_splits, w_tokens_per_split = _splits(num_tokens, rank_blocks * siblings, depth_blocks)
    grad_w_numel = siblings * (width + num_experts) * depth
    grad_w_flat = empty((w_splits, grad_w_numel), acc_dtype, x.device)
    grad_x = empty((num_tokens, depth), x.dtype, x.device)
    _group_grad_in_kernel[(dx_programs + siblings * rank_blocks * depth_blocks * w_splits,)](
        grad_h, grad_h.stride(0), grad_logits, x, x.stride(0), seed, p, _dropout_scale(p), *_three(lora_a),
        *lora_a[0].stride(), *_three(routers), *routers[0].stride(), grad_x, grad_x.stride(0), grad_w_flat,
        grad_w_numel, num_tokens, depth, rank, width, num_experts, depth_blocks, dx_programs, rank_blocks, w_splits,
        w_tokens_per_split, SIBLINGS=siblings, DROPOUT=p > 0, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        # 8 warps: with 4, the fp32 dA program with its dropout spills on sm_90 (compile_check).
        BLOCK_E=_router_block(num_experts), **dot, num_warps=8,
    )
    grad_w_flat = grad_w_flat[0] if w_splits == 1 else grad_w_flat.sum(0)
    grad_b_flat = grad_b_flat[0] if splits == 1 else grad_b_flat.sum(0)
    return [grad_x, grad_w_flat, grad_b_flat]


def _splits(num_tokens: int, row_blocks: int, out_blocks: int) -> tuple[int, int]:
    """(token splits, tokens per split) of a weight gradient: enough programs to fill the GPU, none empty."""
    splits = token_splits(num_tokens, row_blocks, out_blocks)
    tokens_per_split = triton.cdiv(triton.cdiv(num_tokens, splits), BLOCK_T) * BLOCK_T
    return triton.cdiv(num_tokens, tokens_per_split), tokens_per_split


@triton.jit
def _keep_mask_kernel(seed_ptr, keep_ptr, num_tokens, depth, p, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    depths = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < num_tokens)[:, None] & (depths < depth)[None, :]
    ones = tl.full([BLOCK_T, BLOCK_D], 1.0, tl.float32)
    kept = _dropout(ones, seed_ptr, rows, depths, depth, p, 1.0, True)
    tl.store(keep_ptr + rows.to(tl.int64)[:, None] * depth + depths[None, :], (kept != 0.0).to(tl.uint8), mask=mask)


def keep_mask(seed: torch.Tensor, num_tokens: int, depth: int, p: float) -> torch.Tensor:
    """[T, D] bool: which elements of x the kernels keep for this seed and p (for tests and references)."""
    keep = torch.empty(num_tokens, depth, dtype=torch.uint8, device=seed.device)
    if num_tokens and depth:
        _keep_mask_kernel[(triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(depth, BLOCK_D))](
            seed, keep, num_tokens, depth, p, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return keep.bool()
