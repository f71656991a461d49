"""Benchmark `ExpertQueue.enqueue` (Triton, CUDA) against the MoCo-style per-expert loop with host syncs.

Rows: op `queue`, impl `triton` / `cuda` / `torch` (the reference) / `naive` (MoCo loop), T = rows per call (N),
shape `Q=<capacity>,p=<dim>`, mode `fwd` (the enqueue has no backward).

    python benchmarks/bench_queue.py        # GPU: E in {8, 64}, Q in {1024, 4096}, N in {1024, 16384}, p = 128
"""

from __future__ import annotations

import sys

import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels._backend import why_backend_cannot_run
from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.testing import baselines

GPU_TOKENS = [1024, 16384]
CPU_TOKENS = [1024]
EXPERTS = [8, 64]
GPU_CAPACITIES = [1024, 4096]
CPU_CAPACITIES = [256]
DIM = 128


def implementations(queue, keys, experts, device):
    impls = {}
    for backend in ("triton", "cuda", "torch"):
        if device.type == "cuda" or backend == "torch":
            if why_backend_cannot_run(backend, device) is None:
                impls[backend] = lambda b=backend: queue.enqueue(keys, experts, backend=b, validate=False)
    impls["naive"] = lambda: baselines.moco_enqueue(queue.keys, queue.ptr, queue.size, keys, experts)
    return impls


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    env = harness.environment(device)
    capacities = GPU_CAPACITIES if device.type == "cuda" else CPU_CAPACITIES
    rows = []
    for num_rows in args.tokens:
        for num_experts in EXPERTS:
            for capacity in capacities:
                gen = torch.Generator(device=device).manual_seed(num_rows + capacity)
                queue = sdk.ExpertQueue(num_experts, capacity, DIM, dtype=dtype, device=device)
                keys = torch.randn(num_rows, DIM, generator=gen, device=device).to(dtype)
                experts = torch.randint(0, num_experts, (num_rows,), generator=gen, device=device)
                stored = min(num_rows, num_experts * capacity)
                moved = num_rows * (DIM * dtype.itemsize + 8) + stored * DIM * dtype.itemsize
                for impl, fn in implementations(queue, keys, experts, device).items():
                    timing = harness.time_call(fn, device, rep_ms=args.rep_ms)
                    rows.append(harness.row("queue", impl, f"Q={capacity},p={DIM}", dict(T=num_rows, E=num_experts),
                                            dtype, "fwd", timing, moved, env))
                    harness.echo(rows[-1])
    return rows


def summarize(rows: list[dict], copy_gbps: float) -> None:
    index = {(r["impl"], r["T"], r["E"], r["shape"]): r for r in rows}
    table = []
    for (impl, num_rows, num_experts, shape), got in index.items():
        if impl == "naive":
            continue
        naive = index.get(("naive", num_rows, num_experts, shape))
        table.append([num_rows, num_experts, shape, impl, got["ms_p50"], naive["ms_p50"] / got["ms_p50"],
                      got["gbps"], 100 * got["gbps"] / copy_gbps])
    print(f"\nqueue summary (median ms; copy bandwidth {copy_gbps:.0f} GB/s)")
    harness.print_table(["N", "E", "shape", "impl", "ms", "x naive", "GB/s", "% copy"], table)


def main(argv=None) -> int:
    return harness.script_main(argv, __doc__, GPU_TOKENS, CPU_TOKENS, run, summarize)


if __name__ == "__main__":
    sys.exit(main())
