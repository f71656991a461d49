"""`route`: softmax over experts + top-k + renormalisation + per-expert counts and mean probabilities."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparsedoctor_kernels import eager
from sparsedoctor_kernels._backend import LazyImplementation, calls_directly, resolve_backend
from sparsedoctor_kernels._validation import (
    compute_dtype,
    require_dtype,
    require_float,
    require_positive_int,
    require_same_device,
    require_shape,
)

# Backends in order of preference on the GPU; the reference last.
IMPLEMENTATIONS = {
    "triton": LazyImplementation("sparsedoctor_kernels.triton.routing"),
    "cuda": LazyImplementation("sparsedoctor_kernels.cuda.routing"),
    "torch": eager.routing,
}


class Routing(NamedTuple):
    """One routing; for a batch of S routings ([S, T, E] logits) every field has the leading S, and
    `routing[s]`-style access is `Routing(*(field[s] for field in routing))` (`select`)."""

    weights: torch.Tensor  # [T, k] float32, differentiable
    experts: torch.Tensor  # [T, k] int32, descending probability, ties to the lower id
    counts: torch.Tensor  # [E] int32, (token, slot) pairs per expert
    probs_mean: torch.Tensor  # [E] float32, softmax probabilities averaged over tokens, differentiable

    def select(self, index: int) -> Routing:
        """Routing `index` of a batch, as views (no copy, no launch)."""
        return Routing(*(field[index] for field in self))


@torch.library.custom_op("sparsedoctor::route_forward", mutates_args=())
def _route_forward(
    logits: torch.Tensor, top_k: int, renormalize: bool, backend: str, token_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return IMPLEMENTATIONS[backend].forward(logits, top_k, renormalize, token_mask)


@_route_forward.register_fake
def _(logits, top_k, renormalize, backend, token_mask):
    *batch, num_tokens, num_experts = logits.shape
    dtype = compute_dtype(logits.dtype)
    return (
        logits.new_empty((*batch, num_tokens, top_k), dtype=dtype),
        logits.new_empty((*batch, num_tokens, top_k), dtype=torch.int32),
        logits.new_empty((*batch, num_experts), dtype=torch.int32),
        logits.new_empty((*batch, num_experts), dtype=dtype),
    )


@torch.library.custom_op("sparsedoctor::route_backward", mutates_args=())
def _route_backward(
    grad_weights: torch.Tensor, grad_probs_mean: torch.Tensor, logits: torch.Tensor, experts: torch.Tensor,
    renormalize: bool, backend: str, token_mask: torch.Tensor | None,
) -> torch.Tensor:
    grad_logits = IMPLEMENTATIONS[backend].backward(grad_weights, grad_probs_mean, logits, experts, renormalize,
                                                    token_mask)
    # The layout the fake promises, the logits' own when dense (a transposed GEMM output's gradient then needs no
    # copy on its way back); the Triton backend writes it, the others may return another.
    like = torch.empty_like(logits)
    return grad_logits if like.stride() == grad_logits.stride() else like.copy_(grad_logits)


@_route_backward.register_fake
def _(grad_weights, grad_probs_mean, logits, experts, renormalize, backend, token_mask):
    return torch.empty_like(logits)  # as the backends allocate it: the logits' strides when dense


class _RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, renormalize, backend, token_mask):
        weights, experts, counts, probs_mean = _route_forward(logits, top_k, renormalize, backend, token_mask)
        ctx.save_for_backward(logits, experts, token_mask)
        ctx.renormalize, ctx.backend = renormalize, backend
        ctx.mark_non_differentiable(experts, counts)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the int outputs (two launches each call)
        return weights, experts, counts, probs_mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weights, grad_experts, grad_counts, grad_probs_mean):
        logits, experts, token_mask = ctx.saved_tensors
        dtype = compute_dtype(logits.dtype)
        if grad_weights is None:
            grad_weights = experts.new_zeros(experts.shape, dtype=dtype)
        if grad_probs_mean is None:
            grad_probs_mean = logits.new_zeros((*logits.shape[:-2], logits.shape[-1]), dtype=dtype)
        grad_logits = _route_backward(
            grad_weights.contiguous(), grad_probs_mean.contiguous(), logits, experts, ctx.renormalize, ctx.backend,
            token_mask,
        )
        return grad_logits, None, None, None, None


def route(logits: torch.Tensor, top_k: int, *, renormalize: bool = True, backend: str | None = None,
          validate: bool | None = None, token_mask: torch.Tensor | None = None) -> Routing:
    """Route each token to its `top_k` most probable experts.

    `logits` [T, E] (float32, bfloat16 or float16; float64 computes in float64) gives
    `Routing(weights [T, k], experts [T, k] int32, counts [E] int32, probs_mean [E])` with
    `p = softmax(logits.float())`, `weights[t, j] = p[t, experts[t, j]]` (divided by their sum when
    `renormalize`), `counts` the (token, slot) pairs per expert and `probs_mean = p.mean(0)`.
    `validate` is accepted like every op's; routing reads no ids, so it has nothing data-dependent to check.
    `token_mask` ([T] bool, optional) restricts the statistics to the tokens it marks (padding left out):
    `counts` counts their pairs only and `probs_mean` averages over them (0 when none is marked); weights and
    experts are computed for every token.

    `logits` [S, T, E] routes a batch of S independent routings of the same tokens (sibling projections'
    routers, read through their strides: a transposed view of one [T, S * E] GEMM output is not copied) in the
    launches of one: every field gains the leading S (`Routing.select(s)` gives routing s).
    """
    require_float("logits", logits)
    if logits.dim() not in (2, 3) or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [T, E] or [S, T, E] with E >= 1, got {list(logits.shape)}")
    num_tokens, num_experts = logits.shape[-2:]
    require_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k must be in [1, E] = [1, {num_experts}], got {top_k}")
    if token_mask is not None:
        require_dtype("token_mask", token_mask, (torch.bool,))
        require_shape("token_mask", token_mask, (num_tokens,), f"[T={num_tokens}]")
        require_same_device(logits=logits, token_mask=token_mask)
        token_mask = token_mask.contiguous()
    backend = resolve_backend("route", backend, logits.device, tuple(IMPLEMENTATIONS))
    logits = _experts_contiguous(logits)
    if calls_directly(logits, token_mask):
        return Routing(*IMPLEMENTATIONS[backend].forward(logits, top_k, bool(renormalize), token_mask))
    return Routing(*_RouteFunction.apply(logits, top_k, bool(renormalize), backend, token_mask))


def _experts_contiguous(logits: torch.Tensor) -> torch.Tensor:
    """The kernels read rows through their strides: only the experts must be contiguous."""
    return logits if logits.stride(-1) == 1 or logits.shape[-1] == 1 else logits.contiguous()


def route_without_statistics(logits: torch.Tensor, top_k: int, *, renormalize: bool = True,
                             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route`'s (weights, experts) alone, for callers that want no balance term and no gradient (inference: the
    ops' direct path, `calls_directly`): one kernel on Triton instead of two. The caller checks the arguments."""
    backend = resolve_backend("route", backend, logits.device, tuple(IMPLEMENTATIONS))
    implementation = IMPLEMENTATIONS[backend]
    logits = _experts_contiguous(logits)
    if backend == "cuda":  # its kernel computes the counts anyway
        return implementation.forward(logits, top_k, bool(renormalize))[:2]
    return implementation.forward_without_statistics(logits, top_k, bool(renormalize))


