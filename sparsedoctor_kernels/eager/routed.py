"""`routed_lora_moe` at decoding in eager PyTorch (CPU tensors, a handful of tokens): the router's logits,
softmax and top-k as `route` computes them, then each chosen expert's two matrix-vector products added into
the output; the chosen ids and gates are read on the host, which costs nothing for CPU tensors and saves the
routing statistics, the sort into expert order and a dozen small calls per layer that decoding would pay."""

from __future__ import annotations

import torch

from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.eager.lora_moe import add_pair_by_pair


def applies(x: torch.Tensor, lora_a: torch.Tensor, top_k: int, out: torch.Tensor) -> bool:
    """CPU tensors of one compute dtype (float32, float64) and at most one pair per expert on average."""
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    return (x.device.type == "cpu" and x.shape[0] * top_k <= lora_a.shape[0]
            and x.dtype == lora_a.dtype == out.dtype == dtype)


def infer(x, router, lora_a, lora_b, top_k: int, renormalize: bool, scaling: float, out: torch.Tensor) -> None:
    """out += routed_lora_moe(x, ...) for the inputs `applies` accepts."""
    probs = torch.softmax(x @ router.T, dim=-1)
    top, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # ties to the lower id, as `route`
    top = top[:, :top_k]
    weights = top / top.sum(-1, keepdim=True) if renormalize else top
    add_pair_by_pair(x, lora_a, lora_b, order[:, :top_k].tolist(), (weights * scaling).tolist(), out)
