"""`sibling_lora_moe` on the Triton dense kernels: S sibling projections of one x, x read once.

Launches per call (S siblings), against S separate dense `lora_moe` calls (2 forward, 4 backward each):
- forward, 2: one shrink over x with every sibling's A stacked ([S*E, r, d_in], the siblings' gates selected
  in per column block), then one expand of every sibling's column block into its own output (up to 3
  siblings a launch: q/k/v; 1 + S launches beyond);
- backward, 2S + 2: per sibling the shrink over its grad_y with B^T (its gated rank-space gradient written into
  its column block of one [T, S*E*r] buffer, and its gate gradients) and its dB; then one dx and one dA for
  every sibling at once, so grad_y is read twice per sibling and x once.
Bytes: x is read once forward and twice backward (dx writes it once) instead of S times each; the
rank-space rows are S*E*r fp32 columns, small next to d_in while E*r is (the dense strategy's premise).
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.triton._dtypes import dot_config
from sparsedoctor_kernels.triton.lora_moe_dense import _expand, _shrink, _sibling_expand, _weight_grad


def saved_shape(num_tokens: int, siblings: int, top_k: int, num_experts: int, rank: int) -> tuple[int, ...]:
    """Every sibling's rank-space rows, as the shrink wrote them."""
    return (num_tokens, siblings * num_experts * rank)


def forward_into(x, lora_a, lora_b: list[torch.Tensor], weights, experts, scaling: float,
                 outs: list[torch.Tensor]) -> torch.Tensor:
    siblings, num_experts, rank, d_in = lora_a.shape
    acc_dtype = compute_dtype(x.dtype)
    num_tokens = x.shape[0]
    width = num_experts * rank
    if num_tokens == 0:
        return torch.zeros(0, siblings * width, dtype=acc_dtype, device=x.device)
    dot = dot_config(x.dtype, acc_dtype)
    h, gated, _, _ = _shrink(x, lora_a.view(siblings * num_experts, rank, d_in), weights, experts, scaling, rank,
                             acc_dtype=acc_dtype, dot=dot, siblings=siblings)
    _sibling_expand(gated, lora_b, outs, rank, dot=dot)
    return h


def backward(grad_ys: list[torch.Tensor], x, lora_a, lora_b: list[torch.Tensor], weights, experts, h,
             scaling: float) -> list[torch.Tensor]:
    siblings, num_experts, rank, d_in = lora_a.shape
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return [torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(weights),
                *(torch.zeros_like(b) for b in lora_b)]
    acc_dtype = h.dtype
    dot = dot_config(x.dtype, acc_dtype)
    width = num_experts * rank
    grad_h = empty(h.shape, acc_dtype, x.device)
    grad_weights, grad_b = [], []
    for sibling, (grad_y, b) in enumerate(zip(grad_ys, lora_b)):
        columns = slice(sibling * width, (sibling + 1) * width)
        _, _, grad_gate, _ = _shrink(grad_y, b.transpose(1, 2), weights[sibling], experts[sibling], scaling, rank,
                                     acc_dtype=acc_dtype, dot=dot, h=h[:, columns], gated=grad_h[:, columns])
        grad_weights.append(grad_gate.to(weights.dtype))
        grad_b_sibling = _weight_grad(h[:, columns], grad_y, weights[sibling], experts[sibling], scaling, rank,
                                      gate=True, acc_dtype=acc_dtype, dot=dot)
        grad_b.append(grad_b_sibling.view(num_experts, rank, -1).transpose(1, 2).to(b.dtype).contiguous())
    stacked_a = lora_a.view(siblings * num_experts, rank, d_in)
    grad_x = empty((num_tokens, d_in), x.dtype, x.device)
    _expand(grad_h, stacked_a.transpose(1, 2), grad_x, rank, accumulate=False, dot=dot)
    grad_a = _weight_grad(grad_h, x, weights[0], experts[0], scaling, rank, gate=False, acc_dtype=acc_dtype, dot=dot)
    return [grad_x, grad_a.view(lora_a.shape).to(lora_a.dtype), torch.stack(grad_weights), *grad_b]
