"""Output allocation for the kernel launchers.

Tests set `poison_outputs = True` so that every buffer a kernel should fill starts as NaN (floats) or
a large sentinel (integers): an element the kernel forgets to write then fails the comparison instead of
passing by luck on zeroed memory."""

from __future__ import annotations

import torch

poison_outputs = False
INT_POISON = 0x7FFF_FFF0


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs:
        tensor.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return tensor


def empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like` (the tensor's strides when it is dense, else contiguous), poisoned like `empty`."""
    out = torch.empty_like(tensor)
    if poison_outputs:
        out.fill_(float("nan") if out.dtype.is_floating_point else INT_POISON)
    return out
