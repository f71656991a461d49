"""Expert memory queue: one ring buffer per expert, written as if the rows arrived one by one."""

from __future__ import annotations

import torch


def enqueue(queue_keys: torch.Tensor, ptr: torch.Tensor, size: torch.Tensor, keys: torch.Tensor,
            experts: torch.Tensor) -> None:
    """In place. Row i of expert e lands in slot (ptr[e] + rank_i) % Q, where rank_i counts the earlier rows
    of e in this call; when two rows hit one slot the later row wins, exactly as sequential writes would.
    Rows with an expert id outside [0, E) are dropped."""
    num_experts, capacity, dim = queue_keys.shape
    num_rows = keys.shape[0]
    if num_rows == 0 or capacity == 0:
        return
    device = queue_keys.device
    valid = (experts >= 0) & (experts < num_experts)
    ids = torch.where(valid, experts, num_experts).long()  # invalid rows share an extra, never-written bucket
    one_hot = (ids[:, None] == torch.arange(num_experts + 1, device=device)).long()
    rank = (one_hot.cumsum(0) - one_hot).gather(1, ids[:, None]).squeeze(1)
    counts = one_hot[:, :num_experts].sum(0)

    slot = (ptr.gather(0, ids.clamp(max=num_experts - 1)) + rank) % capacity
    dropped_target = num_experts * capacity  # one scratch position past the queue
    target = torch.where(valid, ids * capacity + slot, dropped_target)
    last_writer = torch.full((num_experts * capacity + 1,), -1, dtype=torch.long, device=device)
    last_writer.scatter_reduce_(0, target, torch.arange(num_rows, device=device), reduce="amax")
    last_writer = last_writer[:dropped_target]

    flat = queue_keys.view(num_experts * capacity, dim)
    written = (last_writer >= 0)[:, None]
    flat.copy_(torch.where(written, keys.to(queue_keys.dtype)[last_writer.clamp(min=0)], flat))
    ptr.copy_((ptr + counts) % capacity)
    size.copy_(torch.clamp(size + counts, max=capacity))
