"""`lora_moe`'s dense strategy in eager PyTorch: every expert from one read of x, the gates multiplied in, one
`addmm_` into the output. Sync-free, so it is the torch backend's choice on a GPU and wherever E*r is small.

    h     = x @ A_cat^T                       [T, E*r], kept for the backward (fp32)
    g     = scatter_add(experts, s * w)       [T, E]: the token's weight on each expert (0 where not chosen)
    out  += (h * g per r-block) @ B_cat       B_cat = [E*r, d_out]

An expert id outside [0, E) adds nothing and gets a zero weight gradient. As in every dense formulation, a
non-finite h of an expert a token did not choose meets a zero gate (0 * NaN = NaN); the grouped strategy is
the one that isolates experts. The regated rows (`regate=`) come from the readable dense reference.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.reference.lora_moe_dense import (
    _b_cat,
    plan_numel,
    regate_backward,
    regate_forward,
    saved_shape,
)

__all__ = ["backward", "forward", "forward_into", "plan_numel", "regate_backward", "regate_forward", "saved_shape"]


def _gates(weights: torch.Tensor, experts: torch.Tensor, num_experts: int, scaling: float, dtype: torch.dtype):
    """([T, E] scaled gate of each expert, [T, k] safe ids, [T, k] valid)."""
    valid = (experts >= 0) & (experts < num_experts)
    ids = torch.where(valid, experts, 0).long()
    gates = torch.zeros(experts.shape[0], num_experts, dtype=dtype, device=experts.device)
    return gates.scatter_add_(1, ids, torch.where(valid, weights.to(dtype) * scaling, 0.0)), ids, valid


def forward(x, lora_a, lora_b, weights, experts, scaling: float):
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    h, plan = forward_into(x, lora_a, lora_b, weights, experts, scaling, out)
    return out, h, plan


def forward_into(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor):
    num_experts, rank, d_in = lora_a.shape
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    h = x.to(dtype) @ lora_a.to(dtype).reshape(-1, d_in).T
    gates, _, _ = _gates(weights, experts, num_experts, scaling, dtype)
    gated = h.view(-1, num_experts, rank) * gates[:, :, None]
    if x.shape[0] <= rank:
        # A few tokens (decoding): expert by expert from B's own layout; [E, d_out, T] is smaller than the
        # [E*r, d_out] copy that one matmul would need.
        delta = torch.bmm(lora_b.to(dtype), gated.permute(1, 2, 0)).sum(0).T
    else:
        delta = gated.view(h.shape) @ _b_cat(lora_b, dtype)
    if out.dtype == dtype:
        out.add_(delta)
    else:
        out.add_(delta.to(out.dtype))
    return h, torch.empty(0, dtype=torch.int32, device=x.device)


def backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling: float):
    num_tokens, _ = experts.shape
    num_experts, rank, d_in = lora_a.shape
    dtype = h.dtype
    gy = grad_y.to(dtype)
    gates, ids, valid = _gates(weights, experts, num_experts, scaling, dtype)
    u = (gy @ _b_cat(lora_b, dtype).T).view(num_tokens, num_experts, rank)  # the gradient reaching h
    h3 = h.view(num_tokens, num_experts, rank)
    grad_h = (u * gates[:, :, None]).view(h.shape)
    gated = (h3 * gates[:, :, None]).view(h.shape)
    grad_x = grad_h @ lora_a.to(dtype).reshape(-1, d_in)
    grad_a = (grad_h.T @ x.to(dtype)).view(lora_a.shape)
    grad_b = (gated.T @ gy).view(num_experts, rank, -1).transpose(1, 2)
    grad_gates = (u * h3).sum(-1) * scaling  # [T, E]
    grad_weights = torch.where(valid, grad_gates.gather(1, ids), 0.0)
    return (grad_x.to(x.dtype), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype).contiguous(),
            grad_weights.to(weights.dtype))
