"""The adapter against PEFT LoRA r=16 on the same frozen Qwen3: training step time, greedy decoding speed and
activation bytes saved for the backward per token (issue 23's figures). `python -m
sparsedoctor_kernels.bench.versus_lora` (also `sparsedoctor bench --ops versus_lora`).

The small model is issue 23's: Qwen3 with hidden 512, intermediate 1536, 4 layers, 8/4 heads of 64 (a
vocabulary of 2048, so that the LM head does not hide the adapters), random float32 weights.
Implementations, same base weights and batch: `peft` (LoRA r=16, alpha 32, the adapter's dropout, all seven
projections), `sparsedoctor` in the `router` contrastive mode (the default) and in the `paper` mode (E=8, k=2,
r=16). Steps and decodes are timed interleaved (one of each implementation in turn, so drift of a busy machine
hits all alike), on one thread on CPU. Rows:

- op `step_vs_lora`, mode = the contrastive mode (`lora` for PEFT): forward + backward + AdamW, batch 4 x 128;
- op `decode_vs_lora`, same modes: `model.generate` greedy, batch 1, 8 prompt tokens, 32 new ones; `tokens_per_s`
  is the new tokens over the median time;
- op `saved_bytes`: bytes the autograd graph keeps for the backward of one training forward, per token
  (storages counted once, the parameters' own left out; the slope between two and four sequences), in the
  `value` column in KiB; op `saved_bytes_step`: what a step keeps whatever its tokens (the intercept: weights
  cast to bfloat16 for the step, the contrastive views of at most `contrastive_tokens` tokens), in MiB.
  Measured on the small model (float32) and on one Qwen3-4B-sized decoder layer (hidden 2560, intermediate
  9728, 32/8 heads of 128) under bfloat16 autocast;
- op `launches`: kernel launches the adapter adds to one Qwen3 decoder layer in training (leaf aten ops and
  Triton kernels; the model minus the same model without adapters), modes `<contrastive mode>-fwd|bwd` (a
  one-layer model: the layer's own and the model's once-per-forward constants, such as the router term of all
  modules, as issue 23 counts) and `<contrastive mode>-fwd|bwd-each-layer` (what each further layer adds: the
  slope between one and two layers), per backend (Triton under its interpreter on CPU launches what it would
  on a GPU), E in {4, 16, 64}; and at a
  decoding step (one token, batch 1, KV cache), mode `decode`, beside the frozen decoder layer's own launches
  (`decode-frozen-layer`; issue 23: the adapter may not launch more).

The summary gives each figure as a ratio to PEFT's, next to issue 23's goals."""

from __future__ import annotations

import statistics
import time

import torch

from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.bench.step import _with_lora, build_base, make_batch, step_fn
from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor

SMALL = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             vocab_size=2048, layers=4, seq=128)
QWEN3_4B_LAYER = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, vocab_size=512, layers=1, seq=128)
BATCH = 4
PROMPT, NEW_TOKENS = 8, 32
IMPLS = ("peft", "router", "paper")
GOALS = {"step": {"router": 1.3, "paper": 1.6}, "decode": 0.8, "saved_bytes": 1.0, "launches": 16}
LAUNCH_EXPERTS = (4, 16, 64)
# The queue's size changes no launch (the InfoNCE kernel's grid, not its count); 64 slots instead of the default
# 1024 spare the interpreter most of the paper mode's time at E = 64.
LAUNCH_QUEUE_SIZE = 64
FIGURES = ("step", "decode", "saved_bytes", "launches")


def _adapter(mode: str) -> SparseDoctorConfig:
    return SparseDoctorConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, contrastive_mode=mode)


def build(impl: str, shape: dict, dtype: torch.dtype, device: torch.device):
    """(model, trainable parameters) of `impl` on a fresh base with the same seed (so the same weights)."""
    base = build_base(shape, dtype, device)
    adapter = _adapter("router" if impl == "peft" else impl)
    if impl == "peft":
        model, source = _with_lora(base, adapter.r, adapter.lora_alpha, adapter.lora_dropout)
        if source != "peft":
            raise RuntimeError("the versus_lora benchmark compares with PEFT itself: pip install peft")
    else:
        torch.manual_seed(0)
        model = apply_sparsedoctor(base, adapter)
    return model, [p for p in model.parameters() if p.requires_grad]


def _interleaved(calls: dict, reps: int) -> dict[str, list[float]]:
    """Milliseconds of each call, `reps` rounds of one call each in turn, after one warm-up round."""
    for call in calls.values():
        call()
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - began) * 1000)
    return samples


