"""`routed_lora_moe`: route each token and apply its experts in one call, for inference and generation.

    routed_lora_moe(x, router, lora_a, lora_b, top_k)
        == lora_moe(x, lora_a, lora_b, *route(x @ router.T, top_k)[:2])

Under autograd or `torch.compile` it is exactly that composition of the two ops (their custom ops and
backward). With grad mode off (generation, evaluation) nothing asks for the routing statistics, so the routing
skips them (`route_without_statistics`: one kernel on Triton instead of two); on CPU tensors at a handful of
tokens (decoding) the torch backend fuses the two: no sort into expert order, each chosen expert's weights
read once (`sparsedoctor_kernels.eager.routed`), the same numbers.
"""

from __future__ import annotations

import torch

from sparsedoctor_kernels import eager
from sparsedoctor_kernels._backend import calls_directly, default_validate, resolve_backend
from sparsedoctor_kernels._validation import (
    require_dtype,
    require_float,
    require_positive_int,
    require_real,
    require_shape,
    require_writable_output,
)
from sparsedoctor_kernels.ops.lora_moe import IMPLEMENTATIONS as LORA_MOE_BACKENDS
from sparsedoctor_kernels.ops.lora_moe import lora_moe
from sparsedoctor_kernels.ops.routing import route, route_without_statistics


def routed_lora_moe(x: torch.Tensor, router: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, top_k: int,
                    *, scaling: float = 1.0, out: torch.Tensor | None = None, renormalize: bool = True,
                    backend: str | None = None, validate: bool | None = None) -> torch.Tensor:
    """`x` [T, d_in], `router` [E, d_in], `lora_a` [E, r, d_in], `lora_b` [E, d_out, r] (one float dtype),
    `top_k` in [1, E]: each token's `route(x @ router.T, top_k, renormalize=renormalize)` experts applied as
    `lora_moe` applies them, returned fresh or added into `out` ([T, d_out]) in place. Differentiable like
    the two ops (w.r.t. x, router, lora_a, lora_b and what produced `out`); the routing statistics are not
    returned (call `route` for the balance loss). `validate=False` skips, on the fused decoding path, the
    check that `out` shares no memory with an input: for a caller whose `out` is fresh, such as a decoding
    layer's (default: on off the GPU, as the other ops' checks)."""
    require_float("x", x)
    require_shape("x", x, (None, None), "[T, d_in]")
    require_dtype("router", router, (x.dtype,))
    require_shape("router", router, (None, x.shape[1]), f"[E, d_in={x.shape[1]}]")
    require_positive_int("top_k", top_k)
    if lora_a.dim() != 3 or lora_a.shape[0] != router.shape[0]:
        raise ValueError(f"lora_a must have shape [E={router.shape[0]}, r, d_in] (one expert per router row), got "
                         f"{list(lora_a.shape)}")
    if top_k > router.shape[0]:
        raise ValueError(f"top_k must be in [1, E] = [1, {router.shape[0]}], got {top_k}")
    require_real("scaling", scaling)
    fused = (calls_directly(x, router, lora_a, lora_b, out)
             and resolve_backend("lora_moe", backend, x.device, tuple(LORA_MOE_BACKENDS)) == "torch")
    if fused:
        target = out if out is not None else x.new_zeros((x.shape[0], lora_b.shape[1]))
        if eager.routed.applies(x, lora_a, top_k, target) and _expert_shapes_match(x, lora_a, lora_b, target):
            if out is not None and default_validate(validate, x.device):  # raises as lora_moe would
                require_writable_output("out", out, x=x, router=router, lora_a=lora_a, lora_b=lora_b)
            eager.routed.infer(x, router, lora_a, lora_b, top_k, bool(renormalize), float(scaling), target)
            return target
    logits = x @ router.T
    if calls_directly(x, router, lora_a, lora_b, out):  # nothing recorded: no routing statistics either
        weights, experts = route_without_statistics(logits, top_k, renormalize=renormalize, backend=backend)
    else:
        weights, experts, _, _ = route(logits, top_k, renormalize=renormalize, backend=backend)
    # Ids from `route` are in range: nothing data-dependent to check.
    return lora_moe(x, lora_a, lora_b, weights, experts, scaling=scaling, out=out, backend=backend, validate=False)


def _expert_shapes_match(x, lora_a, lora_b, out) -> bool:
    """The shapes and dtypes `lora_moe` would check; anything else takes the composition, whose checks raise
    the usual errors."""
    num_experts, rank, d_in = lora_a.shape
    return (lora_b.dim() == 3 and lora_b.shape[0] == num_experts and lora_b.shape[2] == rank
            and d_in == x.shape[1] and tuple(out.shape) == (x.shape[0], lora_b.shape[1]) and lora_b.dtype == x.dtype)
