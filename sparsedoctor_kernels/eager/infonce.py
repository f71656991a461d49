"""`infonce_queue_loss` in eager PyTorch: the reference's function with its passes over the [E*Q, N] score
block cut to what the math needs. Per block of query rows:

    scores^T = keys @ (q / tau)^T + bias    one addmm; bias [E*Q, 1] is 0 or -inf for an empty slot. The
                                            [E*Q, N] layout keeps the GEMM's long dim outermost (about 1.8x the
                                            [N, E*Q] product's speed on one CPU thread at N=256, E*Q=8192, p=64)
    own expert's slots = -inf               N x Q writes, not a pass over the block
    m = max(s_pos, max scores)              one read
    scores = exp(scores - m) in place       the one exp: unnormalised negative probabilities
    total = exp(s_pos - m) + sum(scores)    one read; loss = m + log(total) - s_pos
    dq = ((p_pos - 1) k + (scores^T @ keys) / total) / tau,   dk = (p_pos - 1) q / tau

against the reference's scaled copy, masked copy, concatenation, second exp and division of the block.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels.reference.infonce import MAX_SCORES_PER_BLOCK, normalized_views


def forward(query, positive, queue_keys, queue_size, query_experts, temperature: float, normalize: bool):
    """Returns (loss [N], d loss_i / d query_i [N, p], d loss_i / d positive_i [N, p]) in the compute dtype."""
    num_experts, capacity, dim = queue_keys.shape
    q, k, to_inputs = normalized_views(query, positive, normalize)
    dtype = q.dtype
    keys = queue_keys.to(dtype).reshape(num_experts * capacity, dim)
    empty_slot = torch.arange(capacity, device=keys.device)[None, :] >= queue_size[:, None]
    slot_bias = torch.zeros(keys.shape[0], 1, dtype=dtype, device=keys.device)
    slot_bias.masked_fill_(empty_slot.reshape(-1, 1), float("-inf"))

    loss = torch.empty(q.shape[0], dtype=dtype, device=q.device)
    grad_q, grad_k = torch.empty_like(q), torch.empty_like(k)
    block = max(1, MAX_SCORES_PER_BLOCK // max(1, keys.shape[0]))
    for start in range(0, q.shape[0], block):
        rows = slice(start, start + block)
        qb, kb = q[rows] / temperature, k[rows]
        positive_score = (qb * kb).sum(-1)
        top = positive_score
        if keys.shape[0]:
            scores = torch.addmm(slot_bias, keys, qb.T)  # [E*Q, n]
            # Adding -inf masks the own expert's slots; an id naming no expert adds 0 (all keys negatives).
            own, columns = query_experts[rows], torch.arange(qb.shape[0], device=q.device)
            names_expert = (own >= 0) & (own < num_experts)
            scores.view(num_experts, capacity, -1).transpose(1, 2).index_put_(
                (own.clamp(0, num_experts - 1), columns),
                torch.where(names_expert, float("-inf"), 0.0).to(dtype)[:, None], accumulate=True)
            top = torch.maximum(positive_score, scores.amax(0))
            scores.sub_(top).exp_()
            negatives = scores.sum(0)
        else:
            negatives = torch.zeros_like(positive_score)
        exp_positive = torch.exp(positive_score - top)
        total = exp_positive + negatives
        loss[rows] = top + torch.log(total) - positive_score
        p_positive = exp_positive / total
        pull = (p_positive - 1)[:, None] * kb
        if keys.shape[0]:
            pull += (scores.T @ keys) / total[:, None]
        grad_q[rows] = pull / temperature
        grad_k[rows] = (p_positive - 1)[:, None] * qb
    return loss, *to_inputs(grad_q, grad_k)
