"""`lora_moe`'s dense strategy in eager PyTorch: every expert from one read of x, the gates multiplied in, one
`addmm_` into the output. Sync-free, so it is the torch backend's choice on a GPU and wherever E*r is small.

    h     = x @ A_cat^T                       [T, E*r]; of it the backward keeps each slot's own block [T, k*r]
    g     = scatter_add(experts, s * w)       [T, E]: the token's weight on each expert (0 where not chosen)
    out  += (h * g per r-block) @ B_cat       B_cat = [E*r, d_out]

An expert id outside [0, E) adds nothing and gets a zero weight gradient. As in every dense formulation, a
non-finite h of an expert a token did not choose meets a zero gate (0 * NaN = NaN); the grouped strategy is
the one that isolates experts. The regated rows (`regate=`) come from the readable dense reference.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.reference import lora_moe_dense as reference
from sparsedoctor_kernels.reference.lora_moe_dense import _b_cat, _rows_of, plan_numel

__all__ = ["backward", "expand_backward", "expand_into", "forward", "forward_into", "infer", "plan_numel",
           "regate_backward", "regate_forward", "regate_saved_shape", "saved_shape", "select_blocks", "shrink",
           "shrink_backward", "unselect_blocks"]


def _gates(weights: torch.Tensor, experts: torch.Tensor, num_experts: int, scaling: float, dtype: torch.dtype):
    """([T, E] scaled gate of each expert, [T, k] safe ids, [T, k] valid)."""
    valid = (experts >= 0) & (experts < num_experts)
    ids = torch.where(valid, experts, 0).long()
    gates = torch.zeros(experts.shape[0], num_experts, dtype=dtype, device=experts.device)
    return gates.scatter_add_(1, ids, torch.where(valid, weights.to(dtype) * scaling, 0.0)), ids, valid


def saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int) -> tuple[int, ...]:
    """The backward needs of h only the chosen experts' blocks (every other block meets a zero gate): k/E of it."""
    return (num_tokens, top_k * rank)


