"""`lora_moe`: grouped top-k LoRA experts, y[t] = s * sum_j w[t,j] * B[e_tj] @ (A[e_tj] @ x[t])."""

from __future__ import annotations

import torch

from sparsedoctor_kernels import eager
from sparsedoctor_kernels._backend import LazyImplementation, calls_directly, default_validate, resolve_backend
from sparsedoctor_kernels._validation import (
    check_ids_in_range,
    check_rows_in_range,
    compute_dtype,
    require_dtype,
    require_float,
    require_int,
    require_real,
    require_same_device,
    require_shape,
    require_writable_output,
)
from sparsedoctor_kernels.cost import resolve_strategy

# Each implementation provides forward -> (y, h, plan), forward_into -> (h, plan), backward, plan_numel and
# saved_shape: h (A[e] @ x per pair, or every expert's rank-space rows for the dense strategy) is kept so the
# backward never recomputes the shrink, and `plan` (int32, possibly empty) is whatever routing order the
# implementation built in the forward and reuses in the backward. IMPLEMENTATIONS holds each backend's grouped
# strategy (for the torch backend: eager matmuls per expert on the pairs sorted by expert); DENSE the folded
# dense-expert strategy (see sparsedoctor_kernels.cost for when each wins). The readable oracles the tests use
# are in sparsedoctor_kernels.reference.
IMPLEMENTATIONS = {"triton": LazyImplementation("sparsedoctor_kernels.triton.lora_moe"), "torch": eager.lora_moe}
DENSE = {"triton": LazyImplementation("sparsedoctor_kernels.triton.lora_moe_dense"), "torch": eager.lora_moe_dense}


def _implementation(backend: str, strategy: str):
    return DENSE[backend] if strategy == "dense" else IMPLEMENTATIONS[backend]


def _fake_saved(x, lora_a, experts, backend, strategy):
    """The rank-space intermediate h (in the compute dtype) and the plan kept for the backward."""
    implementation = _implementation(backend, strategy)
    num_tokens, top_k = experts.shape
    num_experts, rank, _ = lora_a.shape
    shape = implementation.saved_shape(num_tokens, top_k, num_experts, rank)
    h = x.new_empty(shape, dtype=compute_dtype(x.dtype, lora_a.dtype))
    return h, x.new_empty((implementation.plan_numel(num_tokens, top_k, num_experts),), dtype=torch.int32)


