"""The folded dense-expert strategy of `lora_moe`, written as plainly as it reads (the Triton kernels in
`triton/lora_moe_dense.py` fuse the same steps):

    h = x @ A_cat^T                          every expert's rank rows, A_cat = [E*r, d_in]
    gated = select(chosen, s * g * h)        g[t, e]: the token's weights on expert e; others selected out
    y = gated @ B_cat                        B_cat = [E*r, d_out]

and the backward from u = grad_y @ B_cat^T. A non-finite weight of an expert that a token did not choose is
multiplied by a zero gate in these products (0 * NaN = NaN): the grouped reference (`lora_moe.py`) is the one
that promises isolation.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype


def _gates(weights: torch.Tensor, experts: torch.Tensor, num_experts: int, rank: int, dtype: torch.dtype):
    """([T, E*r] the token's summed weight on each column's expert, [T, E*r] whether it chose that expert)."""
    columns = torch.arange(num_experts, device=experts.device).repeat_interleave(rank)
    hits = experts.long()[:, :, None] == columns[None, None, :]  # [T, k, E*r]; ids outside [0, E) hit nothing
    gate = torch.where(hits, weights.to(dtype)[:, :, None], 0.0).sum(1)
    return gate, hits.any(1)


def _a_cat(lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return lora_a.to(dtype).reshape(-1, lora_a.shape[-1])  # [E*r, d_in]


def _b_cat(lora_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return lora_b.to(dtype).transpose(1, 2).reshape(-1, lora_b.shape[1])  # [E*r, d_out]


def saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int) -> tuple[int, ...]:
    return (num_tokens, num_experts * rank)


def plan_numel(num_tokens: int, top_k: int, num_experts: int) -> int:
    return 0


def forward(x, lora_a, lora_b, weights, experts, scaling: float):
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    num_experts, rank, _ = lora_a.shape
    h = x.to(dtype) @ _a_cat(lora_a, dtype).T
    gate, chosen = _gates(weights, experts, num_experts, rank, dtype)
    y = torch.where(chosen, scaling * gate * h, 0.0) @ _b_cat(lora_b, dtype)
    return y.to(x.dtype), h, torch.empty(0, dtype=torch.int32, device=x.device)


def forward_into(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor):
    y, h, plan = forward(x, lora_a, lora_b, weights, experts, scaling)
    out.add_(y)
    return h, plan


def backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling: float):
    grad_x, grad_a, grad_b, grad_weights = _grads(grad_y, x, lora_a, lora_b, weights, experts, h, scaling)
    return (grad_x.to(x.dtype), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype).contiguous(),
            grad_weights.to(weights.dtype))


def _grads(grad_y, x, lora_a, lora_b, weights, experts, h, scaling: float):
    """The gradients in the compute dtype (grad_b as [E, d_out, r], possibly strided)."""
    dtype = h.dtype
    num_tokens, top_k = experts.shape
    num_experts, rank, _ = lora_a.shape
    gy = grad_y.to(dtype)
    u = gy @ _b_cat(lora_b, dtype).T  # [T, E*r]
    gate, chosen = _gates(weights, experts, num_experts, rank, dtype)
    grad_h = torch.where(chosen, scaling * gate * u, 0.0)
    gated = torch.where(chosen, scaling * gate * h, 0.0)
    # dweights[t, j] = s <u_e, h_e> for the slot's expert e (zero for ids outside [0, E)).
    u_h = torch.where(chosen, u * h, 0.0).view(num_tokens, num_experts, rank).sum(-1)  # [T, E]
    valid = (experts >= 0) & (experts < num_experts)
    picked = u_h.gather(1, torch.where(valid, experts, 0).long())
    grad_weights = torch.where(valid, scaling * picked, 0.0)
    grad_x = grad_h @ _a_cat(lora_a, dtype)
    grad_a = (grad_h.T @ x.to(dtype)).view(lora_a.shape)
    grad_b = (gy.T @ gated).view(-1, num_experts, rank).permute(1, 0, 2)
    return grad_x, grad_a, grad_b, grad_weights


def _rows_of(h: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h[rows], zero for a row outside [0, T); whether each row is inside)."""
    valid = (rows >= 0) & (rows < h.shape[0])
    if h.shape[0] == 0:
        return h.new_zeros(rows.shape[0], h.shape[1]), valid
    return torch.where(valid[:, None], h[torch.where(valid, rows, 0)], 0.0), valid


def regate_forward(x, lora_a, lora_b, weights, experts, scaling: float, out, accumulate: bool, rows, rows_weights,
                   rows_experts):
    """The call into `out` (added, or written when not `accumulate`), and the regated rows from the same h:
    y2[i] = select(chosen2, s * g2 * h[rows[i]]) @ B_cat. Returns (y2, h)."""
    y, h, _ = forward(x, lora_a, lora_b, weights, experts, scaling)
    if accumulate:
        out.add_(y)
    else:
        out.copy_(y)
    num_experts, rank, _ = lora_a.shape
    h_rows, _ = _rows_of(h, rows)
    gate, chosen = _gates(rows_weights, rows_experts, num_experts, rank, h.dtype)
    y2 = torch.where(chosen, scaling * gate * h_rows, 0.0) @ _b_cat(lora_b, h.dtype)
    return y2.to(x.dtype), h


def regate_backward(grad_y, grad_rows, x, lora_a, lora_b, weights, experts, h, rows, rows_weights, rows_experts,
                    scaling: float, h_rows=None):
    """The call's gradients plus the regated rows': each regated row is the call's expand of its own gates on
    h[rows[i]], so its gradient reaches x[rows[i]] and A through that row of h (`h_rows`: those rows, when the
    caller kept them apart from h)."""
    grad_x, grad_a, grad_b, grad_weights = _grads(grad_y, x, lora_a, lora_b, weights, experts, h, scaling)
    dtype = h.dtype
    num_experts, rank, _ = lora_a.shape
    kept_rows = h_rows
    h_rows, valid = _rows_of(h, rows)
    if kept_rows is not None:
        h_rows = kept_rows
    g2 = grad_rows.to(dtype)
    u2 = g2 @ _b_cat(lora_b, dtype).T
    gate, chosen = _gates(rows_weights, rows_experts, num_experts, rank, dtype)
    chosen = chosen & valid[:, None]
    grad_h_rows = torch.where(chosen, scaling * gate * u2, 0.0)
    gated = torch.where(chosen, scaling * gate * h_rows, 0.0)
    u_h = torch.where(chosen, u2 * h_rows, 0.0).view(-1, num_experts, rank).sum(-1)
    ids_valid = (rows_experts >= 0) & (rows_experts < num_experts)
    picked = u_h.gather(1, torch.where(ids_valid, rows_experts, 0).long())
    grad_rows_weights = torch.where(ids_valid, scaling * picked, 0.0)
    # Through h[rows]: grad x[rows] += grad_h_rows @ A_cat, grad A += grad_h_rows^T x[rows] (rows may repeat).
    safe = torch.where(valid, rows, 0).long()
    if x.shape[0]:
        grad_x = grad_x.index_add(0, safe, grad_h_rows @ _a_cat(lora_a, dtype))
        grad_a = grad_a + (grad_h_rows.T @ x.to(dtype)[safe]).view(lora_a.shape)
    grad_b = grad_b + (g2.T @ gated).view(-1, num_experts, rank).permute(1, 0, 2)
    return (grad_x.to(x.dtype), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype).contiguous(),
            grad_weights.to(weights.dtype), grad_rows_weights.to(rows_weights.dtype))
