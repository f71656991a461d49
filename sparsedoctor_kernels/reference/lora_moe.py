"""Grouped top-k LoRA experts: y[t] = s * sum_j w[t,j] * B[e_tj] @ (A[e_tj] @ x[t]).

Written densely over experts (every expert's shrink, then the chosen slices) because that needs no host
sync and reads like the formula; the Triton kernels do the same work grouped per expert. A (token, slot)
pair whose expert id is outside [0, E) contributes nothing and gets zero weight gradient.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype


def _pairs(experts: torch.Tensor, num_experts: int):
    """Expert index of each pair, clamped to a safe id, and whether the pair is valid."""
    valid = (experts >= 0) & (experts < num_experts)
    return torch.where(valid, experts, 0).long(), valid


def _as_expert_rows(lora: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[E, r, d] -> [E*r, d]: every expert's rank rows stacked, expert-major."""
    return lora.to(dtype).reshape(-1, lora.shape[-1])


def _scatter_to_experts(pairs: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k, r] per-pair vectors summed into their expert's slot of a dense [T, E, r] tensor."""
    num_tokens, top_k, rank = pairs.shape
    dense = pairs.new_zeros(num_tokens, num_experts, rank)
    return dense.scatter_add_(1, ids[..., None].expand(num_tokens, top_k, rank), pairs)


def plan_numel(num_tokens: int, top_k: int, num_experts: int) -> int:
    """The reference needs no routing plan (sorted order, tiles) between forward and backward."""
    return 0


def _no_plan(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=x.device)


def forward(x, lora_a, lora_b, weights, experts, scaling: float):
    """Returns (y [T, d_out] in x's dtype, h [T, k, r] = A[e] @ x in the compute dtype, plan), h and the
    (empty) plan kept for the backward."""
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    num_tokens, top_k = experts.shape
    num_experts, rank, _ = lora_a.shape
    ids, valid = _pairs(experts, num_experts)
    h_all = (x.to(dtype) @ _as_expert_rows(lora_a, dtype).T).view(num_tokens, num_experts, rank)
    h = h_all.gather(1, ids[..., None].expand(num_tokens, top_k, rank))
    coef = torch.where(valid, weights.to(dtype) * scaling, 0.0)
    gated = _scatter_to_experts(coef[..., None] * h, ids, num_experts)
    lora_b_rows = _as_expert_rows(lora_b.transpose(1, 2), dtype)  # [E*r, d_out]
    y = gated.view(num_tokens, num_experts * rank) @ lora_b_rows
    return y.to(x.dtype), h, _no_plan(x)


def forward_into(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor) -> torch.Tensor:
    """Adds y into `out` in place; returns (h, plan)."""
    y, h, plan = forward(x, lora_a, lora_b, weights, experts, scaling)
    out.add_(y)
    return h, plan


def backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling: float):
    """Returns (grad_x, grad_lora_a, grad_lora_b, grad_weights), each in its input's dtype."""
    dtype = h.dtype
    num_tokens, top_k = experts.shape
    num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    ids, valid = _pairs(experts, num_experts)
    gy = grad_y.to(dtype)
    lora_b_rows = _as_expert_rows(lora_b.transpose(1, 2), dtype)  # [E*r, d_out]
    # u[t, j] = B[e]^T gy[t]: the gradient reaching the pair's rank-r intermediate, before its gate.
    u_all = (gy @ lora_b_rows.T).view(num_tokens, num_experts, rank)
    u = u_all.gather(1, ids[..., None].expand(num_tokens, top_k, rank))
    coef = torch.where(valid, weights.to(dtype) * scaling, 0.0)
    grad_weights = torch.where(valid, scaling * (u * h).sum(-1), 0.0)
    grad_h = _scatter_to_experts(coef[..., None] * u, ids, num_experts).view(num_tokens, num_experts * rank)
    grad_x = grad_h @ _as_expert_rows(lora_a, dtype)
    grad_a = (grad_h.T @ x.to(dtype)).view(num_experts, rank, d_in)
    gated = _scatter_to_experts(coef[..., None] * h, ids, num_experts).view(num_tokens, num_experts * rank)
    grad_b = (gy.T @ gated).view(d_out, num_experts, rank).permute(1, 0, 2)
    return (
        grad_x.to(x.dtype),
        grad_a.to(lora_a.dtype),
        grad_b.to(lora_b.dtype).contiguous(),
        grad_weights.to(weights.dtype),
    )
