"""`sibling_lora_moe`: the top-k LoRA experts of S sibling projections that read the same input (q/k/v of one
attention block, gate/up of one MLP), with one shrink over x for all of them.

    sibling_lora_moe(x, [A_1..A_S], [B_1..B_S], [w_1..w_S], [e_1..e_S], outs=[o_1..o_S])
        == [lora_moe(x, A_s, B_s, w_s, e_s, out=o_s) for each s]

Each sibling keeps its own experts, gates and output width; only the pass over x (forward) and the products that
go back to x (backward: one dx and one dA for all siblings) are shared. It is `lora_moe`'s dense strategy
widened to S*E*r rank-space columns; where the cost model prefers the grouped strategy for the group (as one
layer of S*E experts, S*k slots and the siblings' widths summed: large E), the siblings are S grouped calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsedoctor_kernels import eager
from sparsedoctor_kernels._backend import LazyImplementation, calls_directly, default_validate, resolve_backend
from sparsedoctor_kernels._validation import check_ids_in_range, compute_dtype, require_writable_output
from sparsedoctor_kernels.cost import resolve_strategy
from sparsedoctor_kernels.ops.lora_moe import _check_arguments, lora_moe

IMPLEMENTATIONS = {"triton": LazyImplementation("sparsedoctor_kernels.triton.sibling_lora_moe"),
                   "torch": eager.sibling_lora_moe}


@torch.library.custom_op("sparsedoctor::sibling_lora_moe_forward_into", mutates_args=("outs",))
def _forward_into(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: list[torch.Tensor], weights: torch.Tensor, experts: torch.Tensor,
    scaling: float, outs: list[torch.Tensor], backend: str,
) -> torch.Tensor:
    return IMPLEMENTATIONS[backend].forward_into(x, lora_a, lora_b, weights, experts, scaling, outs)


@_forward_into.register_fake
def _(x, lora_a, lora_b, weights, experts, scaling, outs, backend):
    siblings, num_experts, rank, _ = lora_a.shape
    shape = IMPLEMENTATIONS[backend].saved_shape(x.shape[0], siblings, experts.shape[-1], num_experts, rank)
    return x.new_empty(shape, dtype=compute_dtype(x.dtype, lora_a.dtype))


@torch.library.custom_op("sparsedoctor::sibling_lora_moe_backward", mutates_args=())
def _backward(
    grad_ys: list[torch.Tensor], x: torch.Tensor, lora_a: torch.Tensor, lora_b: list[torch.Tensor],
    weights: torch.Tensor, experts: torch.Tensor, h: torch.Tensor, scaling: float, backend: str,
) -> list[torch.Tensor]:
    return IMPLEMENTATIONS[backend].backward(grad_ys, x, lora_a, lora_b, weights, experts, h, scaling)


@_backward.register_fake
def _(grad_ys, x, lora_a, lora_b, weights, experts, h, scaling, backend):
    return [torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(weights),
            *(torch.empty_like(b) for b in lora_b)]


class _SiblingLoraMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_a, weights, experts, scaling, backend, siblings, *b_and_outs):
        lora_b, outs = list(b_and_outs[:siblings]), list(b_and_outs[siblings:])
        h = _forward_into(x, lora_a, lora_b, weights, experts, scaling, outs, backend)
        ctx.mark_dirty(*outs)
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(x, lora_a, weights, experts, h, *lora_b)
        ctx.scaling, ctx.backend = scaling, backend
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grad_outs):
        x, lora_a, weights, experts, h, *lora_b = ctx.saved_tensors
        grad_ys = [g.contiguous() if g is not None else torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype,
                                                                    device=x.device)
                   for g, b in zip(grad_outs, lora_b)]
        grad_x, grad_a, grad_weights, *grad_b = _backward(grad_ys, x, lora_a, lora_b, weights, experts, h,
                                                          ctx.scaling, ctx.backend)
        # out + delta: each out's producers see its grad_y unchanged.
        return (grad_x, grad_a, grad_weights, None, None, None, None, *grad_b, *grad_outs)


def _as_list(name: str, values, siblings: int | None) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list with one tensor per sibling, got {type(values).__name__}")
    values = list(values)
    if siblings is not None and len(values) != siblings:
        raise ValueError(f"{name} must have one tensor per sibling ({siblings}), got {len(values)}")
    return values


def _per_sibling(name: str, values, siblings: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """(one tensor per sibling, the [S, T, k] tensor they are rows of when given as one, else None)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 3 or values.shape[0] != siblings:
            raise ValueError(f"{name} given as one tensor must have shape [S={siblings}, T, k], got "
                             f"{list(values.shape)}")
        return list(values.unbind(0)), values
    return _as_list(name, values, siblings), None


