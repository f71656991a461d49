"""What people write today, for tests and benchmarks to compare the fused ops with: the strongest version a
competent user would write of each, so that a speed-up over them is a result.

- `naive_routing`: the eager softmax, top-k, renormalisation and bincount sequence (Hugging Face's routers);
- `naive_lora_moe`: a Python loop over experts selecting their tokens and adding into the output in place with
  `index_add_`, as Hugging Face's Mixtral block and MixLoRA write it (host syncs included: `nonzero`);
- `dense_lora_moe`: all experts as one rank E*r LoRA: one GEMM for every expert's h, the scaled gates applied
  to the small [T, E*r] h in one pass, and one `addmm_` into `out` (a single read-modify-write of it);
- `compiled_dense_lora_moe`: `torch.compile` of that dense formulation;
- `LoraLinear` / `lora_linear`: one plain LoRA (PEFT style); `base_linear`: the frozen layer alone;
- `moco_enqueue`: per-expert MoCo-style queue update with a Python loop;
- `naive_infonce`: InfoNCE that materialises the full [N, E*Q] score matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive_routing(logits: torch.Tensor, top_k: int, renormalize: bool = True, token_mask=None):
    """(weights, experts, counts, probs_mean) the way model code computes them, one eager op at a time; with
    `token_mask` the statistics cover the marked tokens only (padding left out, as a careful user would)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    if token_mask is None:
        counts = torch.bincount(experts.flatten(), minlength=logits.shape[1]).int()
        return weights, experts.int(), counts, probs.mean(0)
    counts = torch.bincount(experts[token_mask].flatten(), minlength=logits.shape[1]).int()
    return weights, experts.int(), counts, probs[token_mask].mean(0)


def naive_lora_moe(x, lora_a, lora_b, weights, experts, scaling: float = 1.0, out=None):
    """For each expert: find its (token, slot) pairs, apply its LoRA to their rows, `index_add_` the gated
    result into the output in place (into `out` when given)."""
    y = x.new_zeros(x.shape[0], lora_b.shape[1]) if out is None else out
    for expert in range(lora_a.shape[0]):
        token_idx, slot_idx = torch.nonzero(experts == expert, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        gate = (weights[token_idx, slot_idx] * scaling).to(x.dtype)[:, None]
        delta = (x[token_idx] @ lora_a[expert].T) @ lora_b[expert].T
        y.index_add_(0, token_idx, delta * gate)
    return y


def dense_gates(weights, experts, num_experts: int, dtype) -> torch.Tensor:
    """[T, E]: each token's summed gate weight on every expert (zero for the experts it did not choose; a slot
    whose id is outside [0, E) adds nothing)."""
    valid = (experts >= 0) & (experts < num_experts)
    gate = weights.new_zeros(weights.shape[0], num_experts, dtype=dtype)
    return gate.scatter_add_(1, torch.where(valid, experts, 0).long(), torch.where(valid, weights.to(dtype), 0))


def dense_lora_moe(x, lora_a, lora_b, weights, experts, scaling: float = 1.0, out=None):
    """Every expert on every token as one rank E*r LoRA: h = x @ A_cat^T, h *= s * gate (one pass over the small
    [T, E*r]), then one GEMM that adds h @ B_cat into `out` in place (`addmm_`), or returns it."""
    num_experts, rank, d_in = lora_a.shape
    gate = dense_gates(weights, experts, num_experts, x.dtype) * scaling
    h = (x @ lora_a.reshape(num_experts * rank, d_in).T).view(-1, num_experts, rank) * gate[:, :, None]
    b_cat = lora_b.transpose(1, 2).reshape(num_experts * rank, -1)
    h = h.view(-1, num_experts * rank)
    return h @ b_cat if out is None else out.addmm_(h, b_cat)


_compiled: dict[str, object] = {}


def compiled_dense_lora_moe(x, lora_a, lora_b, weights, experts, scaling: float = 1.0, out=None):
    """`torch.compile` (inductor) of `dense_lora_moe`, compiled on first use."""
    if "dense" not in _compiled:
        _compiled["dense"] = torch.compile(dense_lora_moe, dynamic=False)
    return _compiled["dense"](x, lora_a, lora_b, weights, experts, scaling, out)


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
