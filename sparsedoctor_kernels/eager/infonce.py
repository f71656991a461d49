"""`infonce_queue_loss` in eager PyTorch: the reference's function with its passes over the [N, E*Q] score
block cut to what the math needs. Per block of query rows:

    scores = (q / tau) @ keys^T            one matmul (the [N, p] query scaled, not the [N, E*Q] scores)
    masked in place                         the query's own expert and the empty slots to -inf (broadcast masks)
    m = max(s_pos, max scores)              one read
    scores = exp(scores - m) in place       the one exp: unnormalised negative probabilities
    total = exp(s_pos - m) + sum(scores)    one read; loss = m + log(total) - s_pos
    dq = ((p_pos - 1) k + (scores / total) @ keys) / tau,   dk = (p_pos - 1) q / tau

against the reference's scaled copy, masked copy, concatenation and second exp.
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
    empty_slot = (torch.arange(capacity, device=keys.device)[None, :] >= queue_size[:, None])[None]  # [1, E, Q]
    expert_ids = torch.arange(num_experts, device=keys.device)

    loss = torch.empty(q.shape[0], dtype=dtype, device=q.device)
    grad_q, grad_k = torch.empty_like(q), torch.empty_like(k)
    block = max(1, MAX_SCORES_PER_BLOCK // max(1, keys.shape[0]))
    for start in range(0, q.shape[0], block):
        rows = slice(start, start + block)
        qb, kb = q[rows] / temperature, k[rows]
        positive_score = (qb * kb).sum(-1)
        scores = qb @ keys.T
        if keys.shape[0]:
            by_expert = scores.view(-1, num_experts, capacity)
            by_expert.masked_fill_(empty_slot, float("-inf"))
            by_expert.masked_fill_((expert_ids[None, :] == query_experts[rows, None])[:, :, None], float("-inf"))
            top = torch.maximum(positive_score, scores.amax(-1))
        else:
            top = positive_score
        scores.sub_(top[:, None]).exp_()
        exp_positive = torch.exp(positive_score - top)
        total = exp_positive + scores.sum(-1)
        loss[rows] = top + torch.log(total) - positive_score
        p_positive = exp_positive / total
        grad_q[rows] = ((p_positive - 1)[:, None] * kb + scores.div_(total[:, None]) @ keys) / temperature
        grad_k[rows] = (p_positive - 1)[:, None] * qb
    return loss, *to_inputs(grad_q, grad_k)