def sibling_lora_moe(x: torch.Tensor, lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                     weights: Sequence[torch.Tensor] | torch.Tensor, experts: Sequence[torch.Tensor] | torch.Tensor,
                     *, scaling: float = 1.0,
                     outs: Sequence[torch.Tensor] | None = None, backend: str | None = None,
                     validate: bool | None = None, strategy: str | None = None) -> list[torch.Tensor]:
    """`lora_moe` for S sibling projections of one input, x read once for all of them.

    `x` [T, d_in]; per sibling s (lists of S >= 1): `lora_a[s]` [E, r, d_in], `lora_b[s]` [E, d_out_s, r],
    `weights[s]` [T, k], `experts[s]` [T, k], with E, r and k the same for every sibling (the adapted linears
    of one model share a config), and optionally `outs[s]` [T, d_out_s], added into in place as `lora_moe`'s
    `out`. `weights` and `experts` may also be one [S, T, k] tensor each (a batched `route`'s, used in place).
    Returns the S results, `[lora_moe(x, lora_a[s], lora_b[s], weights[s], experts[s], scaling=scaling,
    out=outs[s]) for s]`; differentiable in the same arguments. It computes every expert of every sibling from
    one read of x (the dense strategy): on the torch backend each result is bit for bit `lora_moe`'s with
    `strategy="dense"`, and x's gradient sums the siblings' inside one matmul (equal up to rounding).
    `strategy` ("dense", "grouped", "auto" or None, as for `lora_moe`): "grouped" makes S `lora_moe` calls of
    the grouped strategy (no shared pass); the default asks the cost model about the group as a whole."""
    lora_a = _as_list("lora_a", lora_a, None)
    siblings = len(lora_a)
    if siblings == 0:
        raise ValueError("sibling_lora_moe needs at least one sibling (lora_a is empty)")
    lora_b = _as_list("lora_b", lora_b, siblings)
    weights, stacked_weights = _per_sibling("weights", weights, siblings)
    experts, stacked_experts = _per_sibling("experts", experts, siblings)
    outs = [None] * siblings if outs is None else _as_list("outs", outs, siblings)
    for s in range(siblings):
        device = _check_arguments(x, lora_a[s], lora_b[s], weights[s], experts[s], scaling, outs[s])
        if lora_a[s].shape != lora_a[0].shape or experts[s].shape != experts[0].shape:
            raise ValueError(f"siblings must share E, r and k: lora_a[{s}] {list(lora_a[s].shape)} / experts[{s}] "
                             f"{list(experts[s].shape)} vs lora_a[0] {list(lora_a[0].shape)} / experts[0] "
                             f"{list(experts[0].shape)}")
    backend = resolve_backend("sibling_lora_moe", backend, device, tuple(IMPLEMENTATIONS))
    num_experts, rank, d_in = lora_a[0].shape
    top_k = experts[0].shape[1]
    group_shape = (x.shape[0], d_in, sum(b.shape[1] for b in lora_b), siblings * num_experts, siblings * top_k, rank)
    if resolve_strategy(strategy, backend, group_shape, x.dtype, device) == "grouped":
        return [lora_moe(x, a, b, w, e, scaling=scaling, out=out, backend=backend, validate=validate,
                         strategy="grouped") for a, b, w, e, out in zip(lora_a, lora_b, weights, experts, outs)]
    if default_validate(validate, device):
        for s in range(siblings):
            check_ids_in_range(f"experts[{s}]", experts[s], num_experts)
    x = x.contiguous()
    stacked_a = torch.stack(lora_a)  # [S, E, r, d_in]; differentiable, so each sibling's A gets its gradient
    # [S, T, k] each: given so, or one launch apiece (a cast only where the siblings' dtypes differ).
    if stacked_weights is None:
        stacked_weights = torch.stack([w.to(weights[0].dtype) for w in weights])
    if stacked_experts is None:
        stacked_experts = torch.stack([e.to(experts[0].dtype) for e in experts])
    stacked_weights, stacked_experts = stacked_weights.contiguous(), stacked_experts.contiguous()
    lora_b = [b.contiguous() for b in lora_b]
    for s, out in enumerate(outs):
        if out is not None:
            require_writable_output(f"outs[{s}]", out, x=x, lora_a=lora_a[s], lora_b=lora_b[s])
    fresh, targets = fresh_targets(x, lora_b, outs)
    if calls_directly(x, stacked_a, *lora_b, *targets):
        IMPLEMENTATIONS[backend].forward_into(x, stacked_a, lora_b, stacked_weights, stacked_experts,
                                              float(scaling), targets)
        results = targets
    else:
        results = list(_SiblingLoraMoEFunction.apply(x, stacked_a, stacked_weights, stacked_experts, float(scaling),
                                                     backend, siblings, *lora_b, *targets))
    return added_into(outs, fresh, results)


def fresh_targets(x: torch.Tensor, lora_b: list[torch.Tensor], outs: list) -> tuple[list[bool], list[torch.Tensor]]:
    """(fresh, target) per sibling: the out itself, or a new zero tensor to add into it afterwards
    (`added_into`) where the out is missing or is a view written under autograd: a view written in place by a
    function with several outputs cannot hand its gradient to its base (one more pass over it, in that case
    alone)."""
    tracing = torch.compiler.is_compiling()  # the traced graph is functional: no view bookkeeping to mind
    fresh = [out is None or (not tracing and torch.is_grad_enabled() and out._is_view()) for out in outs]
    return fresh, [x.new_zeros((x.shape[0], b.shape[1])) if new else out for new, b, out in zip(fresh, lora_b, outs)]


def added_into(outs: list, fresh: list[bool], results: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each result, added into its out where it was computed fresh (`fresh_targets`)."""
    return [out.add_(result) if new and out is not None else result for new, out, result in zip(fresh, outs, results)]
