"""`group_infonce` in one Triton program: the loss and its gradient w.r.t. x from one read of x.

The inputs are small (the model's contrastive subset: n <= a few hundred rows of E routing probabilities, S
sequences), so the cost is launches, not bytes: the ~56 eager ops of the same loss (and about as many in its
backward) become one launch. One program holds every tile: the group sums come from the one-hot membership
matrix M [n, S] as M^T x, each row's own group sum as M s, the scores as q k^T, and the backward retraces those
products in reverse (see reference/group_infonce.py for the function). Deterministic: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.triton._dtypes import compute_type

EPS = 1e-12  # F.normalize's clamp of the norm
# Elements of the largest tile one program holds ([n, d] or [n, S], padded to powers of two): the model's default
# (256 picked tokens, 8 experts, up to 16 sequences) fits. About twenty such tiles are live: at 8 warps they spill
# about 1 KB per thread to local memory (compile_check). Whether one such program beats the ~100 eager
# launches it replaces (forward and backward) is the GPU benchmark's to show, not this comment's.
MAX_TILE = 4096


@triton.jit
def _normalized(v, EPS: tl.constexpr):
    """(v / max(|v|, eps) row-wise, max(|v|, eps))."""
    norm = tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), EPS)
    return v / norm[:, None], norm


@triton.jit
def _normalized_grad(grad, unit, norm, EPS: tl.constexpr):
    """The gradient through y = v / max(|v|, eps): (g - y <y, g>) / |v| where |v| > eps, g / eps below."""
    projected = grad - unit * tl.sum(unit * grad, axis=1)[:, None]
    return tl.where((norm > EPS)[:, None], projected, grad) / norm[:, None]


@triton.jit
def _group_infonce_kernel(
    x_ptr, stride_batch, stride_x, groups_ptr, stride_groups, loss_ptr, grad_ptr,
    num_rows, dim, num_groups, inv_temperature,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, EPS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program per problem of a batch (one for a single [n, d] problem).
    problem = tl.program_id(0).to(tl.int64)
    x_ptr += problem * stride_batch
    groups_ptr += problem * stride_groups
    loss_ptr += problem
    grad_ptr += problem * num_rows * dim
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    ids = tl.arange(0, BLOCK_S)
    group = tl.load(groups_ptr + rows, mask=rows < num_rows, other=-1).to(tl.int64)
    member = (rows < num_rows) & (group >= 0) & (group < num_groups)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x + cols[None, :],
                mask=member[:, None] & (cols < dim)[None, :], other=0.0).to(ACC)
    in_group = member[:, None] & (group[:, None] == ids[None, :])  # [N, S] one-hot membership
    onehot = in_group.to(ACC)
    sums = tl.dot(tl.trans(onehot), x, input_precision=PRECISION, out_dtype=ACC)  # [S, D]
    counts = tl.sum(onehot, axis=0)  # [S]
    own_sums = tl.dot(onehot, sums, input_precision=PRECISION, out_dtype=ACC)  # [N, D]
    own_counts = tl.sum(onehot * counts[None, :], axis=1)
    has_partner = member & (own_counts >= 2)
    partners = tl.sum(has_partner.to(ACC), axis=0)
    weight = tl.where(has_partner, 1.0, 0.0) / tl.maximum(partners, 1.0)

    query, query_norm = _normalized(x, EPS)
    positive, positive_norm = _normalized(own_sums - x, EPS)
    keys, keys_norm = _normalized(sums, EPS)
    own = tl.sum(query * positive, axis=1) * inv_temperature
    negative = (counts[None, :] > 0) & ~in_group & (ids < num_groups)[None, :]
    scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION, out_dtype=ACC) * inv_temperature
    scores = tl.where(negative, scores, float("-inf"))
    top = tl.maximum(tl.max(scores, axis=1), own)
    own_exp = tl.exp(own - top)
    score_exp = tl.where(negative, tl.exp(scores - top[:, None]), 0.0)
    total = own_exp + tl.sum(score_exp, axis=1)
    per_row = tl.log(total) + top - own
    tl.store(loss_ptr, tl.sum(tl.where(has_partner, per_row, 0.0), axis=0) / tl.maximum(partners, 1.0))

    # Backward of the mean over partnered rows: d/d own = w (softmax_own - 1), d/d score_c = w softmax_c.
    grad_own = weight * (own_exp / total - 1.0) * inv_temperature
    grad_scores = weight[:, None] * score_exp / total[:, None] * inv_temperature  # [N, S]
    grad_query = grad_own[:, None] * positive + tl.dot(grad_scores, keys, input_precision=PRECISION, out_dtype=ACC)
    grad_positive = grad_own[:, None] * query
    grad_keys = tl.dot(tl.trans(grad_scores), query, input_precision=PRECISION, out_dtype=ACC)  # [S, D]
    grad_x = _normalized_grad(grad_query, query, query_norm, EPS)
    grad_other = _normalized_grad(grad_positive, positive, positive_norm, EPS)  # d/d (own_sums - x)
    # sums feed the keys and every row's own_sums: d sums = d keys' input + M^T d own_sums.
    grad_sums = _normalized_grad(grad_keys, keys, keys_norm, EPS) + tl.dot(
        tl.trans(onehot), grad_other, input_precision=PRECISION, out_dtype=ACC)
    grad_x = grad_x - grad_other + tl.dot(onehot, grad_sums, input_precision=PRECISION, out_dtype=ACC)
    grad_x = tl.where(member[:, None], grad_x, 0.0)
    tl.store(grad_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], grad_x,
             mask=(rows < num_rows)[:, None] & (cols < dim)[None, :])


def blocks(num_rows: int, dim: int, num_groups: int) -> tuple[int, int, int]:
    """The padded tile sizes (tl.dot needs every side >= 16)."""
    return tuple(max(16, triton.next_power_of_2(max(1, size))) for size in (num_rows, dim, num_groups))


def fits(num_rows: int, dim: int, num_groups: int) -> bool:
    block_n, block_d, block_s = blocks(num_rows, dim, num_groups)
    return block_n * max(block_d, block_s) <= MAX_TILE and block_s * block_d <= MAX_TILE


def forward(x: torch.Tensor, groups: torch.Tensor, num_groups: int, temperature: float):
    """(loss [] and grad x [n, d], both in the compute dtype; [B] and [B, n, d] for a batch x [B, n, d])."""
    num_rows, dim = x.shape[-2:]
    problems = x.shape[0] if x.dim() == 3 else 1
    acc_dtype = compute_dtype(x.dtype)
    loss = empty(x.shape[:-2], acc_dtype, x.device)
    grad = empty(x.shape, acc_dtype, x.device)
    if problems == 0:
        return loss, grad
    block_n, block_d, block_s = blocks(num_rows, dim, num_groups)
    batched = x.dim() == 3
    _group_infonce_kernel[(problems,)](
        x, x.stride(0) if batched else 0, x.stride(-2), groups, groups.stride(0) if batched else 0, loss, grad,
        num_rows, dim, num_groups, 1.0 / temperature,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_S=block_s, EPS=EPS, ACC=compute_type(x.dtype),
        PRECISION="ieee", num_warps=8,
    )
    return loss, grad
