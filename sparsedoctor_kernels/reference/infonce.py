"""InfoNCE over the expert queue with gradients computed analytically in the forward.

loss_i = logsumexp([s_i, n_i1, n_i2, ...]) - s_i with s_i = <q_i, k_i> / tau and n_ij the scores of the
stored keys of every other expert. The forward also returns d loss_i / d query_i and d loss_i / d positive_i,
so the backward only scales them: nothing of the queue is saved, and updating it in place before
backward() cannot change the gradients.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype

NORM_EPS = 1e-12
# Rows scored at once: bounds the transient score block to about 16M elements.
MAX_SCORES_PER_BLOCK = 1 << 24


def normalize_rows(u: torch.Tensor):
    norm = u.norm(dim=-1, keepdim=True)
    denom = norm.clamp_min(NORM_EPS)
    return u / denom, norm, denom


def normalize_rows_backward(grad_v, v, norm, denom):
    """Gradient through v = u / max(||u||, eps); below eps the denominator is a constant."""
    projected = (grad_v - v * (v * grad_v).sum(-1, keepdim=True)) / denom
    return torch.where(norm > NORM_EPS, projected, grad_v / denom)


def normalized_views(query, positive, normalize: bool):
    """(q, k, to_inputs) in the compute dtype, normalised when asked; `to_inputs(grad_q, grad_k)` carries
    gradients w.r.t. q and k back to query and positive."""
    dtype = compute_dtype(query.dtype, positive.dtype)
    q, k = query.to(dtype), positive.to(dtype)
    if not normalize:
        return q, k, lambda grad_q, grad_k: (grad_q, grad_k)
    q, q_norm, q_denom = normalize_rows(q)
    k, k_norm, k_denom = normalize_rows(k)
    return q, k, lambda grad_q, grad_k: (normalize_rows_backward(grad_q, q, q_norm, q_denom),
                                         normalize_rows_backward(grad_k, k, k_norm, k_denom))


def forward(query, positive, queue_keys, queue_size, query_experts, temperature: float, normalize: bool):
    """Returns (loss [N], d loss_i / d query_i [N, p], d loss_i / d positive_i [N, p]) in the compute dtype."""
    num_experts, capacity, dim = queue_keys.shape
    q, k, to_inputs = normalized_views(query, positive, normalize)
    dtype = q.dtype

    keys = queue_keys.to(dtype).reshape(num_experts * capacity, dim)
    key_expert = torch.arange(num_experts, device=keys.device).repeat_interleave(capacity)
    key_filled = (torch.arange(capacity, device=keys.device)[None, :] < queue_size[:, None]).reshape(-1)

    loss = torch.empty(q.shape[0], dtype=dtype, device=q.device)
    grad_q, grad_k = torch.empty_like(q), torch.empty_like(k)
    block = max(1, MAX_SCORES_PER_BLOCK // max(1, keys.shape[0]))
    for start in range(0, q.shape[0], block):
        rows = slice(start, start + block)
        qb, kb = q[rows], k[rows]
        positive_score = (qb * kb).sum(-1) / temperature
        negative_scores = qb @ keys.T / temperature
        is_negative = key_filled[None, :] & (key_expert[None, :] != query_experts[rows, None])
        negative_scores = negative_scores.masked_fill(~is_negative, float("-inf"))
        lse = torch.logsumexp(torch.cat([positive_score[:, None], negative_scores], 1), dim=1)
        loss[rows] = lse - positive_score
        # Softmax weights of the positive and of each negative; d loss/d s = p_pos - 1, d loss/d n_j = p_j.
        p_pos = torch.exp(positive_score - lse)
        p_neg = torch.exp(negative_scores - lse[:, None])
        grad_q[rows] = ((p_pos - 1)[:, None] * kb + p_neg @ keys) / temperature
        grad_k[rows] = (p_pos - 1)[:, None] * qb / temperature

    return loss, *to_inputs(grad_q, grad_k)
