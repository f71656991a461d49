"""Float64 brute-force oracles: one token, one pair, one row at a time, straight from the op contract (docs/ops.md).

Deliberately unlike the library's reference (no dense tricks, no analytic gradients: autograd through
loops), so that agreement means something.
"""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, top_k: int, renormalize: bool = True):
    """Returns (weights, experts, counts, probs_mean); weights and probs_mean carry autograd from logits."""
    probs = torch.softmax(logits.double(), dim=-1)
    num_tokens, num_experts = probs.shape
    weight_rows, expert_rows = [], []
    for t in range(num_tokens):
        values = probs[t].detach().tolist()
        chosen = sorted(range(num_experts), key=lambda e: (-values[e], e))[:top_k]
        row = torch.stack([probs[t, e] for e in chosen])
        weight_rows.append(row / row.sum() if renormalize else row)
        expert_rows.append(chosen)
    weights = torch.stack(weight_rows) if num_tokens else probs[:, :top_k]  # empty, still in the graph
    experts = torch.tensor(expert_rows, dtype=torch.int32).reshape(num_tokens, top_k)
    counts = torch.zeros(num_experts, dtype=torch.int32)
    for e in experts.reshape(-1).tolist():
        counts[e] += 1
    probs_mean = probs.sum(0) / max(num_tokens, 1)
    return weights, experts, counts, probs_mean


def load_balance_loss(counts, probs_mean, num_tokens: int, top_k: int):
    num_experts = counts.shape[0]
    if num_tokens == 0:
        return probs_mean.sum() * 0
    return num_experts * sum(counts[e].item() / (num_tokens * top_k) * probs_mean[e] for e in range(num_experts))


def lora_moe(x, lora_a, lora_b, weights, experts, scaling: float = 1.0):
    """y[t] = s * sum_j w[t,j] B[e] (A[e] x[t]) in float64; pairs with ids outside [0, E) add nothing."""
    x, lora_a, lora_b, weights = (t.double() for t in (x, lora_a, lora_b, weights))
    num_experts = lora_a.shape[0]
    rows = []
    for t in range(x.shape[0]):
        row = x.new_zeros(lora_b.shape[1])
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            if 0 <= e < num_experts:
                row = row + scaling * weights[t, j] * (lora_b[e] @ (lora_a[e] @ x[t]))
        rows.append(row)
    if rows:
        return torch.stack(rows)
    # Empty input: a [0, d_out] result that still depends on every argument.
    return (x[:, :1] * (lora_b.sum() + lora_a.sum() + weights.sum())).expand(0, lora_b.shape[1])


def enqueue(queue_keys, ptr, size, keys, experts):
    """Returns new (queue_keys, ptr, size) after writing the rows one by one, in float64."""
    queue_keys, ptr, size = queue_keys.double().clone(), ptr.clone(), size.clone()
    num_experts, capacity, _ = queue_keys.shape
    for i in range(keys.shape[0]):
        e = int(experts[i])
        if not 0 <= e < num_experts or capacity == 0:
            continue
        queue_keys[e, int(ptr[e])] = keys[i].double()
        ptr[e] = (ptr[e] + 1) % capacity
        size[e] = min(capacity, int(size[e]) + 1)
    return queue_keys, ptr, size


def infonce_rows(query, positive, queue_keys, queue_size, query_experts, temperature=0.07, normalize=True):
    """Per-row InfoNCE losses [N] in float64, with autograd to query and positive."""
    q_all, k_all = query.double(), positive.double()
    if normalize:
        q_all = q_all / q_all.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k_all = k_all / k_all.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    keys = queue_keys.double()
    losses = []
    for i in range(query.shape[0]):
        q = q_all[i]
        scores = [q @ k_all[i] / temperature]
        for e in range(keys.shape[0]):
            if e == int(query_experts[i]):
                continue
            for j in range(int(queue_size[e])):
                scores.append(q @ keys[e, j] / temperature)
        scores = torch.stack(scores)
        losses.append(torch.logsumexp(scores, 0) - scores[0])
    return torch.stack(losses) if losses else (q_all.sum(-1) + k_all.sum(-1)) * 0  # empty, in the graph


def group_infonce(x, groups, num_groups: int, temperature: float):
    """sdk.group_infonce in float64, straight from its definition, differentiable by autograd: each row against
    the normalised mean of the other rows of its group, the other non-empty groups' means as negatives, the
    mean over the rows with a partner."""
    x = x.double()
    member = (groups >= 0) & (groups < num_groups)
    group = torch.where(member, groups, 0).long()
    rows = x.masked_fill(~member[:, None], 0.0)  # selected, not multiplied: a non-member row may hold anything
    sums = x.new_zeros(num_groups, x.shape[1]).index_add(0, group, rows)
    counts = x.new_zeros(num_groups).index_add(0, group, member.double())
    has_partner = member & (counts[group] >= 2)
    query, positive, keys = (torch.nn.functional.normalize(v, dim=-1) for v in (rows, sums[group] - rows, sums))
    own = (query * positive).sum(-1) / temperature
    others = torch.arange(num_groups)[None, :] != group[:, None]
    negatives = torch.where(others & (counts[None, :] > 0), query @ keys.T / temperature, float("-inf"))
    per_row = torch.logsumexp(torch.cat([own[:, None], negatives], dim=1), dim=1) - own
    return torch.where(has_partner, per_row, 0.0).sum() / has_partner.sum().clamp_min(1)
