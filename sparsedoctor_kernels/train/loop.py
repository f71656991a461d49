"""The training loop behind `sparsedoctor train` and `sparsedoctor demo`: a SparseDoctor adapter on a frozen causal
LM (a local Hugging Face directory, or `tiny`: a small random Qwen3 with a BPE tokenizer trained on the data),
AdamW on the adapter only, warmup + cosine learning rate, gradient accumulation, a held-out eval loss, optional
bf16 autocast, gradient checkpointing, TensorBoard and DDP (under `torchrun`). Every user error (settings, data,
model path, output directory, resume state) raises TrainError before anything is written; under DDP every rank
checks, and only rank 0 writes. The settings are in settings.py, the run directory in run_dir.py,
checkpoints in checkpoints.py."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsedoctor_kernels._util.progress import progress as progress_bar
from sparsedoctor_kernels.model import apply_sparsedoctor
from sparsedoctor_kernels.train import loading
from sparsedoctor_kernels.train.checkpoints import load_checkpoint, save_adapter, save_checkpoint
from sparsedoctor_kernels.train.data import (
    collate,
    demo_records,
    load_jsonl,
    supervised_tokens_in,
    trainable_examples,
)
from sparsedoctor_kernels.train.held_out import held_out_metrics
from sparsedoctor_kernels.train.metrics import MetricsWriter, eval_loss
from sparsedoctor_kernels.train.run_dir import (
    METRICS_FILE,
    TENSORBOARD_DIR,
    check_output_dir,
    check_run_dir,
    prepare_run_dir,
)
from sparsedoctor_kernels.train.settings import TrainError, TrainSettings, resolved_steps, validate_settings
from sparsedoctor_kernels.train.specialisation import layer_of, load_entropy


@dataclass
class TrainResult:
    output_dir: pathlib.Path
    history: list[dict]
    expert_load: dict[str, list[float]]  # layer -> fraction of routed pairs per expert (summed over modules)
    model: torch.nn.Module
    tokenizer: object
    settings: TrainSettings | None = None  # as trained: --steps resolved (from --epochs, or its default)


# --- settings -------------------------------------------------------------------------------------------------

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


def load_eval_records(settings: TrainSettings) -> list[dict]:
    return [r for path in settings.eval_data for r in load_jsonl(path)]


def split_eval(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records): round(fraction x records) of them, at least one, drawn by `seed`
    (and nothing else: the split does not depend on the tokenizer or --max-length); both keep the file order."""
    if not fraction:
        return records, []
    count = max(1, round(fraction * len(records)))
    if count >= len(records):
        raise TrainError(f"--eval-split {fraction} holds out {count} of the {len(records)} records, leaving none to "
                         "train on")
    held = set(random.Random(f"eval-split-{seed}").sample(range(len(records)), count))
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def check_model_path(model: str) -> None:
    if model != "tiny" and not (pathlib.Path(model) / "config.json").is_file():
        raise TrainError(f"--model must be 'tiny' or a local Hugging Face model directory (with config.json); "
                         f"{model} is not one")


def load_tokenizer(settings: TrainSettings, records: list[dict]):
    """`--model`'s tokenizer (for tiny, trained on `records`), padding with EOS where it has no pad token."""
    try:
        return loading.load_tokenizer(settings.model, records=records, tiny_vocab_size=settings.tiny_vocab_size)
    except (OSError, ValueError) as error:
        raise TrainError(f"--model {settings.model}: cannot load its tokenizer ({_first_line(error)})") from None


def load_model(settings: TrainSettings, tokenizer):
    """`--model` on the CPU, in bfloat16 with --bf16 and float32 without (tiny included), whatever the device."""
    dtype = torch.bfloat16 if settings.bf16 else torch.float32
    try:
        return loading.load_causal_lm(settings.model, tokenizer, dtype=dtype, seed=settings.seed)
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


