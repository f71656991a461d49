"""(atol, rtol) per dtype, for values of order one: what `sparsedoctor check`, the benchmarks' output checks and
the tests compare a kernel's result with the float64 reference by."""

import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}
