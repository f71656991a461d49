"""Benchmark `lora_moe` against what people write today, at Qwen3-4B projection shapes.

Two ops are reported:
- `lora_moe`: the adapter delta alone. impl `triton`/`torch` are this library's backends, `naive` the
  per-expert Python loop, `dense` every expert as one rank E*r LoRA with a gate mask, `lora` one plain LoRA of
  rank r, `base` the frozen base linear alone (for scale);
- `lora_moe_layer`: the adapted layer, base linear + delta (`triton`/`torch` add the delta into the base
  output with `out=`; the others add it after). `base` is the frozen layer alone, so triton / base is the
  cost of the adapter on top of the layer.
Modes: `fwd`, `bwd` (backward over a retained graph: dx, dA, dB, dweights; the base weight is frozen), `full`.
GB/s counts the bytes an ideal implementation must move (inputs read once, outputs written once).

    python benchmarks/bench_lora_moe.py                      # GPU: the issue's grid; CPU: small torch-only grid
    python benchmarks/bench_lora_moe.py --shapes gate_proj --tokens 8192 --configs 8,2,16
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels import baselines
from sparsedoctor_kernels.bench import harness

# Qwen3-4B: hidden 2560, intermediate 9728, 32 query heads and 8 key/value heads of 128.
QWEN3_4B_SHAPES = {"q_proj": (2560, 4096), "k_proj": (2560, 1024), "v_proj": (2560, 1024), "o_proj": (4096, 2560),
                   "gate_proj": (2560, 9728), "up_proj": (2560, 9728), "down_proj": (9728, 2560)}
CONFIGS = [(8, 2, 16), (64, 4, 8)]  # (E, k, r)
GPU_TOKENS = [2048, 8192, 16384]
CPU_TOKENS = [256]
CPU_SHRINK = 16  # on CPU every projection size is divided by this, so the grid runs in about a minute
IMPLS = ["triton", "torch", "naive", "dense", "lora", "base"]


def make_inputs(num_tokens, d_in, d_out, num_experts, top_k, rank, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype).requires_grad_(grad)

    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    routing = sdk.route(logits, top_k)
    return dict(
        x=randn(num_tokens, d_in),
        lora_a=randn(num_experts, rank, d_in, scale=d_in**-0.5), lora_b=randn(num_experts, d_out, rank, scale=0.02),
        weights=routing.weights.detach().requires_grad_(), experts=routing.experts,
        single_a=randn(rank, d_in, scale=d_in**-0.5), single_b=randn(d_out, rank, scale=0.02),
        base_weight=randn(d_out, d_in, scale=d_in**-0.5, grad=False),
    )


def implementations(inputs, scaling, layer: bool):
    """impl -> (forward callable, tensors it differentiates w.r.t.)."""
    x, a, b, w, e = (inputs[n] for n in ("x", "lora_a", "lora_b", "weights", "experts"))
    moe_params = [x, a, b, w]

    def base():
        return F.linear(x, inputs["base_weight"])

    def with_base(delta_fn):
        return (lambda: base() + delta_fn()) if layer else delta_fn

    def library(backend):
        if layer:
            return lambda: sdk.lora_moe(x, a, b, w, e, scaling=scaling, out=base(), backend=backend, validate=False)
        return lambda: sdk.lora_moe(x, a, b, w, e, scaling=scaling, backend=backend, validate=False)

    return {
        "triton": (library("triton"), moe_params),
        "torch": (library("torch"), moe_params),
        "naive": (with_base(lambda: baselines.naive_lora_moe(x, a, b, w, e, scaling)), moe_params),
        "dense": (with_base(lambda: baselines.dense_lora_moe(x, a, b, w, e, scaling)), moe_params),
        "lora": (with_base(lambda: baselines.lora_linear(x, inputs["single_a"], inputs["single_b"], scaling)),
                 [x, inputs["single_a"], inputs["single_b"]]),
        "base": (base, [x]),
    }


def ideal_bytes(impl, mode, num_tokens, d_in, d_out, num_experts, top_k, rank, element, layer) -> int:
    """Bytes an implementation must move at least: activations and parameters read once, results written once."""
    activations_fwd = num_tokens * (d_in + d_out) * element  # read x, write y
    activations_bwd = num_tokens * (d_out + 2 * d_in) * element  # read grad_y and x, write dx
    if impl == "base":
        adapter, routing = 0, 0
    elif impl == "lora":
        adapter, routing = rank * (d_in + d_out) * element, 0
    else:
        adapter, routing = num_experts * rank * (d_in + d_out) * element, num_tokens * top_k * 8
    frozen = d_in * d_out * element if (layer or impl == "base") else 0
    fwd = activations_fwd + adapter + routing + frozen
    bwd = activations_bwd + 2 * adapter + routing + frozen  # read and write each adapter gradient
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    env = harness.environment(device)
    impls = [i for i in args.impls if i != "triton" or device.type == "cuda"]
    rows = []
    for name in args.shapes:
        d_in, d_out = QWEN3_4B_SHAPES[name]
        if device.type == "cpu":
            d_in, d_out = d_in // CPU_SHRINK, d_out // CPU_SHRINK
        for num_tokens in args.tokens:
            for num_experts, top_k, rank in args.configs:
                inputs = make_inputs(num_tokens, d_in, d_out, num_experts, top_k, rank, dtype, device)
                sizes = dict(T=num_tokens, E=num_experts, k=top_k, r=rank)
                for op, layer in (("lora_moe", False), ("lora_moe_layer", True)):
                    for impl, (forward, params) in implementations(inputs, 2.0, layer).items():
                        if impl not in impls:
                            continue
                        for mode, fn in harness.gradient_modes(forward, params).items():
                            if mode not in args.modes:
                                continue
                            timing = harness.time_call(fn, device, rep_ms=args.rep_ms)
                            moved = ideal_bytes(impl, mode, num_tokens, d_in, d_out, num_experts, top_k, rank,
                                                dtype.itemsize, layer)
                            rows.append(harness.row(op, impl, name, sizes, dtype, mode, timing, moved, env))
                            harness.echo(rows[-1])
                del inputs
    return rows


def summarize(rows: list[dict], copy_gbps: float) -> None:
    """Speedups of the library's fastest backend over the alternatives, per shape, size and mode."""
    index = {(r["op"], r["impl"], r["shape"], r["T"], r["E"], r["k"], r["r"], r["mode"]): r for r in rows}
    table = []
    for (op, impl, shape, tokens, experts, top_k, rank, mode), got in index.items():
        if op != "lora_moe" or impl not in ("triton", "torch"):
            continue
        if impl == "torch" and (op, "triton", shape, tokens, experts, top_k, rank, mode) in index:
            continue  # report the fastest backend measured
        key = (shape, tokens, experts, top_k, rank, mode)

        def ratio(other, key=key, mine=got):
            found = index.get(("lora_moe", other, *key))
            return found["ms_p50"] / mine["ms_p50"] if found else float("nan")

        layer = index.get(("lora_moe_layer", impl, *key))
        base = index.get(("lora_moe_layer", "base", *key))
        layer_vs_base = layer["ms_p50"] / base["ms_p50"] if layer and base else float("nan")
        table.append([shape, tokens, f"{experts}/{top_k}/{rank}", mode, impl, got["ms_p50"], ratio("naive"),
                      ratio("dense"), ratio("torch") if impl != "torch" else 1.0, layer_vs_base,
                      got["gbps"], 100 * got["gbps"] / copy_gbps])
    print(f"\nlora_moe summary (median ms; x = speedup of `impl`; layer/base = (base + delta) / base alone; "
          f"copy bandwidth {copy_gbps:.0f} GB/s)")
    harness.print_table(["shape", "T", "E/k/r", "mode", "impl", "ms", "x naive", "x dense", "x torch",
                         "layer/base", "GB/s", "% copy"], table)


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", nargs="+", choices=list(QWEN3_4B_SHAPES), default=list(QWEN3_4B_SHAPES))
    parser.add_argument("--configs", nargs="+", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=CONFIGS, help="E,k,r triples")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)


def main(argv=None) -> int:
    return harness.script_main(argv, __doc__, GPU_TOKENS, CPU_TOKENS, run, summarize, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
