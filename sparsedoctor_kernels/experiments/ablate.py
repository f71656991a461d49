"""`sparsedoctor ablate`: the ablation table of the method, measured, on a bundled multi-domain task.

A grid of variants (`full`: the paper mode as we read it; no contrastive term, a small queue, no balance loss, a
large contrastive weight, and the random-stream control: the contrastive term computed with the same random draws
but weighted 0) x seeds trains the same adapter on the same data in the same order (the seed fixes the data order
and the initialisation, shared by every variant), then measures on held-out records: the LM loss of the response
tokens and how the routers specialise (mutual information between a token's domain and its top-1 expert, the same
given the token, router and load entropy; `sparsedoctor_kernels.train.specialisation`). Differences are paired by
seed, against `full` and against the control (the noise floor of a change of random stream).

    sparsedoctor ablate --output-dir ablation --seeds 0 1 2

writes `ablation/table.md`, `table.csv`, `runs.csv` and `ablation.png`; each finished run keeps its
`result.json`, so an interrupted grid resumes where it stopped (`--overwrite` starts over).
The tiny base is pretrained once per task on the domain-averaged chain (`base/`): adapters should start from a
model that knows the shared statistics, as they would from a real pretrained model.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import pathlib
import shutil
import statistics
from dataclasses import asdict, dataclass, field

import torch

from sparsedoctor_kernels._util.files import write_atomically
from sparsedoctor_kernels._util.progress import progress as progress_bar

# Overrides of SparseDoctorConfig per variant, on top of AblateSettings.adapter.
# Each variant names its contrastive mode and weight, so that a change of the library's defaults does not change
# what a committed table measured. "full" is the paper's method as we read it (the default until the router
# mode was measured better).
PAPER = {"contrastive_mode": "paper", "contrastive_coef": 0.1}
VARIANTS: dict[str, dict] = {
    "full": PAPER,
    "no-contrastive": {**PAPER, "contrastive_tokens": 0, "contrastive_coef": 0.0},
    # The term computed (same random draws as "full") and weighted 0: asked for, since a zero weight computes nothing.
    "control": {**PAPER, "contrastive_coef": 0.0, "contrastive_at_zero_weight": True},
    "small-queue": {**PAPER, "queue_size": 8},
    "no-balance": {**PAPER, "balance_coef": 0.0},
    "contrastive-1.0": {**PAPER, "contrastive_coef": 1.0},
    "sequence": {**PAPER, "contrastive_mode": "sequence"},
    "router-only": {**PAPER, "contrastive_updates": "router"},
    "sequence-router-only": {**PAPER, "contrastive_mode": "sequence", "contrastive_updates": "router"},
    "sequence-0.03": {"contrastive_mode": "sequence", "contrastive_coef": 0.03},
    "router": {"contrastive_mode": "router", "contrastive_coef": 0.1},
    "router-0.03": {"contrastive_mode": "router", "contrastive_coef": 0.03},  # the library's default
    "router-0.01": {"contrastive_mode": "router", "contrastive_coef": 0.01},
    "router-t0.3": {"contrastive_mode": "router", "contrastive_coef": 0.1, "temperature": 0.3},
}
REFERENCES = ("full", "control")  # paired differences are reported against these
METRICS = ("eval_lm_loss", "mi_domain_top1_bits", "mi_domain_top1_given_token_bits", "router_entropy",
           "load_entropy", "max_load")
TASKS = ("synthetic", "departments")


class AblateError(ValueError):
    """A bad setting or output directory, said in one line."""


@dataclass
class AblateSettings:
    output_dir: str = "sparsedoctor-ablation"
    task: str = "synthetic"
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 5e-3
    eval_fraction: float = 0.2
    records_per_domain: int = 200
    hidden_size: int = 64
    num_layers: int = 2
    pretrain_steps: int = 300
    device: str | None = None
    progress: bool = True
    overwrite: bool = False
    # The library's defaults but smaller; dropout stays on (0.05), so that the random stream matters and the
    # control (the term's random draws, weighted 0) measures what a change of random stream alone does.
    adapter: dict = field(default_factory=lambda: {"num_experts": 4, "top_k": 2, "r": 8, "queue_size": 256,
                                                   "contrastive_tokens": 64, "proj_dim": 32})


def check_settings(settings: AblateSettings) -> None:
    from sparsedoctor_kernels.model import SparseDoctorConfig

    if settings.task not in TASKS:
        raise AblateError(f"--task must be one of {', '.join(TASKS)}, got {settings.task!r}")
    unknown = [v for v in settings.variants if v not in VARIANTS]
    if unknown or not settings.variants:
        raise AblateError(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}" if unknown
                          else "--variants: name at least one")
    if len(set(settings.seeds)) != len(settings.seeds) or not settings.seeds:
        raise AblateError(f"--seeds must be distinct and at least one, got {settings.seeds}")
    for name in ("steps", "batch_size", "records_per_domain", "hidden_size", "num_layers"):
        if getattr(settings, name) < 1:
            raise AblateError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")
    if settings.pretrain_steps < 0:
        raise AblateError(f"--pretrain-steps must be >= 0, got {settings.pretrain_steps}")
    if not 0.0 < settings.eval_fraction < 1.0:
        raise AblateError(f"--eval-fraction must be in (0, 1), got {settings.eval_fraction}")
    for variant in settings.variants:
        try:
            SparseDoctorConfig(**{**settings.adapter, **VARIANTS[variant]})
        except (TypeError, ValueError) as error:
            raise AblateError(f"variant {variant}: {error}") from None


# --- the task and its base model -------------------------------------------------------------------------------

def task_records(settings: AblateSettings) -> tuple[list[dict], list[dict], list[str]]:
    """(train records, held-out records, pretraining texts), deterministic (task seed 0, not the run seeds)."""
    from sparsedoctor_kernels.experiments.domains import (
        department_records,
        pretraining_texts,
        split_records,
        synthetic_domain_records,
    )
    from sparsedoctor_kernels.train.data import corpus

    if settings.task == "synthetic":
        records = synthetic_domain_records(records_per_domain=settings.records_per_domain, seed=0)
        texts = pretraining_texts(seed=0)
    else:
        records = department_records(seed=0)
        texts = corpus(records)  # no domain-free text exists for the demo set: pretrain on its own text
    train, held_out = split_records(records, settings.eval_fraction, seed=0)
    return train, held_out, texts


def _pretrain(model, tokenizer, texts: list[str], steps: int, device, progress: bool) -> list[float]:
    """Full-parameter causal-LM training of the tiny base on `texts` (batch 16, AdamW, constant 3e-3)."""
    import random

    from sparsedoctor_kernels.train.data import collate

    encoded = [tokenizer(t)["input_ids"][:128] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)
    losses = []
    model.train()
    for _ in progress_bar(range(steps), progress, "pretraining the base", "step"):
        picked = [encoded[rng.randrange(len(encoded))] for _ in range(16)]
        batch = collate([(tokens, tokens) for tokens in picked], tokenizer.pad_token_id)  # every token learnt
        loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def prepare_base(settings: AblateSettings, directory: pathlib.Path, records: list[dict], texts: list[str],
                 device) -> pathlib.Path:
    """A tiny Qwen3 with a BPE tokenizer trained on the task, pretrained on `texts`, saved as a Hugging Face
    directory (once: an existing one of the same settings is reused)."""
    from sparsedoctor_kernels.model.tiny import tiny_qwen3
    from sparsedoctor_kernels.train.data import build_tokenizer, corpus

    recipe = {"task": settings.task, "hidden_size": settings.hidden_size, "num_layers": settings.num_layers,
              "pretrain_steps": settings.pretrain_steps, "records_per_domain": settings.records_per_domain}
    stamp = directory / "ablate_base.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("recipe") == recipe:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    tokenizer = build_tokenizer(corpus(records) + texts, vocab_size=1500)
    torch.manual_seed(0)
    model = tiny_qwen3(len(tokenizer), hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                       seed=0).to(device)
    losses = _pretrain(model, tokenizer, texts, settings.pretrain_steps, device, settings.progress)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(directory)
    write_atomically(stamp, json.dumps({"recipe": recipe, "pretrain_loss_first_last":
                                        [losses[0], losses[-1]] if losses else []}, indent=2) + "\n")
    return directory


# --- one run --------------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, records: list[dict], device, batch_size: int = 16) -> dict:
    """Held-out LM loss (mean NLL per response token, nats) and the specialisation metrics averaged over the
    adapted modules, on the response tokens of `records` (each with a "domain")."""
    from sparsedoctor_kernels.experiments.domains import domain_index
    from sparsedoctor_kernels.train.data import encode
    from sparsedoctor_kernels.train.held_out import held_out_metrics

    index = domain_index(records)
    return held_out_metrics(model, encode(records, tokenizer, 512), [index[r["domain"]] for r in records],
                            len(index), tokenizer.pad_token_id, batch_size=batch_size, device=device)


def run_one(settings: AblateSettings, variant: str, seed: int, base_dir: pathlib.Path, train_file: pathlib.Path,
            held_out: list[dict], device) -> dict:
    from sparsedoctor_kernels.model import SparseDoctorConfig
    from sparsedoctor_kernels.train.loop import train
    from sparsedoctor_kernels.train.settings import TrainSettings

    run_dir = pathlib.Path(settings.output_dir) / "runs" / variant / f"seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    adapter = SparseDoctorConfig(**{**settings.adapter, **VARIANTS[variant]})
    trained = train(TrainSettings(
        output_dir=str(run_dir / "train"), model=str(base_dir), data=[str(train_file)], steps=settings.steps,
        batch_size=settings.batch_size, learning_rate=settings.learning_rate, warmup_steps=10, seed=seed,
        device=str(device), save_every=0, overwrite=True, progress=False, adapter=adapter,
    ), log=lambda *args, **kwargs: None)
    result = {"variant": variant, "seed": seed, **evaluate(trained.model, trained.tokenizer, held_out, device),
              "final_train_lm": trained.history[-1]["lm"] if trained.history else math.nan}
    write_atomically(result_path, json.dumps(result, indent=2) + "\n")
    return result


# --- the table ------------------------------------------------------------------------------------------------

def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict], variants: list[str]) -> list[dict]:
    """One row per variant and metric: mean, sd, per-seed values, and paired differences (same seed) against
    each reference variant that was run, with how many seeds the difference was positive on."""
    by_run = {(r["variant"], r["seed"]): r for r in results}
    rows = []
    for variant in variants:
        seeds = sorted(seed for v, seed in by_run if v == variant)
        for metric in METRICS:
            values = [by_run[variant, s][metric] for s in seeds]
            mean, sd = _mean_sd(values)
            row = {"variant": variant, "metric": metric, "mean": mean, "sd": sd, "seeds": len(seeds),
                   "per_seed": " ".join(f"{v:.4f}" for v in values)}
            for reference in REFERENCES:
                paired = [by_run[variant, s][metric] - by_run[reference, s][metric]
                          for s in seeds if (reference, s) in by_run]
                if paired and reference != variant:
                    d_mean, d_sd = _mean_sd(paired)
                    up = sum(d > 0 for d in paired)
                    row[f"vs_{reference}"] = f"{d_mean:+.4f} ± {d_sd:.4f} ({up}/{len(paired)} up)"
                else:
                    row[f"vs_{reference}"] = ""
            rows.append(row)
    return rows


def table_markdown(rows: list[dict], variants: list[str], command: str) -> str:
    lines = [f"Produced by `{command}`.", "",
             "Mean ± sd over seeds; per-seed values in `table.csv`. Differences are paired by seed.", ""]
    header = "| metric | " + " | ".join(variants) + " |"
    lines += [header, "|" + " --- |" * (len(variants) + 1)]
    cell = {(r["variant"], r["metric"]): r for r in rows}
    for metric in METRICS:
        lines.append(f"| {metric} | " + " | ".join(
            f"{cell[v, metric]['mean']:.4f} ± {cell[v, metric]['sd']:.4f}" for v in variants) + " |")
    for reference in REFERENCES:
        if reference not in variants:
            continue
        lines += ["", f"Paired difference against `{reference}` (variant - {reference}, seeds where it is > 0):", "",
                  "| metric | " + " | ".join(v for v in variants if v != reference) + " |",
                  "|" + " --- |" * len(variants)]
        for metric in METRICS:
            lines.append(f"| {metric} | " + " | ".join(
                cell[v, metric][f"vs_{reference}"] for v in variants if v != reference) + " |")
    return "\n".join(lines) + "\n"


def plot_runs(results: list[dict], variants: list[str], path: pathlib.Path) -> pathlib.Path:
    """MI(domain; top-1 expert) against held-out LM loss, one point per run, the mean of each variant marked."""
    from sparsedoctor_kernels._util.plotting import pyplot

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    palette = plt.get_cmap("tab20")  # distinct colours for up to 20 variants (the default cycle repeats after 10)
    for index, variant in enumerate(variants):
        runs = [r for r in results if r["variant"] == variant]
        color = palette(index % 20)
        for axis, metric in zip(axes, ("mi_domain_top1_bits", "mi_domain_top1_given_token_bits")):
            xs, ys = [r["eval_lm_loss"] for r in runs], [r[metric] for r in runs]
            axis.scatter(xs, ys, color=color, alpha=0.45, s=22)
            axis.errorbar(statistics.fmean(xs), statistics.fmean(ys), fmt="o", color=color, markersize=8,
                          label=variant, xerr=_mean_sd(xs)[1], yerr=_mean_sd(ys)[1], capsize=3)
    for axis, title in zip(axes, ("MI(domain; top-1 expert)", "MI(domain; top-1 expert | token)")):
        axis.set_xlabel("held-out LM loss (nats / response token), lower is better")
        axis.set_ylabel("bits, higher = more specialised")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(title="variant (dots: seeds)", fontsize=8)
    figure.suptitle("sparsedoctor ablate: specialisation against LM loss")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# --- the command ----------------------------------------------------------------------------------------------

def _prepare_output_dir(settings: AblateSettings) -> pathlib.Path:
    out = pathlib.Path(settings.output_dir)
    stamp = out / "ablate_settings.json"
    wanted = {k: v for k, v in asdict(settings).items() if k not in ("output_dir", "progress", "overwrite",
                                                                      "device", "variants", "seeds")}
    if out.exists() and not out.is_dir():
        raise AblateError(f"--output-dir {out} is a file")
    if out.exists() and settings.overwrite:
        shutil.rmtree(out / "runs", ignore_errors=True)
        stamp.unlink(missing_ok=True)
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        if saved != wanted:
            changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise AblateError(f"--output-dir {out} holds a grid of other settings ({', '.join(changed)}): "
                              "resume it with the same settings, pass --overwrite, or choose another directory")
    elif out.exists() and any(p.name != "base" for p in out.iterdir()):
        raise AblateError(f"--output-dir {out} is not empty and holds no ablation grid; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(stamp, json.dumps(wanted, indent=2, sort_keys=True) + "\n")
    return out


def run_ablation(settings: AblateSettings, command: str = "sparsedoctor ablate", log=print) -> list[dict]:
    from sparsedoctor_kernels.train.data import write_jsonl
    from sparsedoctor_kernels.train.loop import pick_device

    check_settings(settings)
    out = _prepare_output_dir(settings)
    device = pick_device(settings.device)
    train_records, held_out, texts = task_records(settings)
    # Atomic writes: a second `ablate` on the same grid (other variants, in parallel) rewrites the same files.
    train_file = write_jsonl(train_records, out / "train.jsonl")
    write_jsonl(held_out, out / "held_out.jsonl")
    base_dir = prepare_base(settings, out / "base", train_records + held_out, texts, device)
    grid = [(variant, seed) for seed in settings.seeds for variant in settings.variants]
    results = []
    for variant, seed in progress_bar(grid, settings.progress, "ablation runs", "run"):
        results.append(run_one(settings, variant, seed, base_dir, train_file, held_out, device))
    rows = summarise(results, settings.variants)
    _write_csv(out / "runs.csv", results, ["variant", "seed", *METRICS, "final_train_lm"])
    _write_csv(out / "table.csv", rows, list(rows[0]))
    write_atomically(out / "table.md", table_markdown(rows, settings.variants, command))
    plot_runs(results, settings.variants, out / "ablation.png")
    log(f"table: {out / 'table.md'}\nplot: {out / 'ablation.png'}")
    return results


def _write_csv(path: pathlib.Path, rows: list[dict], columns: list[str]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, buffer.getvalue())


def add_parser(commands) -> None:
    defaults = AblateSettings()
    ablate = commands.add_parser("ablate", help="train the method's ablation grid x seeds on a bundled "
                                 "multi-domain task and tabulate LM loss and expert specialisation",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ablate.add_argument("--output-dir", default=defaults.output_dir, help=f"default: {defaults.output_dir}")
    ablate.add_argument("--task", default=defaults.task, choices=TASKS, help=f"default: {defaults.task}")
    ablate.add_argument("--variants", nargs="+", default=defaults.variants, choices=list(VARIANTS),
                        help=f"default: all ({' '.join(VARIANTS)})")
    ablate.add_argument("--seeds", nargs="+", type=int, default=defaults.seeds,
                        help=f"default: {' '.join(map(str, defaults.seeds))}")
    for name in ("steps", "batch_size", "records_per_domain", "hidden_size", "num_layers", "pretrain_steps"):
        ablate.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                            help=f"default: {getattr(defaults, name)}")
    ablate.add_argument("--lr", dest="learning_rate", type=float, default=defaults.learning_rate,
                        help=f"adapter learning rate (default: {defaults.learning_rate})")
    ablate.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                        help=f"held-out share of each domain's records (default: {defaults.eval_fraction})")
    ablate.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ablate.add_argument("--overwrite", action="store_true", help="start the grid over (the base is kept)")
    ablate.add_argument("--no-progress", action="store_true", help="no progress bars")
    ablate.set_defaults(handler=_ablate_command)


def _ablate_command(args) -> int:
    import sys

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(AblateSettings) if hasattr(args, f.name)}
    settings = AblateSettings(**fields, progress=not args.no_progress)
    try:
        run_ablation(settings, command="sparsedoctor ablate " + " ".join(sys.argv[2:]))
    except AblateError as error:
        print(f"sparsedoctor ablate: error: {error}", file=sys.stderr)
        return 2
    return 0
