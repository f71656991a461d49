"""Benchmark `sibling_lora_moe` (the experts of projections that read one input, from one pass over it) against
what the model did before it: one `lora_moe` call per projection (`separate`, the cost model's strategy each).

    python benchmarks/bench_sibling_lora_moe.py     # GPU: Qwen3-4B q/k/v and gate/up; CPU: issue 23's small model

The roofline bytes are the group's as `sparsedoctor_kernels.cost` counts one dense layer of S*E experts, S*k
slots and the siblings' widths summed (x read once, each output read and written once).
"""

from __future__ import annotations

import sys

import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.cost import lora_moe_cost

GPU_TOKENS = [4096, 16384]
CPU_TOKENS = [512]
# name: (d_in, the siblings' d_out) on the GPU (Qwen3-4B) and on the CPU (issue 23's small Qwen3)
GPU_GROUPS = {"qkv": (2560, (4096, 1024, 1024)), "gate_up": (2560, (9728, 9728))}
CPU_GROUPS = {"qkv": (512, (512, 256, 256)), "gate_up": (512, (1536, 1536))}
EXPERTS, TOP_K, RANK = 8, 2, 16


def _inputs(num_tokens, d_in, widths, dtype, device):
    gen = torch.Generator(device=device).manual_seed(num_tokens + d_in)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    x = randn(num_tokens, d_in)
    lora_a = [randn(EXPERTS, RANK, d_in, scale=d_in**-0.5) for _ in widths]
    lora_b = [randn(EXPERTS, width, RANK, scale=RANK**-0.5) for width in widths]
    routings = [sdk.route(torch.randn(num_tokens, EXPERTS, generator=gen, device=device), TOP_K) for _ in widths]
    bases = [torch.randn(num_tokens, width, generator=gen, device=device).to(dtype) for width in widths]
    return x, lora_a, lora_b, [r.weights for r in routings], [r.experts for r in routings], bases


def forward_fn(inputs, impl: str):
    x, lora_a, lora_b, weights, experts, bases = inputs

    def forward():
        outs = [base.clone() for base in bases]  # the frozen outputs the adapters add into
        if impl == "siblings":
            outs = sdk.sibling_lora_moe(x, lora_a, lora_b, weights, experts, scaling=2.0, outs=outs, validate=False)
        else:
            outs = [sdk.lora_moe(x, a, b, w, e, scaling=2.0, out=o, validate=False)
                    for a, b, w, e, o in zip(lora_a, lora_b, weights, experts, outs)]
        return sum(out.float().sum() for out in outs)

    return forward


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    env = harness.environment(device)
    groups = GPU_GROUPS if device.type == "cuda" else CPU_GROUPS
    rows = []
    for num_tokens in args.tokens:
        for name, (d_in, widths) in groups.items():
            inputs = _inputs(num_tokens, d_in, widths, dtype, device)
            leaves = [inputs[0], *inputs[1], *inputs[2]]
            cost = lora_moe_cost("dense", num_tokens, d_in, sum(widths), len(widths) * EXPERTS,
                                 len(widths) * TOP_K, RANK, dtype.itemsize)
            for impl in ("siblings", "separate"):
                for mode, fn in harness.gradient_modes(forward_fn(inputs, impl), leaves).items():
                    if mode not in args.modes:
                        continue
                    timing = harness.time_call(fn, device, rep_ms=args.rep_ms)
                    sizes = dict(T=num_tokens, E=EXPERTS, k=TOP_K, r=RANK)
                    shape = f"{name}:{d_in}->{'+'.join(map(str, widths))}"
                    rows.append(harness.row("sibling_lora_moe", impl, shape, sizes, dtype, mode, timing,
                                            cost.bytes(mode), env))
                    harness.echo(rows[-1])
    return rows


def summarize(rows: list[dict], copy_gbps: float) -> None:
    index = {(r["impl"], r["shape"], r["T"], r["mode"]): r for r in rows}
    table = []
    for (impl, shape, tokens, mode), got in index.items():
        separate = index.get(("separate", shape, tokens, mode))
        if impl != "siblings" or separate is None:
            continue
        table.append([shape, tokens, mode, got["ms_p50"], separate["ms_p50"], separate["ms_p50"] / got["ms_p50"],
                      got["gbps"], 100 * got["gbps"] / copy_gbps])
    print(f"\nsibling_lora_moe summary (median ms; copy bandwidth {copy_gbps:.0f} GB/s)")
    harness.print_table(["group", "T", "mode", "siblings ms", "separate ms", "x separate", "GB/s", "% copy"], table)


def main(argv=None) -> int:
    return harness.script_main(argv, __doc__, GPU_TOKENS, CPU_TOKENS, run, summarize)


if __name__ == "__main__":
    sys.exit(main())
