"""Benchmark `lora_moe` against the strongest alternatives people write, at Qwen3-4B projection shapes.

Two ops are reported:
- `lora_moe`: the adapter delta alone. impl `triton` is this library's kernels with the strategy the cost
  model picks per call, `triton-grouped` / `triton-dense` each strategy forced, `torch` the reference; the
  baselines (`sparsedoctor_kernels.testing.baselines`) are `naive` (per-expert loop, in-place `index_add_`),
  `dense` (every expert as one rank E*r LoRA, gates on the small h, one `addmm_`), `compiled`
  (`torch.compile` of `dense`), `lora` (one plain LoRA of rank r) and `base` (the frozen linear alone);
- `lora_moe_layer`: the adapted layer, base linear + delta, every impl adding the delta into the base output
  in place (`out=`), so `triton` / `base` is the adapter's cost on top of the frozen layer.
Routing is `uniform` (random logits) or `zipf` (expert e favoured in proportion to 1/(e+1)); the shape column
carries `+zipf` for the latter. Before anything is timed, every implementation's forward is checked against
the reference at the benchmark shape. Modes: `fwd`, `bwd` (backward over a retained graph: dx, dA, dB,
dweights; the base weight is frozen), `full`, and on CUDA `fwd+graph` / `full+graph` (replayed from a CUDA
graph: the host's launch overhead removed; implementations that sync with the host cannot be captured).
GB/s divides the bytes the implementation's own model moves (`sparsedoctor_kernels.cost` for the grouped and
dense designs) by the median time.

    python benchmarks/bench_lora_moe.py                      # GPU: the issue's grid; CPU: small torch-only grid
    python benchmarks/bench_lora_moe.py --shapes gate_proj --tokens 8192 --configs 8,2,16
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.cost import choose_strategy, lora_moe_cost
from sparsedoctor_kernels.testing import baselines
from sparsedoctor_kernels.testing.tolerances import TOLERANCES

# Qwen3-4B: hidden 2560, intermediate 9728, 32 query heads and 8 key/value heads of 128.
QWEN3_4B_SHAPES = {"q_proj": (2560, 4096), "k_proj": (2560, 1024), "v_proj": (2560, 1024), "o_proj": (4096, 2560),
                   "gate_proj": (2560, 9728), "up_proj": (2560, 9728), "down_proj": (9728, 2560)}
CONFIGS = [(8, 2, 16), (64, 4, 8)]  # (E, k, r)
GPU_TOKENS = [2048, 8192, 16384]
CPU_TOKENS = [256]
CPU_SHRINK = 16  # on CPU every projection size is divided by this, so the grid runs in about a minute
IMPLS = ["triton", "triton-grouped", "triton-dense", "torch", "naive", "dense", "compiled", "lora", "base"]
GPU_ONLY = {"triton", "triton-grouped", "triton-dense", "compiled"}  # compiled: inductor on CPU takes minutes
ROUTINGS = ["uniform", "zipf"]


def routing_logits(num_tokens, num_experts, routing, gen, device):
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    if routing == "zipf":  # p(e) grows like 1/(e+1) before the softmax's noise: a few experts get most tokens
        logits = logits + 2.0 * -torch.log(torch.arange(1, num_experts + 1, device=device, dtype=torch.float32))
    return logits


def make_inputs(num_tokens, d_in, d_out, num_experts, top_k, rank, dtype, device, seed=0, routing="uniform"):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype).requires_grad_(grad)

    routed = sdk.route(routing_logits(num_tokens, num_experts, routing, gen, device), top_k)
    return dict(
        x=randn(num_tokens, d_in),
        lora_a=randn(num_experts, rank, d_in, scale=d_in**-0.5), lora_b=randn(num_experts, d_out, rank, scale=0.02),
        weights=routed.weights.detach().requires_grad_(), experts=routed.experts,
        single_a=randn(rank, d_in, scale=d_in**-0.5), single_b=randn(d_out, rank, scale=0.02),
        base_weight=randn(d_out, d_in, scale=d_in**-0.5, grad=False),
    )


def implementations(inputs, scaling, layer: bool):
    """impl -> (forward callable, tensors it differentiates w.r.t.)."""
    x, a, b, w, e = (inputs[n] for n in ("x", "lora_a", "lora_b", "weights", "experts"))
    moe_params = [x, a, b, w]

    def base():
        return F.linear(x, inputs["base_weight"])

    def adapter(delta_fn):
        """delta_fn(out) adds into `out` when given; the layer op passes the base output."""
        return (lambda: delta_fn(base())) if layer else (lambda: delta_fn(None))

    def library(backend, strategy=None):
        return adapter(lambda out: sdk.lora_moe(x, a, b, w, e, scaling=scaling, out=out, backend=backend,
                                                validate=False, strategy=strategy))

    def plain_lora(out):
        delta = baselines.lora_linear(x, inputs["single_a"], inputs["single_b"], scaling)
        return delta if out is None else out.add_(delta)

    return {
        "triton": (library("triton"), moe_params),
        "triton-grouped": (library("triton", "grouped"), moe_params),
        "triton-dense": (library("triton", "dense"), moe_params),
        "torch": (library("torch"), moe_params),
        "naive": (adapter(lambda out: baselines.naive_lora_moe(x, a, b, w, e, scaling, out=out)), moe_params),
        "dense": (adapter(lambda out: baselines.dense_lora_moe(x, a, b, w, e, scaling, out=out)), moe_params),
        "compiled": (adapter(lambda out: baselines.compiled_dense_lora_moe(x, a, b, w, e, scaling, out=out)),
                     moe_params),
        "lora": (adapter(plain_lora), [x, inputs["single_a"], inputs["single_b"]]),
        "base": (base, [x]),
    }


def design_of(impl: str, sizes: tuple, dtype: torch.dtype, device: torch.device) -> str | None:
    """Which byte model an implementation follows: the grouped or the dense design (None: lora, base)."""
    if impl == "triton":
        return choose_strategy(*sizes, dtype, device)
    if impl in ("triton-grouped", "torch", "naive"):
        return "grouped"
    if impl in ("triton-dense", "dense", "compiled"):
        return "dense"
    return None


def ideal_bytes(impl, mode, num_tokens, d_in, d_out, num_experts, top_k, rank, element, layer, design=None) -> int:
    """Bytes the implementation's design moves (`sparsedoctor_kernels.cost`), plus the frozen layer's for the
    layer op; for `lora` and `base` the activations and parameters read once, outputs written once."""
    mode = mode.removesuffix("+graph")
    frozen = d_in * d_out * element if (layer or impl == "base") else 0
    if design is not None:
        cost = lora_moe_cost(design, num_tokens, d_in, d_out, num_experts, top_k, rank, element)
        return cost.bytes(mode) + frozen * (2 if mode == "full" else 1)
    activations_fwd = num_tokens * (d_in + d_out) * element  # read x, write y
    activations_bwd = num_tokens * (d_out + 2 * d_in) * element  # read grad_y and x, write dx
    adapter = rank * (d_in + d_out) * element if impl == "lora" else 0
    fwd = activations_fwd + adapter + frozen
    bwd = activations_bwd + 2 * adapter + frozen  # read and write each adapter gradient
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def check_outputs(impls: dict, reference: torch.Tensor, dtype: torch.dtype, label: str) -> None:
    """Every implementation computes the reference's function at the benchmark shape, or nothing is timed."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    for impl, (forward, _) in impls.items():
        if impl in ("lora", "base"):
            continue
        with torch.no_grad():
            got = forward().float()
        if not torch.allclose(got, reference, atol=atol * scale, rtol=rtol):
            error = float((got - reference).abs().max())
            raise AssertionError(f"{label}: impl {impl} differs from the reference by {error:.3g} "
                                 f"(tolerance {atol * scale:.3g}): not timing a wrong result")


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    env = harness.environment(device)
    impls = [i for i in args.impls if i not in GPU_ONLY or device.type == "cuda"]
    modes = args.modes + (harness.GRAPH_MODES if device.type == "cuda" and not args.no_graphs else [])
    rows = []
    for name in args.shapes:
        d_in, d_out = QWEN3_4B_SHAPES[name]
        if device.type == "cpu":
            d_in, d_out = d_in // CPU_SHRINK, d_out // CPU_SHRINK
        for routing in args.routings:
            shape = name if routing == "uniform" else f"{name}+{routing}"
            for num_tokens in args.tokens:
                for num_experts, top_k, rank in args.configs:
                    rows += _measure(shape, num_tokens, d_in, d_out, (num_experts, top_k, rank), routing, impls,
                                     modes, dtype, device, env, args.rep_ms)
    return rows


