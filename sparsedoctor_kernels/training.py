"""The training loop behind `sparsedoctor train` and `sparsedoctor demo`: a SparseDoctor adapter on a frozen causal
LM (a local Hugging Face directory, or `tiny`: a small random Qwen3 with a BPE tokenizer trained on the data),
AdamW on the adapter only, warmup + cosine learning rate, optional bf16 autocast, gradient checkpointing and DDP
(under `torchrun`). Every user error (settings, data, model path, output directory, resume state) raises
TrainError before anything is written; under DDP every rank checks, and only rank 0 writes. The run directory is
kept in run_dir.py, checkpoints in checkpoints.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import random
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sparsedoctor_kernels.checkpoints import load_checkpoint, save_adapter, save_checkpoint
from sparsedoctor_kernels.data import (  # noqa: F401  (encode, collate: this module's API too)
    build_tokenizer,
    collate,
    corpus,
    demo_records,
    encode,
    load_jsonl,
    supervised_tokens_in,
    trainable_examples,
)
from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor
from sparsedoctor_kernels.run_dir import METRICS_FILE, check_output_dir, check_run_dir, prepare_run_dir
from sparsedoctor_kernels.train_errors import TrainError

# The CLI flag of a TrainSettings / SparseDoctorConfig field, where it is not "--" + the field with dashes.
# `r` is `--lora-r`: torchrun's own parser reads `--r` as an ambiguous prefix of its `--rdzv-*` flags.
FLAG_NAMES = {"learning_rate": "--lr", "r": "--lora-r", "progress": "--no-progress"}


def flag_for(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


@dataclass
class TrainSettings:
    output_dir: str = "sparsedoctor-run"
    model: str = "tiny"  # "tiny" or a local Hugging Face model directory
    data: list[str] = field(default_factory=list)  # JSONL files; empty: the bundled demo set
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 5e-3
    warmup_steps: int = 10
    max_length: int = 512  # tokens of prompt + response; longer examples are cut (and reported)
    seed: int = 0
    device: str | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_every: int = 50
    resume: bool = False
    overwrite: bool = False  # start over: remove the previous run's files from output_dir first
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


# --- settings -------------------------------------------------------------------------------------------------

def validate_settings(settings: TrainSettings) -> None:
    minimums = {"steps": 1, "batch_size": 1, "max_length": 1, "warmup_steps": 0, "save_every": 0,
                "tiny_vocab_size": 1}
    for name, minimum in minimums.items():
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise TrainError(f"{flag_for(name)} must be an integer >= {minimum}, got {value!r}")
    rate = settings.learning_rate
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not (math.isfinite(rate) and rate > 0):
        raise TrainError(f"--lr must be a finite number > 0, got {rate!r}")
    if not isinstance(settings.data, (list, tuple)) or not all(isinstance(p, str) for p in settings.data):
        raise TrainError(f"--data must be a list of JSONL file paths, got {settings.data!r}")
    if settings.resume and settings.overwrite:
        raise TrainError("--resume continues the run in --output-dir and --overwrite removes it: pass one of them")
    if not isinstance(settings.adapter, SparseDoctorConfig):
        raise TrainError(f"adapter must be a SparseDoctorConfig, got {type(settings.adapter).__name__}")


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {name}: training runs on cpu or cuda")
    return device


# --- data and model -------------------------------------------------------------------------------------------

def load_records(settings: TrainSettings) -> list[dict]:
    return [r for path in settings.data for r in load_jsonl(path)] if settings.data else demo_records()


def check_model_path(model: str) -> None:
    if model != "tiny" and not (pathlib.Path(model) / "config.json").is_file():
        raise TrainError(f"--model must be 'tiny' or a local Hugging Face model directory (with config.json); "
                         f"{model} is not one")


def load_tokenizer(settings: TrainSettings, records: list[dict]):
    if settings.model == "tiny":
        return build_tokenizer(corpus(records), vocab_size=settings.tiny_vocab_size)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
    except (OSError, ValueError) as error:
        raise TrainError(f"--model {settings.model}: cannot load its tokenizer ({_first_line(error)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(settings: TrainSettings, tokenizer):
    if settings.model == "tiny":
        from sparsedoctor_kernels.model.tiny import tiny_qwen3

        return tiny_qwen3(vocab_size=len(tokenizer), seed=settings.seed)
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    try:
        return AutoModelForCausalLM.from_pretrained(settings.model, dtype=dtype)
    except (OSError, ValueError) as error:
        raise TrainError(f"--model {settings.model}: cannot load it ({_first_line(error)})") from None


def load_base(settings: TrainSettings, records: list[dict]):
    """(base model, tokenizer) for `settings.model`."""
    check_model_path(settings.model)
    tokenizer = load_tokenizer(settings, records)
    return load_model(settings, tokenizer), tokenizer


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


# --- distributed ----------------------------------------------------------------------------------------------

def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun describes; True when this call created it (and so must destroy it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _step_problem(step: int, loss: torch.Tensor, supervised: int, world: int) -> str | None:
    """Why training cannot go on after this step's forward, agreed by every rank (so none is left waiting in a
    collective): a batch without a supervised token, or a loss that is not finite."""
    code = 1 if supervised == 0 else 2 if not math.isfinite(float(loss.detach())) else 0
    if world > 1:
        flag = torch.tensor([code], dtype=torch.int32, device=loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
    if code == 1:
        return f"step {step}: a batch has no supervised (response) token; raise --max-length"
    if code == 2:
        return f"step {step}: the loss is not finite; lower --lr or check the data"
    return None


def queue_digest(model) -> str:
    """A checksum of every expert queue (keys, pointers, sizes), to compare the ranks' queues."""
    digest = hashlib.sha256()
    for name, module in sorted(model.adapted_modules().items()):
        for tensor in (module.queue.keys, module.queue.ptr, module.queue.size):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_queues_agree(model, world: int, log) -> None:
    if world == 1:
        return
    digests = [None] * world
    dist.all_gather_object(digests, queue_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the expert queues differ between ranks (digests {digests})")
    log(f"expert queues identical on all {world} ranks (digest {digests[0]})")


# --- the loop -------------------------------------------------------------------------------------------------

def train(settings: TrainSettings, *, log=print) -> TrainResult:
    validate_settings(settings)
    device = pick_device(settings.device)
    created_group = _maybe_init_distributed(device)
    try:
        return _train(settings, device, log)
    finally:
        if created_group:
            dist.destroy_process_group()


def _train(settings: TrainSettings, device: torch.device, log) -> TrainResult:
    rank, world = _rank_and_world()
    say = log if rank == 0 else (lambda *_: None)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    output_dir = pathlib.Path(settings.output_dir)
    # Every check before any long work, and before anything is written.
    check_output_dir(output_dir)
    resume_from = check_run_dir(settings, output_dir)
    check_model_path(settings.model)
    records = load_records(settings)
    tokenizer = load_tokenizer(settings, records)
    examples = trainable_examples(records, tokenizer, settings.max_length, say)
    if len(examples) < settings.batch_size * world:
        raise TrainError(f"{len(examples)} examples cannot fill one batch of --batch-size {settings.batch_size} "
                         f"x {world} ranks")
    torch.manual_seed(settings.seed)
    base = load_model(settings, tokenizer)
    torch.manual_seed(settings.seed)  # the adapter's initialisation, identical on every rank
    try:
        model = apply_sparsedoctor(base, settings.adapter).to(device)
    except ValueError as error:
        if "no nn.Linear named" not in str(error):
            raise
        raise TrainError(f"--target-modules {' '.join(settings.adapter.target_modules)}: {_first_line(error)}"
                         ) from None
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    start = 0
    if resume_from is not None:
        load_checkpoint(model, optimizer, resume_from[0])
        start = resume_from[1]
        if start >= settings.steps:
            say(f"--resume: {resume_from[0].name} is at step {start} = --steps and the run's final outputs are "
                "missing: nothing is left to train; writing the final adapter, tokenizer and plots")
    _barrier(world)  # every rank has checked the directory before rank 0 changes it
    if rank == 0:
        prepare_run_dir(settings, output_dir, start, log)

    history, load_totals = _loop(settings, model, optimizer, examples, tokenizer, device, start, output_dir)
    expert_load = {layer: (total / total.sum()).tolist() for layer, total in sorted(load_totals.items())}
    save_adapter(model, output_dir / "adapter")
    _check_queues_agree(model, world, say)
    if rank == 0:
        _write_outputs(output_dir, tokenizer, expert_load)
        log(f"adapter, tokenizer, metrics.jsonl and plots written to {output_dir}")
    _barrier(world)  # no rank leaves while another still needs the group
    return TrainResult(output_dir, history, expert_load, model, tokenizer)


def _loop(settings, model, optimizer, examples, tokenizer, device, start: int, output_dir: pathlib.Path):
    rank, world = _rank_and_world()
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    batches = _batches(len(examples), settings.batch_size, settings.seed, rank, world)
    for _ in range(start):  # the same data order as an uninterrupted run
        next(batches)
    history, load_totals = [], {}
    metrics = (output_dir / METRICS_FILE).open("a", encoding="utf-8") if rank == 0 else None
    progress = _progress(range(start, settings.steps), enabled=settings.progress and rank == 0)
    model.train()
    try:
        for step in progress:
            batch = collate([examples[i] for i in next(batches)], tokenizer.pad_token_id)
            row = _train_step(trained, optimizer, batch, step, settings, device, world)
            history.append(row)
            for name, counts in model.expert_load().items():
                layer = _layer_of(name)
                load_totals[layer] = load_totals.get(layer, 0) + counts.double().cpu()
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(lm=f"{row['lm']:.3f}", bal=f"{row['balance']:.3f}",
                                     con=f"{row['contrastive']:.3f}")
            if settings.save_every and (step + 1) % settings.save_every == 0:
                save_checkpoint(model, optimizer, step + 1, output_dir, rank)
    finally:
        if metrics is not None:
            metrics.close()
    return history, load_totals


def _train_step(trained, optimizer, batch: dict, step: int, settings: TrainSettings, device, world: int) -> dict:
    """One optimizer step; its metrics row. Stops (on every rank) before a step that would learn nothing or NaN."""
    began = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, settings)
    supervised = supervised_tokens_in(batch["labels"])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
        out = trained(**{k: v.to(device) for k, v in batch.items()})
    problem = _step_problem(step + 1, out.loss, supervised, world)
    if problem:
        raise TrainError(problem)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "loss": float(out.loss.detach()),
            **{k: float(v.detach()) for k, v in out.aux_losses.items()},
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - began, 4)}


def _write_outputs(output_dir: pathlib.Path, tokenizer, expert_load: dict) -> None:
    from sparsedoctor_kernels.plots import plot_expert_load, plot_losses

    tokenizer.save_pretrained(output_dir / "tokenizer")
    full_history = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]
    plot_losses(full_history, output_dir / "loss.png")
    if expert_load:
        plot_expert_load(expert_load, output_dir / "expert_load.png")


def _progress(steps, enabled: bool):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="training", unit="step", dynamic_ncols=True)
