"""InfoNCE over the expert queue as one streaming kernel: each program holds a block of queries and walks every
other expert's filled slots in tiles with an online log-sum-exp (running max and sum, rescaled as in flash
attention), accumulating sum_j softmax_j * key_j for the query gradient on the way. No [N, E*Q] score matrix
exists, and the gradients of query and positive leave the forward, so the backward never reads the queue.

Normalisation and the temperature are applied by the launcher (cheap [N, p] passes in the compute dtype), so
the kernel takes no float scalars: float64 inputs stay exact for gradcheck.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels.reference.infonce import normalized_views
from sparsedoctor_kernels.triton._dtypes import compute_type

# The query block, its gradient accumulator and a key tile all live in registers: at p = 128 these sizes
# compile for sm_90 without spills (compile_check: 64x32 tiles spill 300+ bytes a thread). Untimed on a GPU.
BLOCK_Q = 32  # queue slots per tile
TILE_ELEMENTS = 2048  # query block x padded dim held per program
NUM_WARPS = 8


@triton.jit
def _infonce_forward_kernel(
    query_ptr, positive_ptr, keys_ptr, size_ptr, experts_ptr,  # query already divided by the temperature
    loss_ptr, grad_query_ptr, positive_coef_ptr,
    num_rows, dim, num_experts, capacity,
    BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
    COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_P)
    row_ok = rows < num_rows
    col_ok = cols < dim
    offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    query = tl.load(query_ptr + offsets, mask=mask, other=0.0)
    positive = tl.load(positive_ptr + offsets, mask=mask, other=0.0)
    own = tl.load(experts_ptr + rows, mask=row_ok, other=-1).to(tl.int64)

    positive_score = tl.sum(query * positive, axis=1)
    # The positive starts the running log-sum-exp: max = its score, sum = exp(0) = 1.
    running_max = positive_score
    running_sum = tl.full([BLOCK_N], 1.0, dtype=COMPUTE)
    weighted_keys = tl.zeros([BLOCK_N, BLOCK_P], dtype=COMPUTE)
    slots = tl.arange(0, BLOCK_Q)
    for expert in range(num_experts):
        filled = tl.minimum(tl.maximum(tl.load(size_ptr + expert), 0), capacity)
        is_other = own != expert
        for start in range(0, filled, BLOCK_Q):
            slot_ok = start + slots < filled
            key_rows = (expert * capacity + start + slots).to(tl.int64)
            keys = tl.load(keys_ptr + key_rows[:, None] * dim + cols[None, :], mask=slot_ok[:, None] & col_ok[None, :],
                           other=0.0).to(COMPUTE)
            scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION, out_dtype=COMPUTE)
            scores = tl.where(is_other[:, None] & slot_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            rescale = tl.exp(running_max - new_max)
            probs = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * rescale + tl.sum(probs, axis=1)
            weighted_keys = weighted_keys * rescale[:, None] + tl.dot(probs, keys, input_precision=PRECISION,
                                                                       out_dtype=COMPUTE)
            running_max = new_max
    log_sum_exp = running_max + tl.log(running_sum)
    positive_prob = tl.exp(positive_score - log_sum_exp)
    # d loss / d s = p_pos - 1 and d loss / d n_j = p_j: the temperature is applied by the launcher.
    grad_query = (positive_prob - 1.0)[:, None] * positive + weighted_keys / running_sum[:, None]
    tl.store(loss_ptr + rows, log_sum_exp - positive_score, mask=row_ok)
    tl.store(grad_query_ptr + offsets, grad_query, mask=mask)
    tl.store(positive_coef_ptr + rows, positive_prob - 1.0, mask=row_ok)


def forward(query, positive, queue_keys, queue_size, query_experts, temperature: float, normalize: bool):
    """Returns (loss [N], d loss_i / d query_i [N, p], d loss_i / d positive_i [N, p]) in the compute dtype."""
    num_experts, capacity, dim = queue_keys.shape
    q, k, to_inputs = normalized_views(query, positive, normalize)
    dtype = q.dtype
    q_scaled, k = (q / temperature).contiguous(), k.contiguous()
    num_rows = q.shape[0]
    loss = empty((num_rows,), dtype, q.device)
    grad_q = empty((num_rows, dim), dtype, q.device)
    positive_coef = empty((num_rows,), dtype, q.device)
    if num_rows > 0:
        block_p = max(16, triton.next_power_of_2(dim))
        block_n = max(16, min(64, TILE_ELEMENTS // block_p))
        exact = dtype == torch.float64 or q.device.type != "cuda"
        _infonce_forward_kernel[(triton.cdiv(num_rows, block_n),)](
            q_scaled, k, queue_keys, queue_size, query_experts, loss, grad_q, positive_coef,
            num_rows, dim, num_experts, capacity,
            BLOCK_N=block_n, BLOCK_Q=BLOCK_Q, BLOCK_P=block_p,
            COMPUTE=compute_type(dtype),
            # fp32 on the GPU: three TF32 products recover fp32 accuracy (scores are divided by a small
            # temperature, so plain TF32 errors would show in the loss).
            PRECISION="ieee" if exact else "tf32x3", num_warps=NUM_WARPS,
        )
    return loss, *to_inputs(grad_q / temperature, positive_coef[:, None] * q_scaled)