def _timing(samples: list[float]) -> harness.Timing:
    if len(samples) == 1:
        return harness.Timing(samples[0], samples[0], samples[0], float("nan"))
    p20, p50, p80 = (statistics.quantiles(samples, n=10, method="inclusive")[i] for i in (1, 4, 7))
    return harness.Timing(p20, p50, p80, float("nan"))


def decode_fn(model, vocab: int, device):
    ids = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)

    @torch.no_grad()
    def decode():
        model.eval()
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    return decode


def saved_bytes(model, batch) -> int:
    """Bytes of the tensors one training forward keeps for its backward: every saved tensor's storage once,
    the parameters' own storages (frozen weights saved by a matmul) left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(storages.values())


def saved_bytes_per_token(model, vocab: int, sequence: int, device) -> tuple[float, float]:
    """(bytes per token, bytes per step whatever its tokens): the slope and intercept between two and four
    sequences of `sequence` tokens. The per-step part holds what a step keeps once (weights cast to bfloat16
    for the step, the contrastive views of at most `contrastive_tokens` tokens)."""
    two, four = (saved_bytes(model, make_batch(n, sequence, vocab, device)) for n in (2, 4))
    per_token = (four - two) / (2 * sequence)
    return per_token, two - per_token * 2 * sequence


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = harness.environment(device)
    rows = []
    try:
        shape = dict(SMALL, layers=args.layers or SMALL["layers"])
        label = f"L={shape['layers']},h={shape['hidden_size']},seq={shape['seq']},threads={torch.get_num_threads()}"
        built = {impl: build(impl, shape, dtype, device) for impl in args.impls}
        batch = make_batch(BATCH, shape["seq"], shape["vocab_size"], device)
        sizes = dict(T=batch["input_ids"].numel(), E=8, k=2, r=16)
        if "step" in args.figures:
            steps = {impl: step_fn(model, params, batch, dtype, device) for impl, (model, params) in built.items()}
            for impl, samples in _interleaved(steps, args.reps).items():
                rows.append(_echo(_row("step_vs_lora", impl, label, sizes, dtype, _timing(samples), env,
                                 sizes["T"] / (statistics.median(samples) / 1000))))
        if "decode" in args.figures:
            decodes = {impl: decode_fn(model, shape["vocab_size"], device) for impl, (model, _) in built.items()}
            for impl, samples in _interleaved(decodes, args.reps).items():
                rows.append(_echo(_row("decode_vs_lora", impl, label, dict(sizes, T=1), dtype, _timing(samples), env,
                                 NEW_TOKENS / (statistics.median(samples) / 1000))))
        if "saved_bytes" in args.figures:
            rows += _saved_rows(args.impls, "small", shape, built, dtype, device, env, sizes)
            large = dict(QWEN3_4B_LAYER)
            for impl in args.impls:
                built_large = {impl: build(impl, large, torch.bfloat16, device)}
                rows += _saved_rows([impl], "qwen3-4b-layer", large, built_large, torch.bfloat16, device, env,
                                    dict(sizes, T=large["seq"]))
                del built_large
        if "launches" in args.figures:
            rows += _launch_rows(env)
    finally:
        torch.set_num_threads(threads)
    return rows


def _saved_rows(impls, case: str, shape: dict, built: dict, dtype, device, env, sizes) -> list[dict]:
    rows = []
    nothing = harness.Timing(float("nan"), float("nan"), float("nan"), float("nan"))
    for impl in impls:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            per_token, per_step = saved_bytes_per_token(built[impl][0], shape["vocab_size"], shape["seq"], device)
        label = f"{case},L={shape['layers']},h={shape['hidden_size']}"
        for op, value, unit in (("saved_bytes", per_token / 1024, "KiB/token"),
                                ("saved_bytes_step", per_step / 2**20, "MiB/step")):
            row = _row(op, impl, label, sizes, dtype, nothing, env, "")
            row["value"], row["unit"] = round(value, 2), unit
            rows.append(_echo(row))
    return rows


def _launch_rows(env) -> list[dict]:
    """Launches the adapter adds to one Qwen3 decoder layer in training, forward and backward, per backend
    (Triton under its interpreter on CPU: the same launches as on a GPU), contrastive mode and E."""
    from sparsedoctor_kernels._backend import why_backend_cannot_run
    from sparsedoctor_kernels.bench.layer_launches import decode_layer_launches, each_layer_and_per_forward_launches

    rows = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = [b for b in ("triton", "torch") if why_backend_cannot_run(b, device) is None]
    for backend in backends:
        for mode in ("router", "paper"):
            for experts in LAUNCH_EXPERTS:
                each, once = each_layer_and_per_forward_launches(experts, contrastive_mode=mode, backend=backend,
                                                                 queue_size=LAUNCH_QUEUE_SIZE)
                for direction, each_layer, per_forward in zip(("fwd", "bwd"), each, once):
                    rows += [_launch_row(backend, experts, f"{mode}-{direction}", each_layer + per_forward, env),
                             _launch_row(backend, experts, f"{mode}-{direction}-each-layer", each_layer, env)]
        for experts in LAUNCH_EXPERTS:  # a decoding step: the adapter's launches and the frozen layer's own
            adapter, frozen_layer = decode_layer_launches(experts, backend=backend)
            rows += [_launch_row(backend, experts, "decode", adapter, env),
                     _launch_row(backend, experts, "decode-frozen-layer", frozen_layer, env)]
    return rows


def _launch_row(backend: str, experts: int, mode: str, count: int, env) -> dict:
    nothing = harness.Timing(float("nan"), float("nan"), float("nan"), float("nan"))
    row = harness.row("launches", backend, "qwen3-decoder-layer", dict(E=experts, k=2, r=16), torch.float32, mode,
                      nothing, 0, env)
    row["gbps"], row["value"], row["unit"] = "", count, "launches/layer"
    return _echo(row)


def _echo(row: dict) -> dict:
    harness.echo(row)  # printed as measured, and written even if the run is stopped
    return row


def _row(op, impl, shape, sizes, dtype, timing, env, tokens_per_s) -> dict:
    mode = "lora" if impl == "peft" else impl
    row = harness.row(op, "peft" if impl == "peft" else "sparsedoctor", shape, sizes, dtype, mode, timing, 0, env)
    row["gbps"] = ""
    row["tokens_per_s"] = round(tokens_per_s, 1) if tokens_per_s != "" else ""
    return row


ROW_OPS = ("step_vs_lora", "decode_vs_lora", "saved_bytes", "saved_bytes_step", "launches")


def ratios(rows: list[dict]) -> list[list]:
    """[figure, shape, mode, ours / PEFT's, goal or None, "<=" / ">=" / ""] for every figure PEFT also has."""
    by_key = {(r["op"], r["shape"], r["mode"]): r for r in rows if r["op"] in ROW_OPS and r["op"] != "launches"}
    table = []
    for (op, shape, mode), row in by_key.items():
        peft = by_key.get((op, shape, "lora"))
        if peft is None or mode == "lora":
            continue
        if op == "step_vs_lora":
            ratio, goal, better = float(row["ms_p50"]) / float(peft["ms_p50"]), GOALS["step"][mode], "<="
        elif op == "decode_vs_lora":
            ratio, goal, better = float(row["tokens_per_s"]) / float(peft["tokens_per_s"]), GOALS["decode"], ">="
        elif op == "saved_bytes":
            ratio, goal, better = float(row["value"]) / float(peft["value"]), GOALS["saved_bytes"], "<="
        else:
            ratio, goal, better = float(row["value"]) / float(peft["value"]), None, ""
        table.append([op, shape, mode, ratio, goal, better])
    return table


def summarize(rows: list[dict], copy_gbps: float) -> None:
    """Each figure as a ratio to PEFT's, beside its goal (issue 23)."""
    table = [[op, shape, mode, ratio, f"{better} {goal}" if goal is not None else "-"]
             for op, shape, mode, ratio, goal, better in ratios(rows)]
    print("\nagainst PEFT LoRA r16 (step: time / PEFT's; decode: tokens/s / PEFT's; saved_bytes: bytes / PEFT's)")
    harness.print_table(["figure", "shape", "mode", "x PEFT", "goal"], table)
    launches = [r for r in rows if r["op"] == "launches"]
    if launches:
        print(f"\nadapter launches per Qwen3 decoder layer (training goal: <= {GOALS['launches']}, flat in E; "
              "decode: no more than the frozen layer's own)")
        modes = sorted({r["mode"] for r in launches})
        cells = {(r["impl"], r["mode"], r["E"]): r["value"] for r in launches}
        harness.print_table(["backend", "E"] + modes,
                            [[impl, experts] + [cells.get((impl, mode, experts), "") for mode in modes]
                             for impl in dict.fromkeys(r["impl"] for r in launches)
                             for experts in LAUNCH_EXPERTS])


def add_arguments(parser) -> None:
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=list(FIGURES))
    parser.add_argument("--reps", type=int, default=5, help="timed rounds of each implementation")
    parser.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {SMALL['layers']})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as issue 23 measured)")


def main(argv=None) -> int:
    import importlib.util
    import os
    import sys

    if importlib.util.find_spec("peft") is None:
        print("versus_lora: PEFT is the baseline and is not installed: pip install peft (or the `bench` extra)",
              file=sys.stderr)
        return 1
    # The Triton launch counts run the kernels under the interpreter on CPU; set before Triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    return harness.script_main(argv, __doc__, [], [], run, summarize, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
