"""Routing: softmax over experts, top-k (ties to the lower expert id), optional renormalisation, statistics."""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)


def forward(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Returns (weights [T,k], experts [T,k] int32, counts [E] int32, probs_mean [E])."""
    num_tokens, num_experts = logits.shape
    probs = _softmax(logits)
    # A stable descending sort keeps equal probabilities in expert-id order: ties go to the lower id.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    top_probs, experts = sorted_probs[:, :top_k], order[:, :top_k]
    weights = top_probs / top_probs.sum(-1, keepdim=True) if renormalize else top_probs
    counts = torch.zeros(num_experts, dtype=torch.int32, device=logits.device)
    counts.scatter_add_(0, experts.reshape(-1), torch.ones_like(experts, dtype=torch.int32).reshape(-1))
    probs_mean = probs.sum(0) / max(num_tokens, 1)
    return weights.contiguous(), experts.to(torch.int32).contiguous(), counts, probs_mean


def backward(grad_weights, grad_probs_mean, logits, experts, renormalize: bool) -> torch.Tensor:
    """d loss / d logits given d loss / d weights [T,k] and d loss / d probs_mean [E]."""
    num_tokens = logits.shape[0]
    probs = _softmax(logits)
    experts = experts.long()
    # d probs_mean / d probs[t, e] = 1 / T for every token.
    grad_probs = grad_probs_mean.to(probs.dtype).expand_as(probs) / max(num_tokens, 1)
    grad_top = grad_weights.to(probs.dtype)
    if renormalize:
        # weights = top / sum(top): d/d top_j = (g_j - sum_i g_i w_i) / sum(top)
        top = probs.gather(1, experts)
        total = top.sum(-1, keepdim=True)
        grad_top = (grad_top - (grad_top * (top / total)).sum(-1, keepdim=True)) / total
    grad_probs = grad_probs.scatter_add(1, experts, grad_top)
    # softmax backward: dz = p * (dp - <p, dp>)
    grad_logits = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
    return grad_logits.to(logits.dtype)
