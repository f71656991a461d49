"""Grouped top-k LoRA experts: y[t] = s * sum_j w[t,j] * B[e_tj] @ (A[e_tj] @ x[t]).

The reference follows the formula's selection: an expert that token t did not choose never touches t's output
or gradients, even when its weights hold NaN or inf (a dense product with zero gates would give 0 * NaN = NaN
in every row). It needs no host sync:
- the shrink of every expert at once, x @ [A_0; ...; A_E-1]^T, is still a selection: column block e depends on
  A[e] alone, and each pair gathers its own expert's block;
- the expand (and every product that mixes experts over d_out or d_in) runs expert by expert, and each
  expert's result is *selected* (torch.where) into the rows of the tokens that chose it, never multiplied by
  a zero gate.
A (token, slot) pair whose expert id is outside [0, E) contributes nothing and gets zero weight gradient.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype


def _pairs(experts: torch.Tensor, num_experts: int):
    """Expert index of each pair, clamped to a safe id, and whether the pair is valid."""
    valid = (experts >= 0) & (experts < num_experts)
    return torch.where(valid, experts, 0).long(), valid


def _per_pair(rows_by_expert: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, rank: int) -> torch.Tensor:
    """[T, E*r] expert-major rows -> [T, k, r]: each pair's own expert block (zeros for invalid pairs)."""
    num_tokens, top_k = ids.shape
    blocks = rows_by_expert.view(num_tokens, rows_by_expert.shape[1] // rank, rank)
    picked = blocks.gather(1, ids[..., None].expand(num_tokens, top_k, rank))
    return torch.where(valid[..., None], picked, 0.0)


def _expert_rows(pairs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """[T, k, r] per-pair vectors -> [T, r]: the sum over the slots that chose this expert (selected, so a NaN in
    another slot's vector stays out)."""
    return torch.where(chosen[..., None], pairs, 0.0).sum(1)


def _select_rows(uses: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.where(uses[:, None], rows, 0.0)


def saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int) -> tuple[int, ...]:
    """h as kept for the backward: one rank-r row per (token, slot) pair."""
    return (num_tokens, top_k, rank)


def plan_numel(num_tokens: int, top_k: int, num_experts: int) -> int:
    """The reference needs no routing plan (sorted order, tiles) between forward and backward."""
    return 0


def _no_plan(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int32, device=x.device)


def forward(x, lora_a, lora_b, weights, experts, scaling: float):
    """Returns (y [T, d_out] in x's dtype, h [T, k, r] = A[e] @ x in the compute dtype, plan), h and the
    (empty) plan kept for the backward."""
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    num_experts, rank, _ = lora_a.shape
    ids, valid = _pairs(experts, num_experts)
    a, b, xc = lora_a.to(dtype), lora_b.to(dtype), x.to(dtype)
    h = _per_pair(xc @ a.reshape(num_experts * rank, -1).T, ids, valid, rank)
    gated = torch.where(valid[..., None], (weights.to(dtype) * scaling)[..., None] * h, 0.0)
    y = xc.new_zeros(x.shape[0], lora_b.shape[1])
    for expert in range(num_experts):
        chosen = valid & (ids == expert)
        uses = chosen.any(1)
        y += _select_rows(uses, _expert_rows(gated, chosen) @ b[expert].T)
    return y.to(x.dtype), h, _no_plan(x)


def forward_into(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor) -> torch.Tensor:
    """Adds y into `out` in place (any strides); returns (h, plan)."""
    y, h, plan = forward(x, lora_a, lora_b, weights, experts, scaling)
    out.add_(y)
    return h, plan


def backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling: float):
    """Returns (grad_x, grad_lora_a, grad_lora_b, grad_weights), each in its input's dtype."""
    dtype = h.dtype
    num_experts, rank, _ = lora_a.shape
    ids, valid = _pairs(experts, num_experts)
    a, b, xc, gy = lora_a.to(dtype), lora_b.to(dtype), x.to(dtype), grad_y.to(dtype)
    # u[t, j] = B[e]^T gy[t]: the gradient reaching the pair's rank-r intermediate, before its gate.
    u = _per_pair(gy @ b.transpose(1, 2).reshape(num_experts * rank, -1).T, ids, valid, rank)
    coef = (weights.to(dtype) * scaling)[..., None]
    grad_weights = torch.where(valid, scaling * (u * h).sum(-1), 0.0)
    grad_h = torch.where(valid[..., None], coef * u, 0.0)
    gated = torch.where(valid[..., None], coef * h, 0.0)
    grad_x = torch.zeros_like(xc)
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
    for expert in range(num_experts):
        chosen = valid & (ids == expert)
        uses = chosen.any(1)
        grad_h_e = _expert_rows(grad_h, chosen)
        grad_x += _select_rows(uses, grad_h_e @ a[expert])
        grad_a[expert] = grad_h_e.T @ _select_rows(uses, xc)
        grad_b[expert] = _select_rows(uses, gy).T @ _expert_rows(gated, chosen)
    return grad_x.to(x.dtype), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), grad_weights.to(weights.dtype)
