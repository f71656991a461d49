"""`routed_lora_moe` at decoding in eager PyTorch (CPU tensors, a handful of tokens): the router's logits,
softmax and top-k as `route` computes them, then each chosen expert's two matrix-vector products added into
the output; the softmax is read on the host, which costs nothing for CPU tensors, and the top-k and gates are
computed there in float32 as `route` computes them: no routing statistics, no sort into expert order and none
of the dozen small calls per layer that decoding would otherwise pay."""

from __future__ import annotations

import numpy
import torch

from sparsedoctor_kernels._validation import compute_dtype
from sparsedoctor_kernels.eager.lora_moe import add_pair_by_pair
from sparsedoctor_kernels.eager.routing import forward_without_statistics


def applies(x: torch.Tensor, lora_a: torch.Tensor, top_k: int, out: torch.Tensor) -> bool:
    """CPU tensors of one compute dtype (float32, float64) and at most one pair per expert on average."""
    dtype = compute_dtype(x.dtype, lora_a.dtype)
    return (x.device.type == "cpu" and x.shape[0] * top_k <= lora_a.shape[0]
            and x.dtype == lora_a.dtype == out.dtype == dtype)


# Up to this k, the host's float32 arithmetic below rounds as torch's does on CPU (a sum of k float32 values
# left to right; torch's vectorised sum reorders longer rows), so the gates are route's bit for bit.
HOST_TOP_K = 4


def infer(x, router, lora_a, lora_b, top_k: int, renormalize: bool, scaling: float, out: torch.Tensor) -> None:
    """out += routed_lora_moe(x, ...) for the inputs `applies` accepts."""
    logits = x @ router.T
    if top_k <= HOST_TOP_K and logits.dtype == torch.float32:
        picked = [_host_top(row, top_k, renormalize, scaling) for row in torch.softmax(logits, dim=-1).tolist()]
        experts, gates = [ids for ids, _ in picked], [row_gates for _, row_gates in picked]
    else:  # `route`'s own eager top-k
        weights, chosen = forward_without_statistics(logits, top_k, renormalize)
        experts, gates = chosen.tolist(), (weights * scaling).tolist()
    add_pair_by_pair(x, lora_a, lora_b, experts, gates, out)


def _host_top(probs: list[float], top_k: int, renormalize: bool, scaling: float) -> tuple[list[int], list[float]]:
    """(experts, gates * scaling) of one token from its float32 softmax read to the host, as `route` and
    `lora_moe` compute them in float32: the top k, ties to the lower id (a stable sort); a row without a finite
    softmax (NaN) takes experts 0..k-1 with NaN gates, as `route` gives it."""
    if any(p != p for p in probs):
        return list(range(top_k)), [float("nan")] * top_k
    experts = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:top_k]  # stable: ties keep id order
    top = [numpy.float32(probs[e]) for e in experts]
    if renormalize:
        total = top[0]
        for value in top[1:]:
            total = numpy.float32(total + value)
        top = [numpy.float32(value / total) for value in top]
    scale = numpy.float32(scaling)
    return experts, [float(numpy.float32(value * scale)) for value in top]
