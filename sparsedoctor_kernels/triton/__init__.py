"""Triton kernels and their launchers, one file per op (kernels first, launchers last).

These modules import triton and define `@triton.jit` kernels at import time, which is when Triton reads
TRITON_INTERPRET: the ops import them lazily, on first use of `backend="triton"`."""
