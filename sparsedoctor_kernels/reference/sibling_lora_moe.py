"""`sibling_lora_moe`, readably: S sibling projections of one input are S `lora_moe` calls.

    outs[s] += lora_moe(x, lora_a[s], lora_b[s], weights[s], experts[s], scaling)

The fused backends read x once for every sibling; the function is this one."""

from __future__ import annotations

import torch

from sparsedoctor_kernels.reference import lora_moe


def forward_into(x, lora_a, lora_b: list[torch.Tensor], weights, experts, scaling: float,
                 outs: list[torch.Tensor]) -> torch.Tensor:
    """lora_a [S, E, r, d_in], lora_b S x [E, d_out_s, r], weights / experts [S, T, k]; adds into outs; returns
    the siblings' rank-space rows [S, T, k, r] for the backward."""
    saved = [lora_moe.forward_into(x, lora_a[s], b, weights[s], experts[s], scaling, out)[0]
             for s, (b, out) in enumerate(zip(lora_b, outs))]
    return torch.stack(saved) if saved else x.new_empty(0)


def backward(grad_ys: list[torch.Tensor], x, lora_a, lora_b: list[torch.Tensor], weights, experts, h,
             scaling: float) -> list[torch.Tensor]:
    """[grad_x, grad_a [S, E, r, d_in], grad_weights [S, T, k], grad_b_1, ..., grad_b_S]."""
    grads = [lora_moe.backward(grad_y, x, lora_a[s], b, weights[s], experts[s], h[s], None, scaling)
             for s, (grad_y, b) in enumerate(zip(grad_ys, lora_b))]
    grad_x = torch.stack([g[0] for g in grads]).sum(0)
    return [grad_x, torch.stack([g[1] for g in grads]), torch.stack([g[3] for g in grads]), *(g[2] for g in grads)]
