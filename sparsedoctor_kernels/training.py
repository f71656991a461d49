"""The training loop behind `sparsedoctor train` and `sparsedoctor demo`.

A SparseDoctor adapter on a frozen causal LM (a local Hugging Face directory, or `tiny`: a small random Qwen3
with a BPE tokenizer trained on the data), AdamW on the adapter only, warmup + cosine learning rate, optional
bf16 autocast, gradient checkpointing and DDP (under `torchrun`). Writes into the output directory:
`metrics.jsonl` (one line a step), `loss.png` and `expert_load.png`, `checkpoint-<step>/` (adapter + optimizer
state, for `--resume`), and finally `adapter/` and `tokenizer/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sparsedoctor_kernels.data import build_tokenizer, corpus, demo_records, format_example, load_jsonl
from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor, load_adapter, save_adapter

RUN_FILE = "run_config.json"
STATE_TENSORS = "trainer_state.safetensors"  # optimizer moments and the RNG state: no pickle anywhere
STATE_JSON = "trainer_state.json"


@dataclass
class TrainSettings:
    output_dir: str = "sparsedoctor-run"
    model: str = "tiny"  # "tiny" or a local Hugging Face model directory
    data: list[str] = field(default_factory=list)  # JSONL files; empty: the bundled demo set
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 5e-3
    warmup_steps: int = 10
    max_length: int = 96
    seed: int = 0
    device: str | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_every: int = 50
    resume: bool = False
    progress: bool = True
    tiny_vocab_size: int = 1500
    adapter: SparseDoctorConfig = field(default_factory=SparseDoctorConfig)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["adapter"] = self.adapter.to_dict()
        return data


@dataclass
class TrainResult:
    output_dir: pathlib.Path
    history: list[dict]
    expert_load: dict[str, list[float]]  # layer -> fraction of routed pairs per expert (summed over modules)
    model: torch.nn.Module
    tokenizer: object


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def load_base(settings: TrainSettings, records: list[dict]):
    """(base model, tokenizer) for `settings.model`."""
    if settings.model == "tiny":
        from sparsedoctor_kernels.model.tiny import tiny_qwen3

        tokenizer = build_tokenizer(corpus(records), vocab_size=settings.tiny_vocab_size)
        return tiny_qwen3(vocab_size=len(tokenizer), seed=settings.seed), tokenizer
    path = pathlib.Path(settings.model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model must be 'tiny' or a local Hugging Face model directory; {path} is not one")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer


def encode(records: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record; labels are -100 on the prompt, so only the response is learnt."""
    examples = []
    for record in records:
        prompt, response = format_example(record)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
        examples.append((ids, labels))
    return examples


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batches(num_examples: int, batch_size: int, seed: int, rank: int, world: int):
    """Endless shuffled batches of example indices; each rank takes its own share of every global batch."""
    epoch = 0
    while True:
        order = list(range(num_examples))
        random.Random(seed + epoch).shuffle(order)
        global_batch = batch_size * world
        for start in range(0, num_examples - global_batch + 1, global_batch):
            yield order[start + rank * batch_size: start + (rank + 1) * batch_size]
        epoch += 1


def _layer_of(module_name: str) -> str:
    parts = module_name.split(".")
    return f"layer {parts[parts.index('layers') + 1]}" if "layers" in parts else module_name


def _save_checkpoint(model, optimizer, step: int, directory: pathlib.Path) -> None:
    from safetensors.torch import save_file

    save_adapter(model, directory / "adapter")
    optimizer_state = optimizer.state_dict()
    tensors = {"torch_rng": torch.get_rng_state()}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, directory / STATE_TENSORS)
    (directory / STATE_JSON).write_text(json.dumps({"step": step, "param_groups": optimizer_state["param_groups"]}))
    (directory.parent / "latest").write_text(directory.name + "\n")


def _resume(model, optimizer, output_dir: pathlib.Path) -> int:
    from safetensors.torch import load_file

    latest = output_dir / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {output_dir} (no 'latest' file)")
    directory = output_dir / latest.read_text().strip()
    load_adapter(model, directory / "adapter")
    tensors = load_file(directory / STATE_TENSORS)
    saved = json.loads((directory / STATE_JSON).read_text())
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    device = next(p for p in model.parameters() if p.requires_grad).device
    optimizer.load_state_dict({"state": {i: {k: v.to(device) if k != "step" else v for k, v in entry.items()}
                                         for i, entry in state.items()},
                               "param_groups": saved["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    return int(saved["step"])


def train(settings: TrainSettings, *, log=print) -> TrainResult:
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _maybe_init_distributed(device)
    rank, world = _rank_and_world()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    output_dir = pathlib.Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)

    records = [r for path in settings.data for r in load_jsonl(path)] if settings.data else demo_records()
    base, tokenizer = load_base(settings, records)
    examples = encode(records, tokenizer, settings.max_length)
    if len(examples) < settings.batch_size * world:
        raise ValueError(f"{len(examples)} examples cannot fill one batch of {settings.batch_size} x {world} ranks")
    torch.manual_seed(settings.seed)  # the adapter's initialisation, identical on every rank
    model = apply_sparsedoctor(base, settings.adapter).to(device)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    start = _resume(model, optimizer, output_dir) if settings.resume else 0
    if rank == 0:
        (output_dir / RUN_FILE).write_text(json.dumps(settings.to_dict(), indent=2, ensure_ascii=False) + "\n")
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)

    batches = _batches(len(examples), settings.batch_size, settings.seed, rank, world)
    for _ in range(start):  # the same data order as an uninterrupted run
        next(batches)
    history, load_totals = [], {}
    metrics = (output_dir / "metrics.jsonl").open("a" if settings.resume else "w") if rank == 0 else None
    progress = _progress(range(start, settings.steps), enabled=settings.progress and rank == 0)
    model.train()
    for step in progress:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in next(batches)],
                                                     tokenizer.pad_token_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
            out = trained(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": float(out.loss.detach()),
               **{k: float(v.detach()) for k, v in out.aux_losses.items()},
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - began, 4)}
        history.append(row)
        for name, counts in model.expert_load().items():
            layer = _layer_of(name)
            load_totals[layer] = load_totals.get(layer, 0) + counts.double().cpu()
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if hasattr(progress, "set_postfix"):
            progress.set_postfix(lm=f"{row['lm']:.3f}", bal=f"{row['balance']:.3f}", con=f"{row['contrastive']:.3f}")
        if settings.save_every and (step + 1) % settings.save_every == 0 and rank == 0:
            _save_checkpoint(model, optimizer, step + 1, output_dir / f"checkpoint-{step + 1}")
    if metrics is not None:
        metrics.close()

    expert_load = {layer: (total / total.sum()).tolist() for layer, total in sorted(load_totals.items())}
    if rank == 0:
        save_adapter(model, output_dir / "adapter")
        tokenizer.save_pretrained(output_dir / "tokenizer")
        from sparsedoctor_kernels.plots import plot_expert_load, plot_losses

        full_history = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        plot_losses(full_history, output_dir / "loss.png")
        if expert_load:
            plot_expert_load(expert_load, output_dir / "expert_load.png")
        log(f"adapter, tokenizer, metrics.jsonl and plots written to {output_dir}")
    return TrainResult(output_dir, history, expert_load, model, tokenizer)


def _progress(steps, enabled: bool):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="training", unit="step", dynamic_ncols=True)