def _batches(num_examples: int, batch_size: int, accumulation: int, seed: int, rank: int, world: int):
    """Endless shuffled optimizer steps, each `accumulation` micro-batches of example indices: this rank's share
    of the step's examples. A pass over the data (one shuffle) ends with its last whole step."""
    per_step = batch_size * world * accumulation
    epoch = 0
    while True:
        order = list(range(num_examples))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, num_examples - per_step + 1, per_step):
            firsts = (start + (micro * world + rank) * batch_size for micro in range(accumulation))
            yield [order[first: first + batch_size] for first in firsts]
        epoch += 1


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
    # Every check before any long work, and before anything is written. With --epochs the step count needs the
    # examples, and so does a resume's check against the checkpoint's step: that one waits for them.
    check_output_dir(output_dir)
    if settings.epochs is None:
        settings = dataclasses.replace(settings, steps=resolved_steps(settings, 0, world))
    resume_from = None if settings.steps is None and settings.resume else check_run_dir(settings, output_dir)
    check_model_path(settings.model)
    records, eval_records = split_eval(load_records(settings), settings.eval_split, settings.seed)
    eval_records += load_eval_records(settings)
    # The tiny model's tokenizer learns its vocabulary from every record: held-out text must be encodable.
    tokenizer = load_tokenizer(settings, records + eval_records)
    rendering = dict(chat_template=settings.chat_template, enable_thinking=settings.enable_thinking)
    examples = trainable_examples(records, tokenizer, settings.max_length, say, **rendering,
                                  progress=settings.progress and rank == 0)
    eval_examples, eval_kept = (trainable_examples(eval_records, tokenizer, settings.max_length,
                                                   lambda message: say(f"eval data: {message}"), **rendering,
                                                   with_indices=True)
                                if eval_records else ([], []))
    per_step = settings.batch_size * world * settings.gradient_accumulation_steps
    if len(examples) < per_step:
        raise TrainError(f"{len(examples)} examples cannot fill one optimizer step of --batch-size "
                         f"{settings.batch_size} x --gradient-accumulation-steps "
                         f"{settings.gradient_accumulation_steps} x {world} ranks")
    if settings.steps is None:
        settings = dataclasses.replace(settings, steps=resolved_steps(settings, len(examples), world))
        say(f"--epochs {settings.epochs}: {settings.steps} optimizer steps of {per_step} of the {len(examples)} "
            "training examples")
        if settings.resume:
            resume_from = check_run_dir(settings, output_dir)
    if eval_examples:
        when = f"every {settings.eval_every} steps and after the last" if settings.eval_every else "after the last step"
        say(f"eval loss on {len(eval_examples)} held-out examples {when}")
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
    # Every adapter parameter, the heads too where they are frozen (no views to project: they get no gradient,
    # and AdamW skips them), so the optimizer's parameter list, and a checkpoint's, is the same in every mode.
    adapter = {id(p) for m in model.adapted_modules().values() for n, p in m.named_parameters()
               if not n.startswith("base.")}
    params = [p for p in model.parameters() if p.requires_grad or id(p) in adapter]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
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

    data = _RunData(examples, eval_examples, tokenizer.pad_token_id,
                    *_eval_domains([eval_records[i] for i in eval_kept]))
    history, load_totals = _loop(settings, model, optimizer, data, device, start, output_dir)
    expert_load = {layer: (total / total.sum()).tolist() for layer, total in sorted(load_totals.items())}
    save_adapter(model, output_dir / "adapter")
    _check_queues_agree(model, world, say)
    if rank == 0:
        _write_outputs(output_dir, tokenizer, expert_load)
        log(f"adapter, tokenizer, metrics.jsonl and plots written to {output_dir}")
    _barrier(world)  # no rank leaves while another still needs the group
    return TrainResult(output_dir, history, expert_load, model, tokenizer, settings)


@dataclass
class _RunData:
    examples: list  # (input_ids, labels) to train on
    eval_examples: list  # held out: eval_loss
    pad_id: int
    eval_domains: list[int] | None = None  # a domain id per eval example, when every eval record names one
    num_domains: int = 0


def _eval_domains(kept_records: list[dict]) -> tuple:
    """(domain id per eval example, number of domains) when every held-out record kept for the eval carries a
    "domain" (or "task") field, else (None, 0): the eval then also measures MI(domain; top-1 expert)."""
    names = [r.get("domain", r.get("task")) if isinstance(r, dict) else None for r in kept_records]
    if not kept_records or any(not isinstance(n, str) for n in names):
        return None, 0
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return [index[name] for name in names], len(index)


def _evaluate(model, data: _RunData, settings: TrainSettings, device, world: int, rank: int) -> dict:
    """eval_loss, and on one process the held-out routing statistics too: router and load entropy, and with
    domains MI(domain; top-1 expert) (train.held_out; under DDP only the loss, every rank's share)."""
    if world > 1:
        return {"eval_loss": eval_loss(model, data.eval_examples, data.pad_id, settings.batch_size, device,
                                       settings.bf16, world, rank)}
    measured = held_out_metrics(model, data.eval_examples, data.eval_domains, data.num_domains, data.pad_id,
                                batch_size=settings.batch_size, device=device, bf16=settings.bf16)
    row = {"eval_loss": measured.pop("eval_lm_loss")}
    row.update({f"eval_{key}": value for key, value in measured.items() if key != "tokens"})
    return row