@torch.library.custom_op("sparsedoctor::lora_moe_forward", mutates_args=())
def _lora_moe_forward(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
    scaling: float, backend: str, strategy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _implementation(backend, strategy).forward(x, lora_a, lora_b, weights, experts, scaling)


@_lora_moe_forward.register_fake
def _(x, lora_a, lora_b, weights, experts, scaling, backend, strategy):
    return x.new_empty((x.shape[0], lora_b.shape[1])), *_fake_saved(x, lora_a, experts, backend, strategy)


@torch.library.custom_op("sparsedoctor::lora_moe_forward_into", mutates_args=("out",))
def _lora_moe_forward_into(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
    scaling: float, out: torch.Tensor, backend: str, strategy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _implementation(backend, strategy).forward_into(x, lora_a, lora_b, weights, experts, scaling, out)


@_lora_moe_forward_into.register_fake
def _(x, lora_a, lora_b, weights, experts, scaling, out, backend, strategy):
    return _fake_saved(x, lora_a, experts, backend, strategy)


@torch.library.custom_op("sparsedoctor::lora_moe_backward", mutates_args=())
def _lora_moe_backward(
    grad_y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weights: torch.Tensor,
    experts: torch.Tensor, h: torch.Tensor, plan: torch.Tensor, scaling: float, backend: str, strategy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _implementation(backend, strategy).backward(grad_y, x, lora_a, lora_b, weights, experts, h, plan,
                                                       scaling)


@_lora_moe_backward.register_fake
def _(grad_y, x, lora_a, lora_b, weights, experts, h, plan, scaling, backend, strategy):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(weights)


class _LoraMoEFunction(torch.autograd.Function):
    # `out` comes first: when it is a view modified in place, autograd's CopySlices hands the gradient of the
    # function's first input to the view's base.
    @staticmethod
    def forward(ctx, out, x, lora_a, lora_b, weights, experts, scaling, backend, strategy):
        if out is None:
            y, h, plan = _lora_moe_forward(x, lora_a, lora_b, weights, experts, scaling, backend, strategy)
        else:
            h, plan = _lora_moe_forward_into(x, lora_a, lora_b, weights, experts, scaling, out, backend, strategy)
            ctx.mark_dirty(out)
            y = out
        ctx.save_for_backward(x, lora_a, lora_b, weights, experts, h, plan)
        ctx.scaling, ctx.backend, ctx.strategy, ctx.has_out = scaling, backend, strategy, out is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, lora_a, lora_b, weights, experts, h, plan = ctx.saved_tensors
        grad_x, grad_a, grad_b, grad_w = _lora_moe_backward(
            grad_y.contiguous(), x, lora_a, lora_b, weights, experts, h, plan, ctx.scaling, ctx.backend, ctx.strategy
        )
        grad_out = grad_y if ctx.has_out else None  # out + delta: out's producers see grad_y unchanged
        return grad_out, grad_x, grad_a, grad_b, grad_w, None, None, None, None


# The regated rows (`regate=`) on the dense strategy: the call and the rows' second gating from one h.
@torch.library.custom_op("sparsedoctor::lora_moe_regate_forward", mutates_args=("out",))
def _lora_moe_regate_forward(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
    scaling: float, out: torch.Tensor, accumulate: bool, rows: torch.Tensor, rows_weights: torch.Tensor,
    rows_experts: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return DENSE[backend].regate_forward(x, lora_a, lora_b, weights, experts, scaling, out, accumulate, rows,
                                         rows_weights, rows_experts)


@_lora_moe_regate_forward.register_fake
def _(x, lora_a, lora_b, weights, experts, scaling, out, accumulate, rows, rows_weights, rows_experts, backend):
    num_experts, rank, _ = lora_a.shape
    shape = DENSE[backend].regate_saved_shape(x.shape[0], experts.shape[1], num_experts, rank, rows.shape[0])
    h = x.new_empty(shape, dtype=compute_dtype(x.dtype, lora_a.dtype))
    return x.new_empty((rows.shape[0], lora_b.shape[1])), h


@torch.library.custom_op("sparsedoctor::lora_moe_regate_backward", mutates_args=())
def _lora_moe_regate_backward(
    grad_y: torch.Tensor, grad_rows: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
    weights: torch.Tensor, experts: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, rows_weights: torch.Tensor,
    rows_experts: torch.Tensor, scaling: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return DENSE[backend].regate_backward(grad_y, grad_rows, x, lora_a, lora_b, weights, experts, h, rows,
                                          rows_weights, rows_experts, scaling)


@_lora_moe_regate_backward.register_fake
def _(grad_y, grad_rows, x, lora_a, lora_b, weights, experts, h, rows, rows_weights, rows_experts, scaling, backend):
    return (torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(weights),
            torch.empty_like(rows_weights))


class _LoraMoERegateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, x, lora_a, lora_b, weights, experts, rows, rows_weights, rows_experts, scaling, backend):
        target = x.new_empty((x.shape[0], lora_b.shape[1])) if out is None else out
        y_rows, h = _lora_moe_regate_forward(x, lora_a, lora_b, weights, experts, scaling, target, out is not None,
                                             rows, rows_weights, rows_experts, backend)
        if out is not None:
            ctx.mark_dirty(out)
        ctx.save_for_backward(x, lora_a, lora_b, weights, experts, h, rows, rows_weights, rows_experts)
        ctx.scaling, ctx.backend, ctx.has_out = scaling, backend, out is not None
        return target, y_rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_rows):
        x, lora_a, lora_b, weights, experts, h, rows, rows_weights, rows_experts = ctx.saved_tensors
        grad_x, grad_a, grad_b, grad_w, grad_rows_w = _lora_moe_regate_backward(
            grad_y.contiguous(), grad_rows.contiguous(), x, lora_a, lora_b, weights, experts, h, rows, rows_weights,
            rows_experts, ctx.scaling, ctx.backend)
        grad_out = grad_y if ctx.has_out else None
        return grad_out, grad_x, grad_a, grad_b, grad_w, None, None, grad_rows_w, None, None, None


def _check_regate(regate, x: torch.Tensor):
    """(rows [m] int64, weights [m, k2], experts [m, k2]) from the `regate` argument, checked like the call's own."""
    if not (isinstance(regate, (tuple, list)) and len(regate) == 3):
        raise TypeError("regate must be a tuple (rows [m] int, weights [m, k2] float, experts [m, k2] int), got "
                        f"{type(regate).__name__}")
    rows, rows_weights, rows_experts = regate
    require_int("regate rows", rows)
    require_shape("regate rows", rows, (None,), "[m]")
    require_int("regate experts", rows_experts)
    require_shape("regate experts", rows_experts, (rows.shape[0], None), f"[m={rows.shape[0]}, k2]")
    require_dtype("regate weights", rows_weights, tuple(dict.fromkeys((torch.float32, x.dtype))))
    require_shape("regate weights", rows_weights, tuple(rows_experts.shape),
                  f"[m={rows.shape[0]}, k2={rows_experts.shape[1]}]")
    require_same_device(x=x, **{"regate rows": rows, "regate weights": rows_weights,
                                "regate experts": rows_experts})
    return rows.long(), rows_weights, rows_experts


def _regate_by_second_call(x, lora_a, lora_b, regate, scaling, backend, strategy):
    """The regated rows as a call of their own on the gathered rows (the grouped strategy keeps no h of the
    experts a token did not choose). A row outside [0, T) reads row 0 with no expert: a zero row."""
    rows, rows_weights, rows_experts = regate
    num_tokens = x.shape[0]
    if num_tokens == 0:  # no row to read: zero rows, whose call still gives zero gradients
        x_rows, rows_experts = x.new_zeros((rows.shape[0], x.shape[1])), torch.full_like(rows_experts, -1)
    else:
        inside = rows.clamp(0, num_tokens - 1)
        rows_experts = rows_experts.masked_fill((inside != rows)[:, None], -1)
        x_rows = x[inside]
    return _LoraMoEFunction.apply(None, x_rows, lora_a, lora_b, rows_weights.contiguous(),
                                  rows_experts.contiguous(), scaling, backend, strategy)


def _check_arguments(x, lora_a, lora_b, weights, experts, scaling, out):
    require_float("x", x)
    require_shape("x", x, (None, None), "[T, d_in]")
    num_tokens, d_in = x.shape
    require_dtype("lora_a", lora_a, (x.dtype,))
    require_shape("lora_a", lora_a, (None, None, d_in), f"[E, r, d_in={d_in}]")
    num_experts, rank, _ = lora_a.shape
    if num_experts < 1 or rank < 1:
        raise ValueError(f"lora_a must have E >= 1 experts and rank r >= 1, got shape {list(lora_a.shape)}")
    require_dtype("lora_b", lora_b, (x.dtype,))
    require_shape("lora_b", lora_b, (num_experts, None, rank), f"[E={num_experts}, d_out, r={rank}]")
    require_int("experts", experts)
    require_shape("experts", experts, (num_tokens, None), f"[T={num_tokens}, k]")
    top_k = experts.shape[1]
    require_dtype("weights", weights, tuple(dict.fromkeys((torch.float32, x.dtype))))
    require_shape("weights", weights, (num_tokens, top_k), f"[T={num_tokens}, k={top_k}]")
    require_real("scaling", scaling)
    tensors = {"x": x, "lora_a": lora_a, "lora_b": lora_b, "weights": weights, "experts": experts}
    if out is not None:
        require_dtype("out", out, (x.dtype,))
        require_shape("out", out, (num_tokens, lora_b.shape[1]), f"[T={num_tokens}, d_out={lora_b.shape[1]}]")
        tensors["out"] = out
    return require_same_device(**tensors)


def _infer(implementation, inputs: dict, scaling: float, out: torch.Tensor | None) -> torch.Tensor:
    """The forward alone, nothing kept for a backward: the implementation's `infer` where it has one."""
    if out is None:
        x, lora_b = inputs["x"], inputs["lora_b"]
        out = x.new_zeros((x.shape[0], lora_b.shape[1]))
    infer = getattr(implementation, "infer", None)
    if infer is None:
        implementation.forward_into(*inputs.values(), scaling, out)
    else:
        infer(*inputs.values(), scaling, out)
    return out


def lora_moe(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, weights: torch.Tensor,
             experts: torch.Tensor, *, scaling: float = 1.0, out: torch.Tensor | None = None,
             backend: str | None = None, validate: bool | None = None, strategy: str | None = None,
             regate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Apply each token's top-k LoRA experts.

    `x` [T, d_in], `lora_a` [E, r, d_in], `lora_b` [E, d_out, r] (one float dtype), `weights` [T, k]
    (float32 or x's dtype), `experts` [T, k] int32/int64. Returns
    `y[t] = scaling * sum_j weights[t, j] * lora_b[experts[t, j]] @ (lora_a[experts[t, j]] @ x[t])`
    in x's dtype, or adds it into `out` ([T, d_out], typically the frozen base output; any strides) in place and
    returns `out`; an `out` that shares memory with an input (such as `out=x`) or has overlapping elements (an
    expanded view) raises ValueError. Differentiable w.r.t. x, lora_a, lora_b, weights (and whatever produced `out`).

    `strategy` ("grouped", "dense", "auto" or None; also `SPARSEDOCTOR_LORA_MOE_STRATEGY`) picks how the
    kernels organise the work: `grouped` sorts the pairs by expert and computes only the chosen experts;
    `dense` computes every expert from one read of x and selects the gates in (fewer bytes while E*r is small;
    a NaN/inf weight of an expert a token did not choose can then reach that token). The default is the cost
    model's choice (`sparsedoctor_kernels.cost`) for the backend and device (on `torch` off the CPU: dense).

    `regate=(rows [m] int, weights2 [m, k2], experts2 [m, k2])` also returns some rows under other gates:
    the result is then `(y or out, y2)` with
    `y2[i] = scaling * sum_j weights2[i, j] * lora_b[experts2[i, j]] @ (lora_a[experts2[i, j]] @ x[rows[i]])`,
    differentiable like y (and w.r.t. weights2). Rows may repeat; a row outside [0, T) gives a zero row and
    no gradient (validate=True raises for it, as for expert ids). On the dense strategy y2 comes from the
    call's own rank-space rows (one more expand, no second read of x; its backward adds into the call's);
    the grouped strategy computes it by a second call on the gathered rows.
    """
    device = _check_arguments(x, lora_a, lora_b, weights, experts, scaling, out)
    backend = resolve_backend("lora_moe", backend, device, tuple(IMPLEMENTATIONS))
    num_experts, rank, d_in = lora_a.shape
    shapes = (x.shape[0], d_in, lora_b.shape[1], num_experts, experts.shape[1], rank)
    strategy = resolve_strategy(strategy, backend, shapes, x.dtype, device)
    if regate is not None:
        regate = _check_regate(regate, x)
    if default_validate(validate, device):
        check_ids_in_range("experts", experts, num_experts)
        if regate is not None:
            check_ids_in_range("regate experts", regate[2], num_experts)
            check_rows_in_range("regate rows", regate[0], x.shape[0])
    inputs = {"x": x.contiguous(), "lora_a": lora_a.contiguous(), "lora_b": lora_b.contiguous(),
              "weights": weights.contiguous(), "experts": experts.contiguous()}
    if out is not None:
        # Checked on what the kernels read: an input that was copied to be contiguous cannot alias `out`.
        require_writable_output("out", out, **inputs)  # out=x (a residual-style call) is refused here
    if regate is None:
        if calls_directly(out, *inputs.values()):
            return _infer(_implementation(backend, strategy), inputs, float(scaling), out)
        return _LoraMoEFunction.apply(out, *inputs.values(), float(scaling), backend, strategy)
    rows, rows_weights, rows_experts = (t.contiguous() for t in regate)
    if strategy == "dense":
        if out is not None and out._is_view() and torch.is_grad_enabled():
            # Autograd lets a function that writes into a view return one tensor only, and this one returns two:
            # the delta comes back fresh and is added into the view (one more pass over [T, d_out], in this
            # case alone).
            delta, y_rows = _LoraMoERegateFunction.apply(None, *inputs.values(), rows, rows_weights, rows_experts,
                                                         float(scaling), backend)
            return out.add_(delta), y_rows
        return _LoraMoERegateFunction.apply(out, *inputs.values(), rows, rows_weights, rows_experts, float(scaling),
                                            backend)
    y = _LoraMoEFunction.apply(out, *inputs.values(), float(scaling), backend, strategy)
    return y, _regate_by_second_call(inputs["x"], inputs["lora_a"], inputs["lora_b"],
                                     (rows, rows_weights, rows_experts), float(scaling), backend, strategy)
