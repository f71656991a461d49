"""One `lora_moe` layer call (forward + backward, `out=` the frozen output) inside a CUDA profiler range, for ncu.

    ncu --profile-from-start off --clock-control none --csv --print-units base \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \\
        python3 benchmarks/profile_lora_moe.py --strategy dense

Warm-up calls run first, outside the range, so Triton compiles and the allocator settles before anything is
measured; then one call runs inside `torch.cuda.profiler` start/stop, so ncu sees that call's kernels and
autograd's small helpers (fills, casts) alone: the frozen GEMM and the copy of its output run before the range.
The call's modelled bytes (`sparsedoctor_kernels.cost`, the model the
strategy choice uses) are printed as a `MODEL` line, so that `gpu_session.py` can set the DRAM bytes ncu
counted beside them. On CPU (`--device cpu`, the Triton interpreter, tiny sizes) it runs the same code with no
profiler: that is how the tests rehearse it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["dense", "grouped"], required=True)
    parser.add_argument("--shape", default="gate_proj", help="a Qwen3-4B projection (default: gate_proj)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--config", default="8,2,16", help="E,k,r (default: 8,2,16)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shrink", type=int, default=1, help="divide the projection's sizes by this (CPU tests)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import sparsedoctor_kernels as sdk
    from sparsedoctor_kernels.bench.lora_moe import QWEN3_4B_SHAPES, make_inputs
    from sparsedoctor_kernels.cost import lora_moe_cost

    num_experts, top_k, rank = (int(v) for v in args.config.split(","))
    d_in, d_out = (max(1, size // args.shrink) for size in QWEN3_4B_SHAPES[args.shape])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = make_inputs(args.tokens, d_in, d_out, num_experts, top_k, rank, dtype, device)
    x, lora_a, lora_b, weights, experts = (inputs[n] for n in ("x", "lora_a", "lora_b", "weights", "experts"))
    frozen = torch.nn.functional.linear(x.detach(), inputs["base_weight"])
    grad_y = torch.randn_like(frozen)

    def layer_call(out):
        """`out` is the frozen layer's output: the delta is added into it, as the model layer does."""
        y = sdk.lora_moe(x, lora_a, lora_b, weights, experts, scaling=2.0, out=out, backend="triton",
                         validate=False, strategy=args.strategy)
        return torch.autograd.grad(y, [x, lora_a, lora_b, weights], grad_y)

    for _ in range(args.warmup):
        layer_call(frozen.clone())
    out = frozen.clone()  # outside the range: what is measured is the adapter's call
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    grads = layer_call(out)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    if not all(bool(torch.isfinite(g).all()) for g in grads):
        print("non-finite gradients", file=sys.stderr)
        return 1
    cost = lora_moe_cost(args.strategy, args.tokens, d_in, d_out, num_experts, top_k, rank, dtype.itemsize)
    print(f"MODEL strategy={args.strategy} shape={args.shape} T={args.tokens} d_in={d_in} d_out={d_out} "
          f"E={num_experts} k={top_k} r={rank} dtype={str(dtype).removeprefix('torch.')} "
          f"bytes_fwd={cost.bytes_fwd} bytes_bwd={cost.bytes_bwd}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
