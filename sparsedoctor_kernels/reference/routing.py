"""Routing: softmax over experts, top-k (ties to the lower expert id), optional renormalisation, statistics.

Logits [T, E], or a batch [S, T, E] of S routings of the same T tokens (sibling projections' routers): every
expression below reads the experts along the last dim and the tokens along the one before it."""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)


def real_tokens(token_mask: torch.Tensor | None, num_tokens: int, dtype: torch.dtype, device):
    """([T] 1 for the tokens the statistics count, 0 for the others; their number, at least 1, as a tensor)."""
    if token_mask is None:
        return torch.ones(num_tokens, dtype=dtype, device=device), max(num_tokens, 1)
    real = token_mask.to(dtype)
    return real, real.sum().clamp_min(1)


def forward(logits: torch.Tensor, top_k: int, renormalize: bool, token_mask: torch.Tensor | None = None):
    """Returns (weights [T,k], experts [T,k] int32, counts [E] int32, probs_mean [E]), each with the logits'
    leading batch dim if any; with `token_mask` the counts and the mean cover only the tokens it marks."""
    probs = _softmax(logits)
    # A stable descending sort keeps equal probabilities in expert-id order: ties go to the lower id.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    top_probs, experts = sorted_probs[..., :top_k], order[..., :top_k]
    weights = top_probs / top_probs.sum(-1, keepdim=True) if renormalize else top_probs
    counts, probs_mean = _statistics(probs, experts, token_mask)
    return weights.contiguous(), experts.to(torch.int32).contiguous(), counts, probs_mean


def _statistics(probs, experts, token_mask):
    """(counts [E] int32, probs_mean [E]) over the tokens `token_mask` marks (all without one)."""
    num_tokens, num_experts = probs.shape[-2:]
    batch = probs.shape[:-2]
    real, num_real = real_tokens(token_mask, num_tokens, probs.dtype, probs.device)
    counts = torch.zeros(*batch, num_experts, dtype=torch.int32, device=probs.device)
    pairs = real.to(torch.int32)[:, None].expand(experts.shape)
    pairs_per_routing = experts.shape[-2] * experts.shape[-1]
    counts.scatter_add_(-1, experts.reshape(*batch, pairs_per_routing).long(), pairs.reshape(*batch, pairs_per_routing))
    # Selected, not multiplied: a left-out token's NaN probabilities (padding) must not reach the mean.
    probs_mean = (probs if token_mask is None else torch.where(token_mask[:, None], probs, 0.0)).sum(-2) / num_real
    return counts, probs_mean


def masked_statistics(logits, experts, token_mask):
    """The statistics of `forward` for given experts (a backend whose kernel has no mask recomputes them)."""
    return _statistics(_softmax(logits), experts, token_mask)


def backward(grad_weights, grad_probs_mean, logits, experts, renormalize: bool,
             token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """d loss / d logits given d loss / d weights [T,k] and d loss / d probs_mean [E] (batched like the logits)."""
    num_tokens = logits.shape[-2]
    probs = _softmax(logits)
    experts = experts.long()
    # d probs_mean / d probs[t, e] = 1 / (tokens counted) for every counted token, 0 for the others.
    real, num_real = real_tokens(token_mask, num_tokens, probs.dtype, logits.device)
    grad_probs = grad_probs_mean.to(probs.dtype)[..., None, :] * (real / num_real)[:, None]
    grad_top = grad_weights.to(probs.dtype)
    if renormalize:
        # weights = top / sum(top): d/d top_j = (g_j - sum_i g_i w_i) / sum(top)
        top = probs.gather(-1, experts)
        total = top.sum(-1, keepdim=True)
        grad_top = (grad_top - (grad_top * (top / total)).sum(-1, keepdim=True)) / total
    grad_probs = grad_probs.scatter_add(-1, experts, grad_top)
    # softmax backward: dz = p * (dp - <p, dp>)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
    return grad_logits.to(logits.dtype)
