"""Benchmark `route` (softmax + top-k + renormalise + counts + probability means, and the backward) against the
eager sequence model code writes (`naive`: `baselines.naive_routing`) and the library's `torch` reference.

    python benchmarks/bench_route.py                 # GPU: T in {4096, 16384}, E in {8, 64, 256}; CPU: smaller
"""

from __future__ import annotations

import sys

import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.testing import baselines

GPU_TOKENS = [4096, 16384]
CPU_TOKENS = [1024]
EXPERTS_AND_TOP_K = [(8, 2), (64, 4), (256, 8)]


def forward_fn(logits, top_k, impl):
    def forward():
        if impl == "naive":
            routing = sdk.Routing(*baselines.naive_routing(logits, top_k))
        else:
            routing = sdk.route(logits, top_k, backend=impl, validate=False)
        # One scalar that depends on both differentiable outputs, as the training loss does.
        return routing.weights.sum() + sdk.load_balance_loss(routing)

    return forward


def ideal_bytes(mode, num_tokens, num_experts, top_k, element) -> int:
    fwd = num_tokens * num_experts * element + num_tokens * top_k * 8 + num_experts * 8
    bwd = num_tokens * num_experts * element * 2 + num_tokens * top_k * 8 + num_experts * 4
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    env = harness.environment(device)
    backends = (["triton", "torch"] if device.type == "cuda" else ["torch"]) + ["naive"]
    rows = []
    for num_tokens in args.tokens:
        for num_experts, top_k in EXPERTS_AND_TOP_K:
            gen = torch.Generator(device=device).manual_seed(num_tokens + num_experts)
            logits = torch.randn(num_tokens, num_experts, generator=gen, device=device).to(dtype).requires_grad_()
            for backend in backends:
                for mode, fn in harness.gradient_modes(forward_fn(logits, top_k, backend), [logits]).items():
                    if mode not in args.modes:
                        continue
                    timing = harness.time_call(fn, device, rep_ms=args.rep_ms)
                    moved = ideal_bytes(mode, num_tokens, num_experts, top_k, dtype.itemsize)
                    sizes = dict(T=num_tokens, E=num_experts, k=top_k)
                    rows.append(harness.row("route", backend, "-", sizes, dtype, mode, timing, moved, env))
                    harness.echo(rows[-1])
    return rows


def summarize(rows: list[dict], copy_gbps: float) -> None:
    index = {(r["impl"], r["T"], r["E"], r["k"], r["mode"]): r for r in rows}
    table = []
    for (impl, tokens, experts, top_k, mode), got in index.items():
        if impl != "triton":
            continue
        eager = index.get(("naive", tokens, experts, top_k, mode))
        speedup = eager["ms_p50"] / got["ms_p50"] if eager else float("nan")
        table.append([tokens, experts, top_k, mode, got["ms_p50"], eager["ms_p50"] if eager else float("nan"),
                      speedup, got["gbps"], 100 * got["gbps"] / copy_gbps])
    if not table:
        print("\nroute: no triton rows (no GPU); the torch rows are in the CSV")
        return
    print(f"\nroute summary (median ms; copy bandwidth {copy_gbps:.0f} GB/s)")
    harness.print_table(["T", "E", "k", "mode", "triton ms", "eager ms", "x eager", "GB/s", "% copy"], table)


def main(argv=None) -> int:
    return harness.script_main(argv, __doc__, GPU_TOKENS, CPU_TOKENS, run, summarize)


if __name__ == "__main__":
    sys.exit(main())