def _measure(shape, num_tokens, d_in, d_out, config, routing, impls, modes, dtype, device, env, rep_ms):
    num_experts, top_k, rank = config
    inputs = make_inputs(num_tokens, d_in, d_out, num_experts, top_k, rank, dtype, device, routing=routing)
    sizes = dict(T=num_tokens, E=num_experts, k=top_k, r=rank)
    model_sizes = (num_tokens, d_in, d_out, num_experts, top_k, rank)
    rows = []
    for op, layer in (("lora_moe", False), ("lora_moe_layer", True)):
        chosen = {k: v for k, v in implementations(inputs, 2.0, layer).items() if k in impls}
        reference = implementations(inputs, 2.0, layer)["torch"][0]
        with torch.no_grad():
            check_outputs(chosen, reference().float(), dtype, f"{op} {shape} T={num_tokens} E/k/r={config}")
        for impl, (forward, params) in chosen.items():
            timed = harness.gradient_modes(forward, params)
            for mode in modes:
                fn = timed[mode.removesuffix("+graph")]
                if mode.endswith("+graph"):
                    fn = harness.graph_replay(fn, device)
                    if isinstance(fn, str):
                        print(f"# {op} {impl} {mode}: not captured ({fn})", flush=True)
                        continue
                timing = harness.time_call(fn, device, rep_ms=rep_ms)
                design = design_of(impl, model_sizes, dtype, device)
                moved = ideal_bytes(impl, mode, num_tokens, d_in, d_out, num_experts, top_k, rank, dtype.itemsize,
                                    layer, design)
                rows.append(harness.row(op, impl, shape, sizes, dtype, mode, timing, moved, env))
                harness.echo(rows[-1])
    return rows


