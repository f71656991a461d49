"""The roofline of `lora_moe` per strategy at the Qwen3-4B projections: modelled, never measured.

For one decoder layer's seven projections at T tokens (bf16), the frozen layer's forward + backward (dx only:
its weight is frozen) is compared with the delta of each strategy in `sparsedoctor_kernels.cost`, both
divided by the same device rates, and printed as (base + delta) / base: the slowdown a LoRA-MoE adapter adds
to the frozen model if every kernel ran at the roofline. The frozen GEMMs are compute-bound and run at
GEMM_FLOPS; the delta kernels are memory-bound at the copy bandwidth unless their FLOPs say otherwise.

    python benchmarks/roofline.py                 # docs/gpu.md's table (H100 rates)
    python benchmarks/roofline.py --tokens 16384 --device H200
"""

from __future__ import annotations

import argparse
import sys

from sparsedoctor_kernels.bench.lora_moe import QWEN3_4B_SHAPES
from sparsedoctor_kernels.cost import GPU_RATES, STRATEGIES, DeviceRates, lora_moe_cost

GEMM_FLOPS = 800e12  # a large bf16 GEMM on an H100 sustains ~80% of its 990 TFLOP/s peak
CONFIGS = [(8, 2, 16), (64, 4, 8), (8, 2, 64), (64, 1, 64)]  # (E, k, r)
ELEMENT = 2  # bf16


def frozen_seconds(num_tokens: int, rates: DeviceRates) -> float:
    total = 0.0
    for d_in, d_out in QWEN3_4B_SHAPES.values():
        flops = 2 * 2 * num_tokens * d_in * d_out  # y = x W^T and dx = grad_y W
        moved = ELEMENT * (2 * d_in * d_out + 2 * num_tokens * (d_in + d_out))
        total += max(flops / GEMM_FLOPS, moved / rates.bytes_per_s)
    return total


def delta_seconds(strategy: str, num_tokens: int, config, rates: DeviceRates) -> float:
    num_experts, top_k, rank = config
    return sum(lora_moe_cost(strategy, num_tokens, d_in, d_out, num_experts, top_k, rank, ELEMENT).seconds(rates)
               for d_in, d_out in QWEN3_4B_SHAPES.values())


def table(num_tokens: int, device: str) -> str:
    bandwidth, half_flops, _ = GPU_RATES[device]
    rates = DeviceRates(device, bandwidth, half_flops)
    base = frozen_seconds(num_tokens, rates)
    header = "| strategy | " + " | ".join(f"E{e} k{k} r{r}" for e, k, r in CONFIGS) + " |"
    lines = [f"{device} rates: {bandwidth / 1e12:.1f} TB/s, delta dots {half_flops / 1e12:.0f} TFLOP/s, frozen "
             f"GEMMs {GEMM_FLOPS / 1e12:.0f} TFLOP/s; T = {num_tokens}, bf16, all seven projections; frozen "
             f"forward + backward = {base * 1e3:.2f} ms", "", header, "|---" * (len(CONFIGS) + 1) + "|"]
    for strategy in STRATEGIES:
        ratios = [(base + delta_seconds(strategy, num_tokens, c, rates)) / base for c in CONFIGS]
        lines.append(f"| {strategy} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    best = [(base + min(delta_seconds(s, num_tokens, c, rates) for s in STRATEGIES)) / base for c in CONFIGS]
    lines.append("| chosen per call | " + " | ".join(f"{r:.2f}" for r in best) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--device", choices=sorted(GPU_RATES), default="H100")
    args = parser.parse_args(argv)
    print(table(args.tokens, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
