"""`group_infonce`: InfoNCE of rows against their groups' means (the model's default contrastive term: a token's
routing distribution against its sequence's), the loss and its gradient computed in one pass."""

from __future__ import annotations

import torch

from sparsedoctor_kernels import reference
from sparsedoctor_kernels._backend import LazyImplementation, resolve_backend
from sparsedoctor_kernels._validation import (
    compute_dtype,
    require_float,
    require_int,
    require_real,
    require_same_device,
    require_shape,
)

IMPLEMENTATIONS = {"triton": LazyImplementation("sparsedoctor_kernels.triton.group_infonce"),
                   "torch": reference.group_infonce}


@torch.library.custom_op("sparsedoctor::group_infonce_forward", mutates_args=())
def _group_infonce_forward(x: torch.Tensor, groups: torch.Tensor, num_groups: int, temperature: float,
                           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(x.device.type, enabled=False):  # the scores in the compute dtype, as promised
        return IMPLEMENTATIONS[backend].forward(x, groups, num_groups, temperature)


@_group_infonce_forward.register_fake
def _(x, groups, num_groups, temperature, backend):
    dtype = compute_dtype(x.dtype)
    return x.new_empty(x.shape[:-2], dtype=dtype), x.new_empty(x.shape, dtype=dtype)


class _GroupInfoNCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, num_groups, temperature, backend):
        loss, grad_x = _group_infonce_forward(x, groups, num_groups, temperature, backend)
        ctx.save_for_backward(grad_x)
        ctx.x_dtype = x.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad_x,) = ctx.saved_tensors
        # One loss per problem of a batch: each scales its own rows' gradient.
        return (grad_loss[..., None, None] * grad_x).to(ctx.x_dtype), None, None, None, None


def _backend(requested: str | None, device: torch.device, shape: tuple[int, int, int]) -> str:
    """The automatic choice takes the reference for shapes the one-program kernel does not hold; an explicit
    `backend="triton"` for such a shape is refused."""
    backend = resolve_backend("group_infonce", requested, device, tuple(IMPLEMENTATIONS))
    if backend == "triton" and not IMPLEMENTATIONS["triton"].fits(*shape):
        if requested is not None:
            raise ValueError(f"group_infonce: backend 'triton' holds tiles of n x max(d, S) and S x d padded "
                             f"elements, each <= 4096, in one program; got n={shape[0]}, d={shape[1]}, "
                             f"S={shape[2]}; use backend='torch'")
        return "torch"
    return backend


def group_infonce(x: torch.Tensor, groups: torch.Tensor, num_groups: int, *, temperature: float = 0.07,
                  backend: str | None = None) -> torch.Tensor:
    """InfoNCE of each row of `x` [n, d] against the mean of the other rows of its group, the other groups'
    means as negatives; the mean over the rows that have a partner in their group (0 when none has).

    `groups` [n] int: each row's group in [0, num_groups); a row with an id outside that range (e.g. -1 for
    padding) takes no part. Scores are cosines over `temperature`. Differentiable w.r.t. `x`: through each
    row's query and positive and through every group's mean (the negatives are not constants). Returns a
    float32 scalar (float64 for float64 x). No host synchronisation; full formula in reference/group_infonce.py.

    A batch of B independent problems, `x` [B, n, d] with `groups` [B, n], returns their B losses [B] from one
    call (one launch): the model's router term of every adapted module at once.
    """
    require_float("x", x)
    batched = x.dim() == 3
    require_shape("x", x, (None,) * (3 if batched else 2), "[B, n, d]" if batched else "[n, d]")
    require_int("groups", groups)
    require_shape("groups", groups, tuple(x.shape[:-1]),
                  f"[B={x.shape[0]}, n={x.shape[1]}]" if batched else f"[n={x.shape[0]}]")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
    temperature = require_real("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = require_same_device(x=x, groups=groups)
    backend = _backend(backend, device, (x.shape[-2], x.shape[-1], num_groups))
    return _GroupInfoNCEFunction.apply(x.contiguous(), groups.contiguous(), num_groups, float(temperature),
                                       backend)
