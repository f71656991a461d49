"""`ExpertQueue`: one ring buffer of past projection vectors per expert, updated in place."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparsedoctor_kernels import reference
from sparsedoctor_kernels._backend import LazyImplementation, default_validate, resolve_backend
from sparsedoctor_kernels._validation import (
    FLOAT_DTYPES,
    check_ids_in_range,
    require_float,
    require_int,
    require_positive_int,
    require_same_device,
    require_shape,
)

IMPLEMENTATIONS = {
    "triton": LazyImplementation("sparsedoctor_kernels.triton.queue"),
    "cuda": LazyImplementation("sparsedoctor_kernels.cuda.queue"),
    "torch": reference.queue,
}


@torch.library.custom_op("sparsedoctor::queue_enqueue", mutates_args=("queue_keys", "ptr", "size"))
def _queue_enqueue(
    queue_keys: torch.Tensor, ptr: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, experts: torch.Tensor,
    backend: str,
) -> None:
    IMPLEMENTATIONS[backend].enqueue(queue_keys, ptr, size, keys, experts)


@_queue_enqueue.register_fake
def _(queue_keys, ptr, size, keys, experts, backend):
    return None


def all_gather_rows(keys: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows, in rank order then row order; ranks may hold different numbers of rows.

    Needs the row counts of all ranks on the host (a sync, inherent to gathering ragged batches)."""
    world = dist.get_world_size()
    count = torch.tensor([keys.shape[0]], dtype=torch.long, device=keys.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    longest = max(counts)

    def gather_padded(rows: torch.Tensor) -> torch.Tensor:
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    return gather_padded(keys), gather_padded(experts)


class ExpertQueue(torch.nn.Module):
    """Per-expert ring buffers: `keys` [E, Q, dim], `ptr` [E] (next slot), `size` [E] (filled slots).

    All three are persistent buffers, so the queue travels with `state_dict()`.
    """

    def __init__(self, num_experts: int, capacity: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        require_positive_int("num_experts", num_experts)
        require_positive_int("capacity", capacity, minimum=0)
        require_positive_int("dim", dim)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point dtype (float32, bfloat16, float16), got {dtype}")
        self.register_buffer("keys", torch.zeros(num_experts, capacity, dim, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros(num_experts, dtype=torch.int64, device=device))
        self.register_buffer("size", torch.zeros(num_experts, dtype=torch.int64, device=device))

    @property
    def num_experts(self) -> int:
        return self.keys.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def dim(self) -> int:
        return self.keys.shape[2]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, capacity={self.capacity}, dim={self.dim}, dtype={self.keys.dtype}"

    @torch.no_grad()
    def reset(self) -> None:
        self.keys.zero_()
        self.ptr.zero_()
        self.size.zero_()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, experts: torch.Tensor, *, gather: bool = False,
                backend: str | None = None, validate: bool | None = None) -> None:
        """Write `keys` [N, dim] (any float dtype, stored in the queue's) into the rings of `experts` [N],
        exactly as writing the rows one by one in row order would. Ids outside [0, E) are dropped.
        With `gather=True` under an initialised process group, every rank's rows are written on every rank."""
        require_float("keys", keys)
        require_shape("keys", keys, (None, self.dim), f"[N, dim={self.dim}]")
        require_int("experts", experts)
        require_shape("experts", experts, (keys.shape[0],), f"[N={keys.shape[0]}]")
        device = require_same_device(queue=self.keys, keys=keys, experts=experts)
        backend = resolve_backend("ExpertQueue.enqueue", backend, device, tuple(IMPLEMENTATIONS))
        if default_validate(validate, device):
            check_ids_in_range("experts", experts, self.num_experts)
        keys, experts = keys.detach(), experts.detach()
        if gather and dist.is_available() and dist.is_initialized():
            keys, experts = all_gather_rows(keys, experts)
        _queue_enqueue(self.keys, self.ptr, self.size, keys.contiguous(), experts.contiguous(), backend)
