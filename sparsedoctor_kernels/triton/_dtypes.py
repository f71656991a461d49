"""The torch -> Triton dtype map and the dot-product configuration, shared by every kernel launcher."""

from __future__ import annotations

import torch
import triton.language as tl

TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


def compute_type(dtype: torch.dtype):
    """The Triton type elementwise math runs in: float64 for float64 inputs, float32 for everything else."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_config(dtype: torch.dtype, acc_dtype: torch.dtype) -> dict:
    """tl.dot operands, accumulator and precision. 16-bit operands go to the tensor cores with fp32
    accumulation; fp32/fp64 stay exact (no TF32), as torch's own fp32 matmuls do by default."""
    return dict(DOT=TL_DTYPES[dtype], ACC=TL_DTYPES[acc_dtype],
                PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32")
