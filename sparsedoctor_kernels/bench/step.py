"""End-to-end training step: forward + backward + optimizer step of a Qwen3-4B-shaped model (random weights,
the number of decoder layers configurable so that it fits), tokens per second and peak memory.

Implementations, same data and seeds:
- `base`: the frozen base model alone (backward through the activations, nothing to update);
- `lora`: plain LoRA r=16 on the seven projections (PEFT's when installed, else `baselines.LoraLinear`);
- `naive`: the SparseDoctor model with per-expert loops, a materialised InfoNCE and the MoCo-style enqueue;
- `dense`: the SparseDoctor model with dense-masked experts;
- `sparsedoctor`: the SparseDoctor model on the fused ops.
Rows: op `step`, mode `full`, T = tokens per step, shape `L=<layers>,seq=<length>`, and `tokens_per_s`.

    python benchmarks/bench_step.py                  # GPU: 4,096 tokens a step at sequence length 2048
    python benchmarks/bench_step.py --largest-batch   # also the largest batch that fits, per implementation
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.model import LoraMoELinear, SparseDoctorConfig, apply_sparsedoctor
from sparsedoctor_kernels.testing import baselines

IMPLS = ["base", "lora", "naive", "dense", "sparsedoctor"]
MIN_STEPS = 10  # timed steps at least, whatever the time budget
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_SHAPE = dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=151936, layers=4, seq=2048, tokens=4096)
CPU_SHAPE = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=32, vocab_size=1000, layers=2, seq=64, tokens=256)


class NaiveLoraMoELinear(LoraMoELinear):
    """SparseDoctor written the way people do today: softmax + topk, a Python loop over experts with host
    syncs, the InfoNCE over the whole [N, E*Q] score matrix and a per-expert MoCo enqueue."""

    fused_inference = False  # its own routing and experts, in inference too
    groups_siblings = False  # and each projection alone, in training too

    def _route(self, router_logits, token_mask):
        return sdk.Routing(*baselines.naive_routing(router_logits, self.config.top_k, token_mask=token_mask))

    def _experts(self, x, lora_a, lora_b, weights, experts, out=None):
        return baselines.naive_lora_moe(x, lora_a, lora_b, weights, experts, self.config.scaling, out=out)

    _experts_and_views = LoraMoELinear._experts_then_views  # the views as a second call, as people write them

    def _contrastive_rows(self, query, positive, query_experts):
        return baselines.naive_infonce(query, positive, self.queue.keys, self.queue.size, query_experts,
                                       self.config.temperature, reduction="none")

    def _enqueue(self, keys, experts, gather):
        baselines.moco_enqueue(self.queue.keys, self.queue.ptr, self.queue.size, keys, experts)


class DenseLoraMoELinear(NaiveLoraMoELinear):
    """Every expert on every token as one rank E*r LoRA with a gate mask (the fused InfoNCE and queue kept,
    so the difference is the expert computation)."""

    def _experts(self, x, lora_a, lora_b, weights, experts, out=None):
        return baselines.dense_lora_moe(x, lora_a, lora_b, weights, experts, self.config.scaling, out=out)

    _contrastive_rows = LoraMoELinear._contrastive_rows
    _enqueue = LoraMoELinear._enqueue


def build_base(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                         num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"],
                         vocab_size=shape["vocab_size"], num_hidden_layers=shape["layers"],
                         max_position_embeddings=max(4096, shape["seq"]), attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    return model.to(dtype).requires_grad_(False)


def _with_lora(base, rank: int, alpha: float, dropout: float):
    try:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS),
                                               lora_dropout=dropout)), "peft"
    except ImportError:
        for name, module in list(base.named_modules()):
            if name.rsplit(".", 1)[-1] in TARGETS and isinstance(module, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                lora = baselines.LoraLinear(module, rank, alpha, dropout)
                lora.lora_A.float(), lora.lora_B.float()
                setattr(base.get_submodule(parent), child, lora)
        return base, "own"


def build_model(impl: str, base, adapter: SparseDoctorConfig):
    """The model for `impl` around a private copy of `base`, and the parameters its optimizer updates."""
    base = copy.deepcopy(base)
    if impl == "base":
        model = base
        model.get_input_embeddings().weight.requires_grad_(False)
        model.enable_input_require_grads()  # backward through the activations, as any adapter needs
        return model, []
    if impl == "lora":
        model, _ = _with_lora(base, adapter.r, adapter.lora_alpha, adapter.lora_dropout)
    else:
        torch.manual_seed(0)
        model = apply_sparsedoctor(base, adapter)
        swap = {"naive": NaiveLoraMoELinear, "dense": DenseLoraMoELinear}.get(impl)
        if swap is not None:
            for module in model.adapted_modules().values():
                module.__class__ = swap  # same parameters and buffers, other ops
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def make_batch(batch_size: int, seq: int, vocab: int, device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=gen).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step_fn(model, params, batch, dtype, device):
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(**batch)
        loss = out.loss if out.loss is not None else F.cross_entropy(out.logits.flatten(0, 1).float(),
                                                                      batch["labels"].flatten())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _mode(adapter: SparseDoctorConfig) -> str:
    """The rows' mode: `full` (forward + backward + optimizer) for the paper mode's term, `full-router` for
    the router mode's, so the two runs keep separate rows in the results CSV."""
    return "full" if adapter.contrastive_mode == "paper" else f"full-{adapter.contrastive_mode}"


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = harness.DTYPES[args.dtype]
    env = harness.environment(device)
    shape = dict(GPU_SHAPE if device.type == "cuda" else CPU_SHAPE)
    if args.layers:
        shape["layers"] = args.layers
    # The default dropout too. The paper mode by default: its term runs all four fused ops (the views, the
    # InfoNCE over the queue, the enqueue), which the alternatives replace; `--contrastive-mode router` times
    # the library's default term (eager glue, the same in every implementation).
    adapter = SparseDoctorConfig(num_experts=8, top_k=2, r=16, lora_alpha=32,
                                 contrastive_mode=getattr(args, "contrastive_mode", "paper"))
    base = build_base(shape, dtype, device)
    rows = []
    for tokens in args.tokens or [shape["tokens"]]:
        seq = min(shape["seq"], tokens)
        batch = make_batch(max(1, tokens // seq), seq, shape["vocab_size"], device)
        for impl in args.impls:
            model, params = build_model(impl, base, adapter)
            try:
                timing = harness.time_call(step_fn(model, params, batch, dtype, device), device, rep_ms=args.rep_ms,
                                           min_reps=MIN_STEPS)
            except torch.cuda.OutOfMemoryError:
                print(f"# {impl}: out of memory at {tokens} tokens a step", flush=True)
                continue
            finally:
                del model, params
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            sizes = dict(T=batch["input_ids"].numel(), E=adapter.num_experts, k=adapter.top_k, r=adapter.r)
            row = harness.row("step", impl, f"L={shape['layers']},seq={seq}", sizes, dtype, _mode(adapter), timing,
                              0, env)
            row["gbps"] = ""
            row["tokens_per_s"] = round(sizes["T"] / (timing.ms_p50 / 1000), 1)
            rows.append(row)
            harness.echo(row)
    if args.largest_batch and device.type == "cuda":
        rows += _largest_batches(args, base, adapter, shape, dtype, device, env)
    return rows


def _largest_batches(args, base, adapter, shape, dtype, device, env) -> list[dict]:
    """Per implementation, double the batch until a step runs out of memory; time the largest that fit."""
    rows = []
    for impl in args.impls:
        model, params = build_model(impl, base, adapter)
        batch_size, best = 1, None
        while batch_size <= 256:
            batch = make_batch(batch_size, shape["seq"], shape["vocab_size"], device)
            try:
                step = step_fn(model, params, batch, dtype, device)
                step()
                torch.cuda.synchronize()
                best = batch_size
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                torch.cuda.empty_cache()
            batch_size *= 2
        if best is not None:
            batch = make_batch(best, shape["seq"], shape["vocab_size"], device)
            timing = harness.time_call(step_fn(model, params, batch, dtype, device), device, rep_ms=args.rep_ms,
                                       min_reps=MIN_STEPS)
            sizes = dict(T=batch["input_ids"].numel(), E=adapter.num_experts, k=adapter.top_k, r=adapter.r)
            row = harness.row("step", impl, f"L={shape['layers']},seq={shape['seq']},largest", sizes, dtype,
                              _mode(adapter), timing, 0, env)
            row["gbps"], row["tokens_per_s"] = "", round(sizes["T"] / (timing.ms_p50 / 1000), 1)
            rows.append(row)
            harness.echo(row)
        del model, params
        torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict], copy_gbps: float) -> None:
    """Per size: each step's time and speed, against naive and plain LoRA, and the adapter's own cost (the step
    minus the frozen model's, which is the same for every implementation, LM head included)."""
    by_shape: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_shape.setdefault(f"{row['shape']},T={row['T']}", {})[row["impl"]] = row
    table = []
    for shape, impls in by_shape.items():
        naive, lora, base = impls.get("naive"), impls.get("lora"), impls.get("base")
        lora_adapter = lora["ms_p50"] - base["ms_p50"] if lora and base else math.nan
        for impl, row in impls.items():
            speed = row["tokens_per_s"]
            adapter = row["ms_p50"] - base["ms_p50"] if base and impl != "base" else math.nan
            table.append([shape, impl, row["ms_p50"], speed,
                          speed / naive["tokens_per_s"] if naive else math.nan,
                          row["ms_p50"] / lora["ms_p50"] if lora else math.nan, adapter,
                          adapter / lora_adapter if lora_adapter and lora_adapter > 0 else math.nan,
                          row["peak_mem_mb"]])
    print("\ntraining step summary (median ms per step; adapter ms = step - frozen model's step)")
    harness.print_table(["size", "impl", "ms", "tokens/s", "x naive tokens/s", "time / lora", "adapter ms",
                         "adapter / lora's", "peak MB"], table)


def add_arguments(parser) -> None:
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: 4 on GPU, 2 on CPU)")
    parser.add_argument("--largest-batch", action="store_true", help="GPU: also the largest batch that fits")
    parser.add_argument("--contrastive-mode", choices=["paper", "router"], default="paper",
                        help="the adapter's contrastive term (default: paper, which runs all four fused ops)")


def main(argv=None) -> int:
    return harness.script_main(argv, __doc__, [], [], run, summarize, add_arguments)
