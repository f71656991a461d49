"""`infonce_queue_loss`: InfoNCE of each token's routed view against its fused view and the other experts'
stored views, with the gradients computed in the forward (see reference/infonce.py for why)."""

from __future__ import annotations

import torch

from sparsedoctor_kernels import eager
from sparsedoctor_kernels._backend import LazyImplementation, default_validate, resolve_backend
from sparsedoctor_kernels._validation import (
    check_ids_in_range,
    compute_dtype,
    require_float,
    require_int,
    require_real,
    require_same_device,
    require_shape,
    require_tensor,
)
from sparsedoctor_kernels.ops.queue import ExpertQueue

IMPLEMENTATIONS = {"triton": LazyImplementation("sparsedoctor_kernels.triton.infonce"), "torch": eager.infonce}
REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("sparsedoctor::infonce_forward", mutates_args=())
def _infonce_forward(
    query: torch.Tensor, positive: torch.Tensor, queue_keys: torch.Tensor, queue_size: torch.Tensor,
    query_experts: torch.Tensor, temperature: float, normalize: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(query.device.type, enabled=False):  # the scores in the compute dtype, as promised
        return IMPLEMENTATIONS[backend].forward(
            query, positive, queue_keys, queue_size, query_experts, temperature, normalize
        )


@_infonce_forward.register_fake
def _(query, positive, queue_keys, queue_size, query_experts, temperature, normalize, backend):
    dtype = compute_dtype(query.dtype, positive.dtype)
    return (
        query.new_empty((query.shape[0],), dtype=dtype),
        query.new_empty(query.shape, dtype=dtype),
        positive.new_empty(positive.shape, dtype=dtype),
    )


class _InfoNCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, positive, queue_keys, queue_size, query_experts, temperature, normalize, backend):
        loss, grad_query, grad_positive = _infonce_forward(
            query, positive, queue_keys, queue_size, query_experts, temperature, normalize, backend
        )
        # Only per-row gradients are kept: O(N * p), independent of the queue and of its later updates.
        ctx.save_for_backward(grad_query, grad_positive)
        ctx.dtypes = (query.dtype, positive.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_query, grad_positive = ctx.saved_tensors
        scale = grad_loss[:, None]
        return (
            (scale * grad_query).to(ctx.dtypes[0]),
            (scale * grad_positive).to(ctx.dtypes[1]),
            None, None, None, None, None, None,
        )


def _unpack_queue(queue) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(queue, ExpertQueue):
        return queue.keys, queue.size
    if isinstance(queue, (tuple, list)) and len(queue) == 2:
        keys, size = (require_tensor(name, t) for name, t in zip(("queue[0] (keys)", "queue[1] (size)"), queue))
        return keys, size
    raise TypeError(f"queue must be an sdk.ExpertQueue or a (keys [E, Q, p], size [E]) tuple, "
                    f"got {type(queue).__name__}")


def infonce_queue_loss(query: torch.Tensor, positive: torch.Tensor, queue, query_experts: torch.Tensor, *,
                       temperature: float = 0.07, normalize: bool = True, reduction: str = "mean",
                       backend: str | None = None, validate: bool | None = None) -> torch.Tensor:
    """InfoNCE with `positive` as each query's positive and the other experts' queued keys as negatives.

    `query`, `positive` [N, p]; `queue` an ExpertQueue or `(keys [E, Q, p], size [E])`; `query_experts` [N].
    `loss_i = logsumexp([s_i, n_i...]) - s_i` with `s_i = <q_i, k_i> / temperature` and `n_ij` the scores of
    the filled slots of every expert other than `query_experts[i]`. `reduction` "mean" (0 for N = 0), "sum"
    or "none" ([N]); float32 (float64 for float64 inputs). The queue gets no gradient and may be enqueued
    into before backward() without changing the gradients.
    """
    queue_keys, queue_size = _unpack_queue(queue)
    require_float("query", query)
    require_shape("query", query, (None, None), "[N, p]")
    num_rows, dim = query.shape
    require_float("positive", positive)
    require_shape("positive", positive, (num_rows, dim), f"[N={num_rows}, p={dim}]")
    require_float("queue keys", queue_keys)
    require_shape("queue keys", queue_keys, (None, None, dim), f"[E, Q, p={dim}]")
    num_experts = queue_keys.shape[0]
    require_int("queue size", queue_size)
    require_shape("queue size", queue_size, (num_experts,), f"[E={num_experts}]")
    require_int("query_experts", query_experts)
    require_shape("query_experts", query_experts, (num_rows,), f"[N={num_rows}]")
    temperature = require_real("temperature", temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    device = require_same_device(query=query, positive=positive, queue=queue_keys, queue_size=queue_size,
                                 query_experts=query_experts)
    backend = resolve_backend("infonce_queue_loss", backend, device, tuple(IMPLEMENTATIONS))
    if default_validate(validate, device):
        check_ids_in_range("query_experts", query_experts, num_experts)

    loss = _InfoNCEFunction.apply(
        query.contiguous(), positive.contiguous(), queue_keys.contiguous(), queue_size.contiguous(),
        query_experts.contiguous(), temperature, bool(normalize), backend,
    )
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / max(num_rows, 1)
