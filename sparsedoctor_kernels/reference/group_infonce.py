"""InfoNCE of rows against their groups' means, written as plainly as it reads (the Triton kernel in
`triton/group_infonce.py` computes the same loss and its gradient in one program).

For rows x_i [n, d] with group ids g_i (an id outside [0, S) puts the row in no group: it is neither a query nor
part of any sum), s_c = sum of the rows of group c, n_c their count:
    q_i = x_i / |x_i|,  p_i = (s_{g_i} - x_i) / |.|  (the mean of the *other* rows of its group: a direction),
    k_c = s_c / |s_c|  (group c's mean direction), every norm clamped at 1e-12 as F.normalize does,
    loss_i = logsumexp([<q_i, p_i>, <q_i, k_c> for every other group c with n_c > 0] / T) - <q_i, p_i> / T,
and the result is the mean of loss_i over the rows that have a partner in their group (n_{g_i} >= 2); 0 when
none has. The gradient reaches every row through its query, its positive and its group's mean: the negatives
are not constants (unlike `infonce_queue_loss`'s queue), so the term moves groups apart, not only rows.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype

EPS = 1e-12  # F.normalize's clamp of the norm


def _normalized(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = v.norm(dim=-1).clamp_min(EPS)
    return v / norm[..., None], norm


def _normalized_grad(grad: torch.Tensor, unit: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Through y = v / max(|v|, eps): (g - y <y, g>) / |v| where |v| > eps, g / eps below."""
    projected = grad - unit * (unit * grad).sum(-1, keepdim=True)
    return torch.where((norm > EPS)[..., None], projected, grad) / norm[..., None]


def forward(x: torch.Tensor, groups: torch.Tensor, num_groups: int, temperature: float):
    """(loss, its gradient w.r.t. x), both in the compute dtype, written out as the kernel computes them:
    the membership matrix M [n, S] gives the sums (M^T x) and each row's own group sum (M s); the backward
    retraces those products. x [n, d] gives a scalar loss; a batch x [B, n, d] with groups [B, n] gives one loss
    per problem [B], the same formula over a leading dim. Tested against autograd of the formula (tests/brute.py)
    in float64."""
    x = x.to(compute_dtype(x.dtype))
    member = (groups >= 0) & (groups < num_groups)  # [..., n]
    ids = torch.arange(num_groups, device=x.device)
    onehot = (member[..., None] & (groups[..., None] == ids)).to(x.dtype)  # [..., n, S]
    by_group = onehot.transpose(-1, -2)  # M^T [..., S, n]
    rows = x.masked_fill(~member[..., None], 0.0)
    sums, counts = by_group @ rows, onehot.sum(-2)  # [..., S, d], [..., S]
    own_sums, own_counts = onehot @ sums, (onehot @ counts[..., None])[..., 0]
    has_partner = member & (own_counts >= 2)
    partners = has_partner.sum(-1, keepdim=True).clamp_min(1)
    weight = has_partner.to(x.dtype) / partners
    query, query_norm = _normalized(rows)
    positive, positive_norm = _normalized(own_sums - rows)
    keys, keys_norm = _normalized(sums)
    own = (query * positive).sum(-1) / temperature
    negative = (counts[..., None, :] > 0) & (onehot == 0)
    scores = torch.where(negative, query @ keys.transpose(-1, -2) / temperature, float("-inf"))
    top = torch.maximum(scores.max(-1).values, own)
    own_exp, score_exp = torch.exp(own - top), torch.where(negative, torch.exp(scores - top[..., None]), 0.0)
    total = own_exp + score_exp.sum(-1)
    value = torch.where(has_partner, torch.log(total) + top - own, 0.0).sum(-1) / partners[..., 0]

    grad_own = weight * (own_exp / total - 1.0) / temperature
    grad_scores = weight[..., None] * score_exp / total[..., None] / temperature
    grad_query = grad_own[..., None] * positive + grad_scores @ keys
    grad_other = _normalized_grad(grad_own[..., None] * query, positive, positive_norm)
    grad_sums = _normalized_grad(grad_scores.transpose(-1, -2) @ query, keys, keys_norm) + by_group @ grad_other
    grad = _normalized_grad(grad_query, query, query_norm) - grad_other + onehot @ grad_sums
    return value, torch.where(member[..., None], grad, 0.0)
