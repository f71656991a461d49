"""`route` in eager PyTorch: the reference's function in fewer calls (on CPU tensors with every token counted,
the per-expert counts by one `bincount`, which on a GPU would wait on the host for its size); its backward and
the masked statistics are the reference's."""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.reference.routing import _statistics, backward, masked_statistics

__all__ = ["backward", "forward", "forward_without_statistics", "masked_statistics"]


def _top(logits: torch.Tensor, top_k: int, renormalize: bool):
    """(probs, weights, order): the softmax, the chosen probabilities (renormalised) and the sort order."""
    probs = torch.softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
    # A stable descending sort keeps equal probabilities in expert-id order: ties go to the lower id.
    top, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    top = top[..., :top_k]
    weights = top / top.sum(-1, keepdim=True) if renormalize else top.contiguous()
    return probs, weights, order


def forward_without_statistics(logits: torch.Tensor, top_k: int, renormalize: bool):
    """(weights, experts) of `forward`, without the counts and probability means (inference)."""
    _, weights, order = _top(logits, top_k, renormalize)
    return weights, order[..., :top_k].to(torch.int32)


def forward(logits: torch.Tensor, top_k: int, renormalize: bool, token_mask: torch.Tensor | None = None):
    """Returns (weights [T,k], experts [T,k] int32, counts [E] int32, probs_mean [E]) as the reference does
    (with the logits' leading batch dim, if any)."""
    num_tokens, num_experts = logits.shape[-2:]
    probs, weights, order = _top(logits, top_k, renormalize)
    experts = order[..., :top_k].to(torch.int32)
    if token_mask is not None or probs.device.type != "cpu" or logits.dim() != 2:
        return (weights, experts, *_statistics(probs, experts, token_mask))
    counts = torch.bincount(order[:, :top_k].reshape(-1), minlength=num_experts).to(torch.int32)
    return weights, experts, counts, probs.sum(0) / max(num_tokens, 1)