def _loop(settings: TrainSettings, model, optimizer, data: _RunData, device, start: int, output_dir: pathlib.Path):
    rank, world = _rank_and_world()
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    batches = _batches(len(data.examples), settings.batch_size, settings.gradient_accumulation_steps, settings.seed,
                       rank, world)
    for _ in range(start):  # the same data order as an uninterrupted run
        next(batches)
    history, load_totals, last_load = [], {}, {}

    def count_expert_load():  # after each training forward: the load is per forward
        last_load.clear()
        for name, counts in model.expert_load().items():
            last_load[name] = counts.double().cpu()
            layer = layer_of(name)
            load_totals[layer] = load_totals.get(layer, 0) + last_load[name]

    metrics = None
    if rank == 0:
        metrics = MetricsWriter(output_dir / METRICS_FILE, output_dir / TENSORBOARD_DIR if settings.tensorboard
                                else None, resumed_step=start)
    progress = progress_bar(range(start, settings.steps), settings.progress and rank == 0, "training", "step")
    model.train()
    try:
        for step in progress:
            micro_batches = [collate([data.examples[i] for i in ids], data.pad_id) for ids in next(batches)]
            row = _train_step(trained, optimizer, micro_batches, step, settings, device, world, count_expert_load)
            # The last forward's load entropy over real tokens, averaged over modules (the counts already copied).
            row["load_entropy"] = sum(map(load_entropy, last_load.values())) / len(last_load)
            if data.eval_examples and _eval_due(step + 1, settings):
                row.update(_evaluate(model, data, settings, device, world, rank))
                model.train()
            history.append(row)
            if metrics is not None:
                metrics.write(row)
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(lm=f"{row['lm']:.3f}", bal=f"{row['balance']:.3f}",
                                     con=f"{row['contrastive']:.3f}")
            if settings.save_every and (step + 1) % settings.save_every == 0:
                save_checkpoint(model, optimizer, step + 1, output_dir, rank)
    finally:
        if metrics is not None:
            metrics.close()
    return history, load_totals


def _eval_due(step: int, settings: TrainSettings) -> bool:
    return step == settings.steps or bool(settings.eval_every and step % settings.eval_every == 0)


def _train_step(trained, optimizer, micro_batches: list[dict], step: int, settings: TrainSettings, device,
                world: int, after_forward) -> dict:
    """One optimizer step over its micro-batches' summed gradients; its metrics row. The step's objective is the
    LM loss as a mean over every supervised token of the step (each micro-batch's mean weighted by its share of
    them: what one batch of them all would give) plus the balance and contrastive terms averaged over the
    micro-batches (they are per forward: each forward routes and samples its own tokens). Under DDP each rank
    weighs its own tokens and the ranks' gradients are averaged, as without accumulation. Stops (on every rank)
    before a step that would learn nothing or NaN."""
    began = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, settings)
    tokens = [supervised_tokens_in(batch["labels"]) for batch in micro_batches]
    count = len(micro_batches)
    totals = {"loss": 0.0}
    for index, (batch, supervised) in enumerate(zip(micro_batches, tokens)):
        # Under DDP the ranks average their gradients in the last micro-batch's backward only.
        syncing = index == count - 1 or world == 1
        with contextlib.nullcontext() if syncing else trained.no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                out = trained(**{k: v.to(device) for k, v in batch.items()})
            after_forward()
            problem = _step_problem(step + 1, out.loss, supervised, world)
            if problem:
                raise TrainError(problem)
            share = supervised / sum(tokens)
            lm = out.aux_losses["lm"]
            objective = lm * share + (out.loss - lm) / count  # out.loss - lm: the weighted balance + contrastive
            objective.backward()
        totals["loss"] += float(objective.detach())
        for key, value in out.aux_losses.items():
            totals[key] = totals.get(key, 0.0) + float(value.detach()) * (share if key == "lm" else 1 / count)
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, **totals, "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - began, 4)}


def _write_outputs(output_dir: pathlib.Path, tokenizer, expert_load: dict) -> None:
    from sparsedoctor_kernels.train.plots import plot_expert_load, plot_losses

    tokenizer.save_pretrained(output_dir / "tokenizer")
    full_history = [json.loads(line) for line in (output_dir / METRICS_FILE).read_text().splitlines()]
    plot_losses(full_history, output_dir / "loss.png")
    if expert_load:
        plot_expert_load(expert_load, output_dir / "expert_load.png")


