"""Benchmark `infonce_queue_loss` (Triton) against the naive version that materialises the [N, E*Q] scores.

Rows: op `infonce`, impl `triton` / `torch` (the row-blocked reference) / `naive`, T = N query rows, E experts,
shape `Q=<capacity>,p=<dim>`, modes `fwd` / `bwd` / `full`; `peak_mem_mb` is the point of this op.

    python benchmarks/bench_infonce.py      # GPU: N in {1024, 4096, 16384}, E*Q in {8x1024, 8x4096, 64x1024}, p=128
"""

from __future__ import annotations

import sys

import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels._backend import why_backend_cannot_run
from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.testing import baselines

GPU_TOKENS = [1024, 4096, 16384]
CPU_TOKENS = [256]
GPU_QUEUES = [(8, 1024), (8, 4096), (64, 1024)]
CPU_QUEUES = [(8, 128), (16, 256)]
DIM = 128


def implementations(queue, query, positive, experts, device):
    impls = {}
    for backend in ("triton", "torch"):
        if (device.type == "cuda" or backend == "torch") and why_backend_cannot_run(backend, device) is None:
            impls[backend] = lambda b=backend: sdk.infonce_queue_loss(query, positive, queue, experts, backend=b,
                                                                      validate=False)
    impls["naive"] = lambda: baselines.naive_infonce(query, positive, queue.keys, queue.size, experts)
    return impls


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    env = harness.environment(device)
    rows = []
    for num_rows in args.tokens:
        for num_experts, capacity in GPU_QUEUES if device.type == "cuda" else CPU_QUEUES:
            gen = torch.Generator(device=device).manual_seed(num_rows + capacity)
            queue = sdk.ExpertQueue(num_experts, capacity, DIM, device=device)
            queue.enqueue(torch.nn.functional.normalize(torch.randn(num_experts * capacity, DIM, generator=gen,
                                                                    device=device), dim=-1),
                          torch.arange(num_experts, device=device).repeat_interleave(capacity), validate=False)
            query = torch.randn(num_rows, DIM, generator=gen, device=device).to(dtype).requires_grad_()
            positive = torch.randn(num_rows, DIM, generator=gen, device=device).to(dtype).requires_grad_()
            experts = torch.randint(0, num_experts, (num_rows,), generator=gen, device=device)
            for impl, forward in implementations(queue, query, positive, experts, device).items():
                for mode, fn in harness.gradient_modes(forward, [query, positive]).items():
                    if mode not in args.modes:
                        continue
                    timing = harness.time_call(fn, device, rep_ms=args.rep_ms)
                    queue_bytes = num_experts * capacity * DIM * 4
                    moved = {"fwd": 4 * num_rows * DIM * dtype.itemsize + queue_bytes,
                             "bwd": 4 * num_rows * DIM * dtype.itemsize}
                    moved["full"] = moved["fwd"] + moved["bwd"]
                    rows.append(harness.row("infonce", impl, f"Q={capacity},p={DIM}",
                                            dict(T=num_rows, E=num_experts), dtype, mode, timing, moved[mode], env))
                    harness.echo(rows[-1])
    return rows


def summarize(rows: list[dict], copy_gbps: float) -> None:
    index = {(r["impl"], r["T"], r["E"], r["shape"], r["mode"]): r for r in rows}
    table = []
    for (impl, num_rows, num_experts, shape, mode), got in index.items():
        if impl == "naive":
            continue
        naive = index.get(("naive", num_rows, num_experts, shape, mode))
        memory_ratio = got["peak_mem_mb"] / naive["peak_mem_mb"] if naive["peak_mem_mb"] else float("nan")
        table.append([num_rows, f"{num_experts}x{shape}", mode, impl, got["ms_p50"],
                      got["ms_p50"] / naive["ms_p50"], got["peak_mem_mb"], 100 * memory_ratio])
    print("\ninfonce summary (median ms; time and peak memory relative to the naive materialised version)")
    harness.print_table(["N", "E x queue", "mode", "impl", "ms", "time / naive", "peak MB", "% naive mem"], table)


def main(argv=None) -> int:
    return harness.script_main(argv, __doc__, GPU_TOKENS, CPU_TOKENS, run, summarize)


if __name__ == "__main__":
    sys.exit(main())
