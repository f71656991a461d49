"""What people write today, for tests and benchmarks to compare the fused ops with.

Each is written the way it is found in the wild, with plain autograd, host syncs and all:
- `naive_lora_moe`: a Python loop over experts selecting their tokens (MixLoRA style);
- `dense_lora_moe`: all experts as one rank E*r LoRA, two dense GEMMs with a gate mask;
- `LoraLinear` / `lora_linear`: one plain LoRA (PEFT style); `base_linear`: the frozen layer alone;
- `moco_enqueue`: per-expert MoCo-style queue update with a Python loop;
- `naive_infonce`: InfoNCE that materialises the full [N, E*Q] score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_lora_moe(x, lora_a, lora_b, weights, experts, scaling: float = 1.0):
    """For each expert: gather its (token, slot) pairs, apply its LoRA, index_add_ into the output."""
    y = x.new_zeros(x.shape[0], lora_b.shape[1])
    for expert in range(lora_a.shape[0]):
        token_idx, slot_idx = torch.nonzero(experts == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        gate = weights[token_idx, slot_idx].to(x.dtype)[:, None]
        delta = (x[token_idx] @ lora_a[expert].T) @ lora_b[expert].T
        y = y.index_add(0, token_idx, delta * gate * scaling)
    return y


def dense_lora_moe(x, lora_a, lora_b, weights, experts, scaling: float = 1.0):
    """Every expert on every token as one rank E*r LoRA; the gate zeroes the experts a token did not pick."""
    num_experts, rank, d_in = lora_a.shape
    gate = x.new_zeros(x.shape[0], num_experts).scatter_add(1, experts.long(), weights.to(x.dtype))
    h = (x @ lora_a.reshape(num_experts * rank, d_in).T).view(-1, num_experts, rank)
    h = (h * gate[:, :, None]).reshape(-1, num_experts * rank)
    return (h @ lora_b.transpose(1, 2).reshape(num_experts * rank, -1)) * scaling


def lora_linear(x, lora_a, lora_b, scaling: float = 1.0):
    """One LoRA delta: s * B (A x), with lora_a [r, d_in] and lora_b [d_out, r]."""
    return (x @ lora_a.T) @ lora_b.T * scaling


def base_linear(x, weight, bias=None):
    """The frozen base layer alone."""
    return F.linear(x, weight, bias)


class LoraLinear(torch.nn.Module):
    """PEFT-style LoRA around a frozen nn.Linear: base(x) + s * B(A(dropout(x)))."""

    def __init__(self, base: torch.nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, device=base.weight.device,
                                      dtype=base.weight.dtype)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, device=base.weight.device,
                                      dtype=base.weight.dtype)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_B.weight)
        self.dropout = torch.nn.Dropout(lora_dropout)
        self.scaling = lora_alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


@torch.no_grad()
def moco_enqueue(queue_keys, ptr, size, keys, experts) -> None:
    """MoCo's dequeue-and-enqueue, once per expert present in the batch (host syncs included)."""
    num_experts, capacity, _ = queue_keys.shape
    if capacity == 0:
        return
    for expert in torch.unique(experts).tolist():
        if not 0 <= expert < num_experts:
            continue
        rows = keys[experts == expert].to(queue_keys.dtype)
        arrived = rows.shape[0]
        start = int(ptr[expert])
        if arrived > capacity:  # only the last Q rows survive, where sequential writes would put them
            start = (start + arrived - capacity) % capacity
            rows = rows[-capacity:]
        slots = (start + torch.arange(rows.shape[0], device=keys.device)) % capacity
        queue_keys[expert, slots] = rows
        ptr[expert] = (int(ptr[expert]) + arrived) % capacity
        size[expert] = min(capacity, int(size[expert]) + arrived)


def naive_infonce(query, positive, queue_keys, queue_size, query_experts, temperature: float = 0.07,
                  normalize: bool = True, reduction: str = "mean"):
    """Scores against every queued key at once ([N, E*Q], kept for backward), then cross-entropy on the
    positive at index 0. Holds the queue in the graph: enqueueing before backward() breaks it."""
    num_experts, capacity, dim = queue_keys.shape
    q, k = query.float(), positive.float()
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    keys = queue_keys.float().reshape(num_experts * capacity, dim)
    positive_logit = (q * k).sum(-1, keepdim=True)
    negative_logits = q @ keys.T
    key_expert = torch.arange(num_experts, device=q.device).repeat_interleave(capacity)
    filled = (torch.arange(capacity, device=q.device)[None, :] < queue_size[:, None]).reshape(-1)
    allowed = filled[None, :] & (key_expert[None, :] != query_experts[:, None])
    negative_logits = negative_logits.masked_fill(~allowed, float("-inf"))
    logits = torch.cat([positive_logit, negative_logits], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    if q.shape[0] == 0:
        return logits.sum() if reduction != "none" else logits.new_zeros(0)
    return F.cross_entropy(logits, labels, reduction=reduction)