def _slot_ids(experts: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """[T, k, r] each slot's expert id (0 for an id outside [0, E), whose gate is 0), repeated over the rank."""
    ids = torch.where((experts >= 0) & (experts < num_experts), experts, 0).long()
    return ids[:, :, None].expand(*ids.shape, rank)


def select_blocks(h: torch.Tensor, experts: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """[T, k*r]: each slot's expert block of h [T, E*r] (a column block of a wider h works)."""
    num_tokens, top_k = experts.shape
    blocks = h.view(num_tokens, num_experts, rank).gather(1, _slot_ids(experts, num_experts, rank))
    return blocks.view(num_tokens, top_k * rank)


def unselect_blocks(selected: torch.Tensor, experts: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """h [T, E*r] back from `select_blocks`, zeros in the blocks no slot chose (which meet zero gates)."""
    num_tokens, top_k = experts.shape
    h = selected.new_zeros(num_tokens, num_experts, rank)
    h.scatter_(1, _slot_ids(experts, num_experts, rank), selected.view(num_tokens, top_k, rank))
    return h.view(num_tokens, num_experts * rank)


def forward(x, lora_a, lora_b, weights, experts, scaling: float):
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    h, plan = forward_into(x, lora_a, lora_b, weights, experts, scaling, out)
    return out, h, plan


def shrink(x, lora_a) -> torch.Tensor:
    """h = x @ A_cat^T [T, E*r] in the compute dtype: every expert's rank-space rows from one read of x (lora_a
    [..., r, d_in]: one projection's experts, or several siblings' stacked)."""
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    return x.to(dtype) @ lora_a.to(dtype).reshape(-1, lora_a.shape[-1]).T


def shrink_backward(grad_h, x, lora_a) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x, grad lora_a) of `shrink` given the gradient reaching h, each in its input's dtype."""
    grad_x = grad_h @ lora_a.to(grad_h.dtype).reshape(-1, lora_a.shape[-1])
    grad_a = (grad_h.T @ x.to(grad_h.dtype)).view(lora_a.shape)
    return grad_x.to(x.dtype), grad_a.to(lora_a.dtype)


def forward_into(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor):
    num_experts, rank, _ = lora_a.shape
    h = shrink(x, lora_a)
    expand_into(h, lora_b, weights, experts, scaling, out)
    return select_blocks(h, experts, num_experts, rank), torch.empty(0, dtype=torch.int32, device=x.device)


def infer(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor) -> None:
    """`forward_into` keeping nothing for a backward (grad mode off)."""
    expand_into(shrink(x, lora_a), lora_b, weights, experts, scaling, out)


def expand_into(h, lora_b, weights, experts, scaling: float, out: torch.Tensor) -> None:
    """out += (s * g ⊙ h) @ B_cat for h [T, E*r] (a column block of a wider h works: its rows need not be
    contiguous with each other)."""
    num_experts, _, rank = lora_b.shape
    dtype = h.dtype
    gates, _, _ = _gates(weights, experts, num_experts, scaling, dtype)
    gated = h.view(h.shape[0], num_experts, rank) * gates[:, :, None]
    if h.shape[0] <= rank:
        # A few tokens (decoding): expert by expert from B's own layout; [E, d_out, T] is smaller than the
        # [E*r, d_out] copy that one matmul would need.
        delta = torch.bmm(lora_b.to(dtype), gated.permute(1, 2, 0)).sum(0).T
    else:
        delta = gated.view(h.shape[0], num_experts * rank) @ _b_cat(lora_b, dtype)
    if out.dtype == dtype:
        out.add_(delta)
    else:
        out.add_(delta.to(out.dtype))


def backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling: float):
    num_experts, rank, _ = lora_a.shape
    h = unselect_blocks(h, experts, num_experts, rank)
    grad_h, grad_b, grad_weights = expand_backward(grad_y, h, lora_b, weights, experts, scaling)
    return (*shrink_backward(grad_h, x, lora_a), grad_b, grad_weights)


def expand_backward(grad_y, h, lora_b, weights, experts, scaling: float, grad_h: torch.Tensor | None = None):
    """(grad_h [T, E*r], grad_b, grad_weights) of `expand_into`; with `grad_h` given (a column block of a wider
    buffer), the gradient reaching h is written there."""
    num_tokens, _ = experts.shape
    num_experts, _, rank = lora_b.shape
    dtype = h.dtype
    gy = grad_y.to(dtype)
    gates, ids, valid = _gates(weights, experts, num_experts, scaling, dtype)
    u = (gy @ _b_cat(lora_b, dtype).T).view(num_tokens, num_experts, rank)  # the gradient reaching h, ungated
    h3 = h.view(num_tokens, num_experts, rank)
    if grad_h is None:
        grad_h = (u * gates[:, :, None]).view(num_tokens, num_experts * rank)
    else:
        torch.mul(u, gates[:, :, None], out=grad_h.view(num_tokens, num_experts, rank))
    gated = (h3 * gates[:, :, None]).view(num_tokens, num_experts * rank)
    grad_b = (gated.T @ gy).view(num_experts, rank, -1).transpose(1, 2)
    grad_gates = (u * h3).sum(-1) * scaling  # [T, E]
    grad_weights = torch.where(valid, grad_gates.gather(1, ids), 0.0)
    return grad_h, grad_b.to(lora_b.dtype).contiguous(), grad_weights.to(weights.dtype)


def regate_saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int, num_rows: int) -> tuple[int, ...]:
    """The regated call keeps the call's chosen blocks of h and the regated rows' whole h (the rows may regate
    other experts), packed flat: per token k*r values, per regated row E*r."""
    return (num_tokens * top_k * rank + num_rows * num_experts * rank,)


def regate_forward(x, lora_a, lora_b, weights, experts, scaling: float, out, accumulate: bool, rows, rows_weights,
                   rows_experts):
    """The reference's regated call (y2, then h packed as `regate_saved_shape` says)."""
    y2, h = reference.regate_forward(x, lora_a, lora_b, weights, experts, scaling, out, accumulate, rows,
                                     rows_weights, rows_experts)
    num_experts, rank, _ = lora_a.shape
    kept = select_blocks(h, experts, num_experts, rank)
    return y2, torch.cat([kept.reshape(-1), _rows_of(h, rows)[0].reshape(-1)])


def regate_backward(grad_y, grad_rows, x, lora_a, lora_b, weights, experts, h, rows, rows_weights, rows_experts,
                    scaling: float):
    num_tokens, top_k = experts.shape
    num_experts, rank, _ = lora_a.shape
    split = num_tokens * top_k * rank
    full = unselect_blocks(h[:split].view(num_tokens, top_k * rank), experts, num_experts, rank)
    h_rows = h[split:].view(rows.shape[0], num_experts * rank)
    return reference.regate_backward(grad_y, grad_rows, x, lora_a, lora_b, weights, experts, full, rows,
                                     rows_weights, rows_experts, scaling, h_rows=h_rows)