def summarize(rows: list[dict], copy_gbps: float) -> None:
    """Per shape, size and mode: the library's best against every baseline, the layer's cost over the frozen
    layer, and the achieved fraction of the measured copy bandwidth."""
    index = {(r["op"], r["impl"], r["shape"], r["T"], r["E"], r["k"], r["r"], r["mode"]): r for r in rows}
    library = ("triton", "torch")
    table = []
    for (op, impl, *key), got in index.items():
        if op != "lora_moe" or impl not in library:
            continue
        if impl == "torch" and ("lora_moe", "triton", *key) in index:
            continue  # report the kernels when they were measured
        key = tuple(key)

        def ratio(other, key=key, mine=got):
            found = index.get(("lora_moe", other, *key))
            return found["ms_p50"] / mine["ms_p50"] if found else math.nan

        layer = index.get(("lora_moe_layer", impl, *key))
        base = index.get(("lora_moe_layer", "base", *key))
        layer_vs_base = layer["ms_p50"] / base["ms_p50"] if layer and base else math.nan
        best_baseline = min((ratio(b) for b in ("naive", "dense", "compiled") if not math.isnan(ratio(b))),
                            default=math.nan)
        shape, tokens, experts, top_k, rank, mode = key
        table.append([shape, tokens, f"{experts}/{top_k}/{rank}", mode, impl, got["ms_p50"], ratio("naive"),
                      ratio("dense"), ratio("compiled"), best_baseline, layer_vs_base, got["gbps"],
                      100 * got["gbps"] / copy_gbps])
    print(f"\nlora_moe summary (median ms; x = speedup of `impl` over each baseline, `x best` over the fastest; "
          f"layer/base = (base + delta) / base alone; copy bandwidth {copy_gbps:.0f} GB/s)")
    harness.print_table(["shape", "T", "E/k/r", "mode", "impl", "ms", "x naive", "x dense", "x compiled", "x best",
                         "layer/base", "GB/s", "% copy"], table)


def add_arguments(parser) -> None:
    parser.add_argument("--shapes", nargs="+", choices=list(QWEN3_4B_SHAPES), default=list(QWEN3_4B_SHAPES))
    parser.add_argument("--configs", nargs="+", type=lambda s: tuple(int(v) for v in s.split(",")),
                        default=CONFIGS, help="E,k,r triples")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
    parser.add_argument("--routings", nargs="+", choices=ROUTINGS,
                        default=ROUTINGS if torch.cuda.is_available() else ["uniform"])
    parser.add_argument("--no-graphs", action="store_true", help="CUDA: skip the CUDA-graph replay modes")


def main(argv=None) -> int:
    return harness.script_main(argv, __doc__, GPU_TOKENS, CPU_TOKENS, run, summarize, add_arguments)


if __name__ == "__main__":
    sys.exit(main())
