"""`ExpertQueue.enqueue` on the CUDA extension: a one-block position scan and a parallel row copy (E <= 256)."""

from __future__ import annotations

import torch

from sparsedoctor_kernels import _C  # noqa: F401 - registers torch.ops.sparsedoctor_cuda
from sparsedoctor_kernels._alloc import empty
from sparsedoctor_kernels.cuda import MAX_EXPERTS


def enqueue(queue_keys: torch.Tensor, ptr: torch.Tensor, size: torch.Tensor, keys: torch.Tensor,
            experts: torch.Tensor) -> None:
    num_experts = queue_keys.shape[0]
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"backend='cuda' enqueues into at most {MAX_EXPERTS} experts, got E={num_experts}; "
                         "use backend='triton'")
    if keys.shape[0] == 0 or queue_keys.shape[1] == 0:
        return
    dest = empty((keys.shape[0],), torch.int64, keys.device)
    torch.ops.sparsedoctor_cuda.enqueue(queue_keys, ptr, size, keys.to(queue_keys.dtype).contiguous(),
                                        experts.contiguous(), dest)
