"""`sibling_lora_moe` in eager PyTorch: the dense strategy of `lora_moe` for S sibling projections that read
the same x, with one shrink for all of them.

    h      = x @ [A_1; ...; A_S]^T             [T, S*E*r], one read of x; the backward keeps each slot's block
    out_s += (s * g_s ⊙ h_s) @ B_cat_s         each sibling's own gates and B (its d_out is its own)
    backward: grad_h_s from u_s = grad_y_s @ B_cat_s^T, then one dx = grad_h @ A_stack and one dA = grad_h^T x

Each sibling's output is bit for bit what `lora_moe`'s dense strategy gives it alone (a column block of one
matmul is the matmul of that block); dx sums the siblings' contributions inside one matmul, so it differs from
the sum of three separate calls' dx by rounding only.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels.eager.lora_moe_dense import (
    expand_backward,
    expand_into,
    select_blocks,
    shrink,
    shrink_backward,
    unselect_blocks,
)


def saved_shape(num_tokens: int, siblings: int, top_k: int, num_experts: int, rank: int) -> tuple[int, ...]:
    """Each sibling's chosen experts' blocks of h: the others meet zero gates in the backward."""
    return (num_tokens, siblings * top_k * rank)


def forward_into(x, lora_a, lora_b: list[torch.Tensor], weights, experts, scaling: float,
                 outs: list[torch.Tensor]) -> torch.Tensor:
    """lora_a [S, E, r, d_in], lora_b S x [E, d_out_s, r], weights / experts [S, T, k]; adds into outs; returns
    the chosen blocks of h for the backward."""
    siblings, num_experts, rank, _ = lora_a.shape
    h = shrink(x, lora_a)  # every sibling's experts from one read of x
    width = num_experts * rank
    kept = []
    for sibling, (b, out) in enumerate(zip(lora_b, outs)):
        block = h[:, sibling * width:(sibling + 1) * width]
        expand_into(block, b, weights[sibling], experts[sibling], scaling, out)
        kept.append(select_blocks(block, experts[sibling], num_experts, rank))
    return torch.cat(kept, dim=1)


def backward(grad_ys: list[torch.Tensor], x, lora_a, lora_b: list[torch.Tensor], weights, experts, h,
             scaling: float) -> list[torch.Tensor]:
    """[grad_x, grad_a [S, E, r, d_in], grad_weights [S, T, k], grad_b_1, ..., grad_b_S]."""
    siblings, num_experts, rank, _ = lora_a.shape
    top_k = experts.shape[-1]
    width, kept = num_experts * rank, top_k * rank
    grad_h = h.new_empty(x.shape[0], siblings * width)
    grad_weights = torch.empty_like(weights)
    grad_b = []
    for sibling, (grad_y, b) in enumerate(zip(grad_ys, lora_b)):
        columns = slice(sibling * width, (sibling + 1) * width)
        h_sibling = unselect_blocks(h[:, sibling * kept:(sibling + 1) * kept], experts[sibling], num_experts, rank)
        _, grad_b_sibling, grad_weights[sibling] = expand_backward(
            grad_y, h_sibling, b, weights[sibling], experts[sibling], scaling, grad_h=grad_h[:, columns])
        grad_b.append(grad_b_sibling)
    grad_x, grad_a = shrink_backward(grad_h, x, lora_a)  # every sibling's dx and dA in one matmul each
    return [grad_x, grad_a, grad_weights, *grad_b]