def load_balance_loss(routing: Routing, *, num_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss `E * sum_e (counts[e] / (T * k)) * probs_mean[e]` (0 when T = 0),
    T the tokens `route` counted (all, or those of its `token_mask`): the pairs counted are `counts.sum()`.
    A batch of routings gives one loss per routing ([S]).

    `num_tokens` (optional): that T, when the caller already has it (an int, or a scalar tensor such as
    `token_mask.sum()` computed once for many layers), which saves the reduction over `counts`."""
    if not isinstance(routing, tuple) or len(routing) != 4:
        raise TypeError(f"routing must be the sdk.Routing returned by route(), got {type(routing).__name__}")
    num_experts, top_k = routing.counts.shape[-1], routing.experts.shape[-1]
    probs_mean = routing.probs_mean

    def dot(a, b):  # one launch for one routing
        return torch.dot(a, b) if a.dim() == 1 else (a * b).sum(-1)

    if num_tokens is None:
        pairs = routing.counts.sum(-1).clamp_min(1)
        return dot(routing.counts.to(probs_mean.dtype), probs_mean).div(pairs).mul(num_experts)
    # counts * (E / k) is already floating point (one launch for the cast and the scale).
    scaled = dot((routing.counts * (num_experts / top_k)).to(probs_mean.dtype), probs_mean)
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens must be a scalar, got shape {list(num_tokens.shape)}")
        return scaled.div(num_tokens.reshape(()).clamp_min(1))
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0 or a scalar tensor, got {num_tokens!r}")
    return scaled.div(max(num_tokens, 1))
