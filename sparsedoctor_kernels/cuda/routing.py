"""`route` on the CUDA extension: one warp per token (E <= 256). The backward recomputes the softmax from the
logits with the reference's expressions (no kernel of its own: it is one fused elementwise pass in torch)."""

from __future__ import annotations

import torch

from sparsedoctor_kernels import _C
from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels.cuda import MAX_EXPERTS
from sparsedoctor_kernels.reference.routing import (
    backward,  # noqa: F401 - this backend's backward
    masked_statistics,
)


def forward(logits: torch.Tensor, top_k: int, renormalize: bool, token_mask: torch.Tensor | None = None):
    if logits.dim() == 3:  # a batch of routings: the kernel routes one [T, E] at a time
        num_problems, num_tokens, num_experts = logits.shape
        if num_problems == 0:
            return tuple(empty(shape, dtype, logits.device) for shape, dtype in (
                ((0, num_tokens, top_k), torch.float32), ((0, num_tokens, top_k), torch.int32),
                ((0, num_experts), torch.int32), ((0, num_experts), torch.float32)))
        results = [forward(problem, top_k, renormalize, token_mask) for problem in logits.unbind(0)]
        return tuple(torch.stack(parts) for parts in zip(*results))
    num_tokens, num_experts = logits.shape
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"backend='cuda' routes at most {MAX_EXPERTS} experts, got E={num_experts}; "
                         "use backend='triton'")
    device = logits.device
    weights = empty((num_tokens, top_k), torch.float32, device)
    experts = empty((num_tokens, top_k), torch.int32, device)
    counts = empty((num_experts,), torch.int32, device)
    partial = empty((_C.route_partial_rows(num_tokens), num_experts), torch.float32, device)
    if num_tokens > 0:
        torch.ops.sparsedoctor_cuda.route_forward(logits.contiguous(), top_k, renormalize, weights, experts, counts,
                                                  partial)
    else:
        counts.zero_()
    if token_mask is not None:  # the kernel counts every token: the masked statistics by the reference's expressions
        counts, probs_mean = masked_statistics(logits, experts, token_mask)
    else:
        probs_mean = partial.sum(0) / max(num_tokens, 1)
    return weights, experts, counts, probs_mean
