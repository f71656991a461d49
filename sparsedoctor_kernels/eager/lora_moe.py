"""`lora_moe`'s grouped strategy in eager PyTorch: the (token, slot) pairs sorted by expert, then two matmuls per
expert on its contiguous run of pairs, forward, and four backward (ScatterMoE's order, in plain torch).

    order      pairs sorted by expert (ids outside [0, E) last, never computed)
    xs         x[token of each sorted pair]                        one gather of k * T rows
    h_e        xs_e @ A_e^T                                        [n_e, r], kept for the backward (fp32)
    y         += index_add(token, (s * w * h_e) @ B_e^T)           one scatter-add into the output

FLOPs are the chosen experts' only (k of E), so this is the CPU's strategy whenever E/k is more than ~2. The
per-expert run lengths are read on the host: free for CPU tensors, a synchronisation on CUDA, so the torch
backend on a GPU runs the dense strategy unless asked (`strategy="grouped"` there takes this path and waits).
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype


def saved_shape(num_tokens: int, top_k: int, num_experts: int, rank: int) -> tuple[int, ...]:
    """h as kept for the backward: one rank-r row per pair, in expert order."""
    return (num_tokens * top_k, rank)


def plan_numel(num_tokens: int, top_k: int, num_experts: int) -> int:
    """The plan: each pair's position (token * k + slot) in expert order, then E + 1 run starts."""
    return num_tokens * top_k + num_experts + 1


def _plan(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    flat = experts.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # invalid ids sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = torch.zeros(num_experts + 1, dtype=torch.long, device=experts.device)
    starts[1:] = counts[:num_experts].cumsum(0)
    return torch.cat([order, starts]).to(torch.int32)


def _unpack(plan: torch.Tensor, num_pairs: int, top_k: int):
    """(order [P] long, token [P] long, run bounds as host ints [E + 1])."""
    order = plan[:num_pairs].long()
    return order, torch.div(order, top_k, rounding_mode="floor"), plan[num_pairs:].tolist()


def _runs(bounds: list[int]):
    """(expert, start, end) of each expert that has pairs."""
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def forward(x, lora_a, lora_b, weights, experts, scaling: float):
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    h, plan = forward_into(x, lora_a, lora_b, weights, experts, scaling, out)
    return out, h, plan


def forward_into(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor):
    num_tokens, top_k = experts.shape
    num_experts, rank, _ = lora_a.shape
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    plan = _plan(experts, num_experts)
    order, token, bounds = _unpack(plan, num_tokens * top_k, top_k)
    h = x.new_zeros(num_tokens * top_k, rank, dtype=dtype)
    runs = _runs(bounds)
    if not runs:
        return h, plan
    used = bounds[num_experts]  # pairs with a valid expert; the rest stay zero
    xs = x.index_select(0, token[:used]).to(dtype)
    gate = (weights.reshape(-1)[order[:used]].to(dtype) * scaling)[:, None]
    delta = x.new_empty(used, lora_b.shape[1], dtype=dtype)
    for expert, start, end in runs:
        torch.mm(xs[start:end], lora_a[expert].to(dtype).T, out=h[start:end])
        torch.mm(h[start:end] * gate[start:end], lora_b[expert].to(dtype).T, out=delta[start:end])
    out.index_add_(0, token[:used], delta.to(out.dtype))
    return h, plan


def infer(x, lora_a, lora_b, weights, experts, scaling: float, out: torch.Tensor) -> None:
    """`forward_into` keeping nothing for a backward (grad mode off). A handful of pairs (decoding) go one by
    one: two matrix-vector products each from the chosen expert's own weights, so only k of the E experts'
    parameters are read and nothing is sorted or copied. The ids and gates are read on the host (free for
    CPU tensors)."""
    num_tokens, top_k = experts.shape
    num_experts = lora_a.shape[0]
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    if num_tokens * top_k > num_experts or not (x.dtype == lora_a.dtype == out.dtype == dtype):
        forward_into(x, lora_a, lora_b, weights, experts, scaling, out)
        return
    add_pair_by_pair(x, lora_a, lora_b, experts.tolist(), (weights.to(dtype) * scaling).tolist(), out)


def add_pair_by_pair(x, lora_a, lora_b, experts: list[list[int]], gates: list[list[float]], out) -> None:
    """out[t] += gate * B[e] @ (A[e] @ x[t]) for each (token, slot) pair given on the host, one matrix-vector
    product pair each from the chosen expert's own weights; a pair with no expert adds nothing."""
    num_experts = lora_a.shape[0]
    for token, (row, token_gates) in enumerate(zip(experts, gates)):
        x_row, out_row = x[token], out[token]
        for expert, gate in zip(row, token_gates):
            if 0 <= expert < num_experts:
                out_row.addmv_(lora_b[expert], torch.mv(lora_a[expert], x_row), alpha=gate)


def backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling: float):
    num_tokens, top_k = experts.shape
    num_experts, rank, d_in = lora_a.shape
    dtype = h.dtype
    order, token, bounds = _unpack(plan, num_tokens * top_k, top_k)
    grad_x = torch.zeros(num_tokens, d_in, dtype=dtype, device=x.device)
    grad_a, grad_b = torch.zeros_like(lora_a, dtype=dtype), torch.zeros_like(lora_b, dtype=dtype)
    grad_weights = torch.zeros(num_tokens * top_k, dtype=dtype, device=x.device)
    runs = _runs(bounds)
    if runs:
        used = bounds[num_experts]
        rows = token[:used]
        xs, gys = x.index_select(0, rows).to(dtype), grad_y.index_select(0, rows).to(dtype)
        gate = (weights.reshape(-1)[order[:used]].to(dtype) * scaling)[:, None]
        hu = h[:used]
        grad_xs = torch.empty(used, d_in, dtype=dtype, device=x.device)
        u = torch.empty(used, rank, dtype=dtype, device=x.device)
        for expert, start, end in runs:
            a, b = lora_a[expert].to(dtype), lora_b[expert].to(dtype)
            torch.mm(gys[start:end], b, out=u[start:end])  # the gradient reaching h, before its gate
            torch.mm(gys[start:end].T, hu[start:end] * gate[start:end], out=grad_b[expert])
            grad_h = u[start:end] * gate[start:end]
            torch.mm(grad_h.T, xs[start:end], out=grad_a[expert])
            torch.mm(grad_h, a, out=grad_xs[start:end])
        grad_x.index_add_(0, rows, grad_xs)
        grad_weights[order[:used]] = scaling * (u * hu).sum(-1)
    return (grad_x.to(x.dtype), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype),
            grad_weights.view(num_tokens, top_k).to(weights.dtype))
