"""`sparsedoctor bench`: run the op benchmarks and the training step, write one CSV (rows as in
benchmarks/README.md) and PNG plots of the speedups and peak memory."""

from __future__ import annotations

import csv
import importlib
import pathlib

import torch

from sparsedoctor_kernels.bench import harness

OPS = ("route", "lora_moe", "sibling_lora_moe", "queue", "infonce", "step", "versus_lora")
BASELINE = {"route": "naive", "lora_moe": "naive", "lora_moe_layer": "naive", "queue": "naive", "infonce": "naive",
            "step": "naive", "sibling_lora_moe": "separate"}
# --quick on a GPU: one representative size per op (the CPU grids are already small).
GPU_QUICK = {"route": ["--tokens", "16384"], "lora_moe": ["--shapes", "gate_proj", "--tokens", "8192", "--configs",
                                                          "8,2,16"],
             "sibling_lora_moe": ["--tokens", "8192"], "queue": ["--tokens", "16384"], "infonce": ["--tokens", "4096"],
             "step": [],
             "versus_lora": ["--reps", "3"]}
CPU_QUICK = {"lora_moe": ["--shapes", "gate_proj", "k_proj"], "step": ["--layers", "1"],
             "versus_lora": ["--layers", "1", "--reps", "2", "--figures", "step", "decode", "saved_bytes"]}


def run_suite(ops, quick: bool, out: pathlib.Path, device: str | None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = harness.results_path(torch.device(device), out)
    status = 0
    for op in ops:
        module = importlib.import_module(f"sparsedoctor_kernels.bench.{op}")
        argv = ["--device", device, "--out", str(csv_path), "--rep-ms", "25" if quick else "100"]
        if quick:
            argv += (GPU_QUICK if device == "cuda" else CPU_QUICK).get(op, [])
        print(f"\n=== {op} ===", flush=True)
        status |= module.main(argv)
    with csv_path.open(newline="") as handle:
        every_row = list(csv.DictReader(handle))
    # lora_moe also writes lora_moe_layer rows (the adapter on top of the frozen layer): plotted with it.
    rows = [r for r in every_row if r["op"] in ops or r["op"].removesuffix("_layer") in ops]
    from sparsedoctor_kernels.bench.plots import bench_device_label, plot_bench, plot_versus_lora

    paths = plot_bench(rows, BASELINE, out) if rows else []
    if "versus_lora" in ops:
        from sparsedoctor_kernels.bench.versus_lora import ratios

        table = [row for row in ratios(every_row) if row[4] is not None]  # the figures with a goal
        if table:
            paths.append(plot_versus_lora(table, out / "versus_lora.png", bench_device_label(every_row) or device))
    for path in paths:
        print(f"plot: {path}")
    print(f"rows: {csv_path}")
    if device != "cuda":
        print("(CPU run: these numbers only show the suite works; the GPU numbers are the ones that count)")
    return status
