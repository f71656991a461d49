"""`routed_sibling_lora_moe`: the adapters of S sibling projections that read one input (q/k/v of an attention
block, gate/up of an MLP, or one projection alone), each with its own router and experts, in one call:

    logits[s] = x @ routers[s].T                                    [S, T, E]
    routing   = route(logits, top_k, token_mask=token_mask)         one batched routing of the S siblings
    outs[s]  += lora_moe(dropout(x), lora_a[s], lora_b[s], routing.weights[s], routing.experts[s], scaling)

with one dropout mask shared by the siblings (the routers read x itself). A training layer's whole adapter
pass: on Triton (dense strategy, up to three siblings, E <= 64) it is three launches forward and three backward
for the group (`sparsedoctor_kernels.triton.routed_sibling_lora_moe`), the dropout drawn inside the kernels
(Philox) and no dropped copy of x kept. Elsewhere it is that composition of the ops (`route`,
`sibling_lora_moe`), with `torch.native_dropout`: on the torch backend each sibling's result is bit for bit
that of its own `x @ router.T`, `route` and `lora_moe` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from sparsedoctor_kernels._backend import LazyImplementation, calls_directly, resolve_backend
from sparsedoctor_kernels._validation import (
    compute_dtype,
    require_dtype,
    require_float,
    require_positive_int,
    require_real,
    require_same_device,
    require_shape,
    require_writable_output,
)
from sparsedoctor_kernels.cost import resolve_strategy
from sparsedoctor_kernels.ops.routing import Routing, route
from sparsedoctor_kernels.ops.sibling_lora_moe import IMPLEMENTATIONS as SIBLING_BACKENDS
from sparsedoctor_kernels.ops.sibling_lora_moe import _as_list, added_into, fresh_targets, sibling_lora_moe

# The fused path's implementations (the other backends compose the ops).
IMPLEMENTATIONS = {"triton": LazyImplementation("sparsedoctor_kernels.triton.routed_sibling_lora_moe")}


class RoutedSiblings(NamedTuple):
    outs: list[torch.Tensor]  # S x [T, d_out_s]
    logits: torch.Tensor  # [S, T, E], x's dtype, differentiable
    routing: Routing  # fields with the leading S: weights [S, T, k], experts, counts [S, E], probs_mean [S, E]


@torch.library.custom_op("sparsedoctor::routed_sibling_lora_moe_forward_into", mutates_args=("outs",))
def _forward_into(
    x: torch.Tensor, routers: list[torch.Tensor], lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], top_k: int,
    scaling: float, p: float, seed: torch.Tensor, renormalize: bool, token_mask: torch.Tensor | None,
    outs: list[torch.Tensor], backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return IMPLEMENTATIONS[backend].forward_into(x, routers, lora_a, lora_b, top_k, scaling, p, seed, renormalize,
                                                 token_mask, outs)


@_forward_into.register_fake
def _(x, routers, lora_a, lora_b, top_k, scaling, p, seed, renormalize, token_mask, outs, backend):
    siblings = len(lora_a)
    num_tokens = x.shape[0]
    num_experts, rank, _ = lora_a[0].shape
    acc = compute_dtype(x.dtype)
    return (x.new_empty((siblings, num_tokens, num_experts)), x.new_empty((siblings, num_tokens, top_k), dtype=acc),
            x.new_empty((siblings, num_tokens, top_k), dtype=torch.int32),
            x.new_empty((siblings, num_experts), dtype=torch.int32), x.new_empty((siblings, num_experts), dtype=acc),
            x.new_empty((num_tokens, siblings * num_experts * rank), dtype=acc))


@torch.library.custom_op("sparsedoctor::routed_sibling_lora_moe_backward", mutates_args=())
def _backward(
    grad_ys: list[torch.Tensor], grad_logits: torch.Tensor | None, grad_weights: torch.Tensor | None,
    grad_probs_mean: torch.Tensor | None, x: torch.Tensor, routers: list[torch.Tensor], lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor], logits: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, h: torch.Tensor,
    seed: torch.Tensor, p: float, scaling: float, renormalize: bool, token_mask: torch.Tensor | None, backend: str,
) -> list[torch.Tensor]:
    return IMPLEMENTATIONS[backend].backward(grad_ys, grad_logits, grad_weights, grad_probs_mean, x, routers, lora_a,
                                             lora_b, logits, weights, experts, h, seed, p, scaling, renormalize,
                                             token_mask)


@_backward.register_fake
def _(grad_ys, grad_logits, grad_weights, grad_probs_mean, x, routers, lora_a, lora_b, logits, weights, experts, h,
      seed, p, scaling, renormalize, token_mask, backend):
    acc = h.dtype
    return [torch.empty_like(x), x.new_empty(sum(r.numel() + a.numel() for r, a in zip(routers, lora_a)), dtype=acc),
            x.new_empty(sum(b.numel() for b in lora_b), dtype=acc)]


def split_gradients(grad_weights_flat, grad_b_flat, routers, lora_a, lora_b) -> list[torch.Tensor]:
    """The backward's flat buffers as each parameter's gradient, in its dtype: [grad routers (S), grad A (S),
    grad B (S)] (views where the dtypes agree: no copy)."""
    a_numel = sum(a.numel() for a in lora_a)
    grad_a = torch.split(grad_weights_flat[:a_numel], [a.numel() for a in lora_a])
    grad_r = torch.split(grad_weights_flat[a_numel:], [r.numel() for r in routers])
    grad_b = torch.split(grad_b_flat, [b.numel() for b in lora_b])
    return [*(g.view(t.shape).to(t.dtype) for grads, tensors in ((grad_r, routers), (grad_a, lora_a), (grad_b, lora_b))
              for g, t in zip(grads, tensors))]


class _RoutedSiblingsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, token_mask, top_k, scaling, p, renormalize, backend, siblings, *tensors):
        routers, lora_a, lora_b, outs = (list(tensors[i * siblings:(i + 1) * siblings]) for i in range(4))
        logits, weights, experts, counts, probs_mean, h = _forward_into(
            x, routers, lora_a, lora_b, top_k, scaling, p, seed, renormalize, token_mask, outs, backend)
        ctx.mark_dirty(*outs)
        ctx.mark_non_differentiable(experts, counts)
        ctx.set_materialize_grads(False)  # unused outputs get no zero-filled gradient
        ctx.save_for_backward(x, seed, token_mask, logits, weights, experts, h, *routers, *lora_a, *lora_b)
        ctx.siblings, ctx.scaling, ctx.p, ctx.renormalize, ctx.backend = siblings, scaling, p, renormalize, backend
        return (*outs, logits, weights, experts, counts, probs_mean)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        siblings = ctx.siblings
        x, seed, token_mask, logits, weights, experts, h, *params = ctx.saved_tensors
        routers, lora_a, lora_b = (params[i * siblings:(i + 1) * siblings] for i in range(3))
        grad_outs = grads[:siblings]
        grad_logits, grad_weights, _, _, grad_probs_mean = grads[siblings:]
        grad_ys = [g.contiguous() if g is not None else x.new_zeros((x.shape[0], b.shape[1]))
                   for g, b in zip(grad_outs, lora_b)]
        contiguous = [g if g is None else g.contiguous() for g in (grad_logits, grad_weights, grad_probs_mean)]
        grad_x, grad_weights_flat, grad_b_flat = _backward(
            grad_ys, *contiguous, x, list(routers), list(lora_a), list(lora_b), logits, weights, experts, h, seed,
            ctx.p, ctx.scaling, ctx.renormalize, token_mask, ctx.backend)
        grad_params = split_gradients(grad_weights_flat, grad_b_flat, routers, lora_a, lora_b)
        # out + delta: each out's producers see its gradient unchanged.
        return (grad_x, None, None, None, None, None, None, None, None, *grad_params, *grad_outs)


class _RouterLogits(torch.autograd.Function):
    """[S, T, E] logits of S routers [S, E, d_in] on one input x [T, d_in]: one batched GEMM whose every problem
    is the sibling's own `x @ router.T` (bit for bit: a single GEMM over the stacked routers, [T, S * E], would
    reduce in another order on some BLAS). The backward is one GEMM for x over the stacked routers (a batched
    one's x gradient would be S copies of x summed) and one batched GEMM for the routers."""

    @staticmethod
    def forward(ctx, x, routers):
        ctx.save_for_backward(x, routers)
        return torch.bmm(x.expand(routers.shape[0], -1, -1), routers.transpose(1, 2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logits):
        x, routers = ctx.saved_tensors
        siblings, num_experts, d_in = routers.shape
        grad_x = grad_routers = None
        if ctx.needs_input_grad[0]:  # [T, S * E] @ [S * E, d_in]: the siblings' contributions summed in the GEMM
            by_token = grad_logits.transpose(0, 1).reshape(x.shape[0], siblings * num_experts)
            grad_x = by_token @ routers.reshape(siblings * num_experts, d_in)
        if ctx.needs_input_grad[1]:
            grad_routers = torch.bmm(grad_logits.transpose(1, 2), x.expand(siblings, -1, -1))
        return grad_x, grad_routers


def _check(x, routers, lora_a, lora_b, top_k, scaling, dropout, outs, token_mask) -> torch.device:
    require_float("x", x)
    require_shape("x", x, (None, None), "[T, d_in]")
    num_tokens, d_in = x.shape
    require_dtype("lora_a[0]", lora_a[0], (x.dtype,))
    require_shape("lora_a[0]", lora_a[0], (None, None, d_in), f"[E, r, d_in={d_in}]")
    num_experts, rank, _ = lora_a[0].shape
    if num_experts < 1 or rank < 1:
        raise ValueError(f"lora_a must have E >= 1 experts and rank r >= 1, got shape {list(lora_a[0].shape)}")
    require_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(f"top_k must be in [1, E] = [1, {num_experts}], got {top_k}")
    require_real("scaling", scaling)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")
    tensors = {"x": x}
    for s, (router, a, b) in enumerate(zip(routers, lora_a, lora_b)):
        require_dtype(f"routers[{s}]", router, (x.dtype,))
        require_shape(f"routers[{s}]", router, (num_experts, d_in), f"[E={num_experts}, d_in={d_in}]")
        require_dtype(f"lora_a[{s}]", a, (x.dtype,))
        require_shape(f"lora_a[{s}]", a, (num_experts, rank, d_in), f"[E={num_experts}, r={rank}, d_in={d_in}]")
        require_dtype(f"lora_b[{s}]", b, (x.dtype,))
        require_shape(f"lora_b[{s}]", b, (num_experts, None, rank), f"[E={num_experts}, d_out, r={rank}]")
        tensors.update({f"routers[{s}]": router, f"lora_a[{s}]": a, f"lora_b[{s}]": b})
        if outs[s] is not None:
            require_dtype(f"outs[{s}]", outs[s], (x.dtype,))
            require_shape(f"outs[{s}]", outs[s], (num_tokens, b.shape[1]), f"[T={num_tokens}, d_out={b.shape[1]}]")
            tensors[f"outs[{s}]"] = outs[s]
    if token_mask is not None:
        require_dtype("token_mask", token_mask, (torch.bool,))
        require_shape("token_mask", token_mask, (num_tokens,), f"[T={num_tokens}]")
        tensors["token_mask"] = token_mask
    return require_same_device(**tensors)


def routed_sibling_lora_moe(x: torch.Tensor, routers: Sequence[torch.Tensor], lora_a: Sequence[torch.Tensor],
                            lora_b: Sequence[torch.Tensor], top_k: int, *, scaling: float = 1.0,
                            dropout: float = 0.0, outs: Sequence[torch.Tensor | None] | None = None,
                            token_mask: torch.Tensor | None = None, renormalize: bool = True,
                            expert_input: torch.Tensor | None = None, backend: str | None = None,
                            validate: bool | None = None, strategy: str | None = None) -> RoutedSiblings:
    """Route and apply the experts of S sibling projections of one input.

    `x` [T, d_in]; per sibling s (lists of S >= 1, one float dtype, E and r shared): `routers[s]` [E, d_in],
    `lora_a[s]` [E, r, d_in], `lora_b[s]` [E, d_out_s, r], optionally `outs[s]` [T, d_out_s] (added into in
    place, as `lora_moe`'s `out`). `dropout` (probability, 0 for none): applied to the experts' input, one mask
    for all siblings, drawn from torch's generator of x's device. `token_mask` ([T] bool): the routing
    statistics count the tokens it marks only, as `route`'s. Returns `RoutedSiblings(outs, logits [S, T, E],
    routing)` with routing the batched `route` of the logits; outs, logits, routing.weights and
    routing.probs_mean are differentiable (w.r.t. x, routers, lora_a, lora_b and what produced `outs`).
    `expert_input` ([T, d_in], optional): what the experts read instead of dropout(x), for a caller that drops
    x out itself because it needs the result too (then `dropout` must be 0; the routers still read x).
    `validate` and `strategy` as for `sibling_lora_moe` (the routing's ids need no check)."""
    lora_a = _as_list("lora_a", lora_a, None)
    siblings = len(lora_a)
    if siblings == 0:
        raise ValueError("routed_sibling_lora_moe needs at least one sibling (lora_a is empty)")
    routers = _as_list("routers", routers, siblings)
    lora_b = _as_list("lora_b", lora_b, siblings)
    outs = [None] * siblings if outs is None else _as_list("outs", outs, siblings)
    device = _check(x, routers, lora_a, lora_b, top_k, scaling, dropout, outs, token_mask)
    if expert_input is not None:
        require_dtype("expert_input", expert_input, (x.dtype,))
        require_shape("expert_input", expert_input, tuple(x.shape), f"x's {list(x.shape)}")
        require_same_device(x=x, expert_input=expert_input)
        if dropout:
            raise ValueError("expert_input is the experts' input already dropped out: pass dropout=0 with it")
    backend = resolve_backend("routed_sibling_lora_moe", backend, device, tuple(SIBLING_BACKENDS))
    num_experts, rank, d_in = lora_a[0].shape
    group_shape = (x.shape[0], d_in, sum(b.shape[1] for b in lora_b), siblings * num_experts, siblings * top_k, rank)
    dense = resolve_strategy(strategy, backend, group_shape, x.dtype, device) == "dense"
    if backend == "triton" and dense and expert_input is None:
        lora_b = [b.contiguous() for b in lora_b]
        for s, out in enumerate(outs):
            if out is not None:
                require_writable_output(f"outs[{s}]", out, x=x, lora_a=lora_a[s], lora_b=lora_b[s])
        fresh, targets = fresh_targets(x, lora_b, outs)
        if IMPLEMENTATIONS["triton"].applies(siblings, num_experts, lora_b, targets):
            return _fused(x, routers, lora_a, lora_b, top_k, scaling, float(dropout), outs, fresh, targets,
                          token_mask, bool(renormalize), backend)
    return _composed(x, routers, lora_a, lora_b, top_k, scaling, float(dropout), outs, token_mask, renormalize,
                     expert_input, backend, strategy)


def _draw_seed(device: torch.device) -> torch.Tensor:
    """The dropout's Philox seed from torch's generator of `device` (so `torch.manual_seed`, and a gradient
    checkpoint's restored RNG state, replay it), kept on the device: no host sync."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def _fused(x, routers, lora_a, lora_b, top_k, scaling, p, outs, fresh, targets, token_mask, renormalize, backend):
    siblings = len(lora_a)
    x = x.contiguous()
    routers = [r.contiguous() for r in routers]
    lora_a = [a.contiguous() for a in lora_a]
    token_mask = token_mask.contiguous() if token_mask is not None else None
    seed = _draw_seed(x.device) if p > 0 else torch.empty(1, dtype=torch.int64, device=x.device)
    if calls_directly(x, *routers, *lora_a, *lora_b, *targets, token_mask):
        logits, *routing, _ = IMPLEMENTATIONS[backend].forward_into(x, routers, lora_a, lora_b, top_k, float(scaling),
                                                                    p, seed, renormalize, token_mask, targets)
        results = targets
    else:
        *results, logits, weights, experts, counts, probs_mean = _RoutedSiblingsFunction.apply(
            x, seed, token_mask, top_k, float(scaling), p, renormalize, backend, siblings, *routers, *lora_a, *lora_b,
            *targets)
        routing = (weights, experts, counts, probs_mean)
    return RoutedSiblings(added_into(outs, fresh, results), logits, Routing(*routing))


def _composed(x, routers, lora_a, lora_b, top_k, scaling, p, outs, token_mask, renormalize, expert_input, backend,
              strategy):
    # One sibling: its own GEMM (no stacking), viewed as a batch of one.
    logits = (x @ routers[0].T)[None] if len(routers) == 1 else _RouterLogits.apply(x, torch.stack(list(routers)))
    routing = route(logits, top_k, renormalize=renormalize, token_mask=token_mask, backend=backend)
    if expert_input is not None:
        adapter_in = expert_input
    else:  # the fused op that F.dropout takes only on GPUs: one launch, a 1-byte mask kept for the backward
        adapter_in = torch.native_dropout(x, p, True)[0] if p > 0 else x
    results = sibling_lora_moe(adapter_in, lora_a, lora_b, routing.weights, routing.experts, scaling=scaling,
                               outs=outs, backend=backend, validate=False, strategy=strategy)
    return RoutedSiblings(results, logits, routing)
