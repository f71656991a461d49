"""The `sparsedoctor` command."""

from __future__ import annotations

import argparse
import os
import sys


def _check(args: argparse.Namespace) -> int:
    import torch

    from sparsedoctor_kernels import __version__
    from sparsedoctor_kernels.check import format_table, run_checks

    print(f"sparsedoctor_kernels {__version__}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    results = run_checks(args.device, seed=args.seed)
    print(format_table(results))
    failed = [r for r in results if r.passed is False]
    ran = [r for r in results if r.passed is not None]
    print(f"\n{len(ran) - len(failed)} passed, {len(failed)} failed, {len(results) - len(ran)} skipped")
    return 1 if failed else 0


def _settings_from(args: argparse.Namespace):
    import dataclasses

    from sparsedoctor_kernels.model import SparseDoctorConfig
    from sparsedoctor_kernels.training import TrainError, TrainSettings

    fields = [f.name for f in dataclasses.fields(SparseDoctorConfig)]
    try:
        adapter = SparseDoctorConfig(**{name: getattr(args, name) for name in fields})
    except ValueError as error:
        raise TrainError(_with_flags(str(error), fields)) from None
    return TrainSettings(
        output_dir=args.output_dir, model=args.model, data=args.data or [], steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        max_length=args.max_length, seed=args.seed, device=args.device, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every, resume=args.resume,
        overwrite=args.overwrite, progress=not args.no_progress, adapter=adapter,
    )


def _with_flags(message: str, fields: list[str]) -> str:
    """A SparseDoctorConfig error in the words of the command line: `SparseDoctorConfig.top_k` -> `--top-k`."""
    import re

    from sparsedoctor_kernels.training import flag_for

    # Bare names only where they cannot be ordinary words (they hold an underscore).
    names = "|".join(sorted((re.escape(f) for f in fields), key=len, reverse=True))
    pattern = rf"SparseDoctorConfig\.({names})\b|\b([a-z]+_[a-z_]+)\b"
    return re.sub(pattern, lambda m: flag_for(m[1] or m[2]) if (m[1] or m[2]) in fields else m[0], message)


def _train(args: argparse.Namespace) -> int:
    from sparsedoctor_kernels.data import DataError
    from sparsedoctor_kernels.training import TrainError, train

    try:
        result = train(_settings_from(args))
    except (TrainError, DataError) as error:
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"sparsedoctor train: error: {message}", file=sys.stderr)
        return 2
    last = result.history[-1] if result.history else None
    if last and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print("final step: " + ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "lm", "balance", "contrastive")))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sparsedoctor_kernels.demo import run_demo
    from sparsedoctor_kernels.training import TrainError

    try:
        return run_demo(args.output_dir, steps=args.steps, device=args.device, progress=not args.no_progress)
    except TrainError as error:
        print(f"sparsedoctor demo: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def _eval(args: argparse.Namespace) -> int:
    from sparsedoctor_kernels.eval.command import run_eval, run_score
    from sparsedoctor_kernels.eval.items import EvalDataError

    try:
        return run_score(args) if args.score else run_eval(args)
    except (EvalDataError, OSError) as error:  # user errors: bad flags, paths, data; one line, no traceback
        print("sparsedoctor eval: error: " + " ".join(str(error).splitlines()), file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    import pathlib

    from sparsedoctor_kernels.bench.suite import OPS, run_suite

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        print(f"sparsedoctor bench: error: unknown op(s) {unknown}; choose from {','.join(OPS)}", file=sys.stderr)
        return 2
    return run_suite(ops, args.quick, pathlib.Path(args.out), args.device)


def _add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """Every SparseDoctorConfig field as a flag, with the config's default (`r` is `--lora-r`)."""
    import dataclasses
    import typing

    from sparsedoctor_kernels.model import SparseDoctorConfig
    from sparsedoctor_kernels.training import flag_for

    group = parser.add_argument_group("adapter (SparseDoctorConfig)")
    defaults = SparseDoctorConfig()
    declared = typing.get_type_hints(SparseDoctorConfig)  # `lora_alpha: float = 32` takes 0.5, not just ints
    for f in dataclasses.fields(SparseDoctorConfig):
        default = getattr(defaults, f.name)
        kind = declared.get(f.name)
        flag = flag_for(f.name)
        renamed = f"SparseDoctorConfig.{f.name}; " if flag != "--" + f.name.replace("_", "-") else ""
        if isinstance(default, tuple):
            group.add_argument(flag, dest=f.name, nargs="+", default=default,
                               help=f"{renamed}default: {' '.join(default)}")
        else:
            group.add_argument(flag, dest=f.name, type=kind if kind in (int, float, str) else type(default),
                               default=default,
                               help=f"{renamed}default: {default}")


def _add_train_parser(commands) -> None:
    """Every flag must pass through `torchrun ... -m sparsedoctor_kernels.cli train`: torchrun's parser reads
    abbreviations, so no flag here may be a prefix of one of its flags (tests/test_cli.py checks)."""
    from sparsedoctor_kernels.training import TrainSettings

    defaults = TrainSettings()
    train = commands.add_parser("train", help="train a SparseDoctor adapter on a causal LM", allow_abbrev=False)
    train.add_argument("--model", default=defaults.model,
                       help="'tiny' (a small random Qwen3) or a local HF model directory")
    train.add_argument("--data", nargs="+", help="JSONL files of instruction or multiple-choice records "
                       "(default: the bundled demo set)")
    train.add_argument("--output-dir", default=defaults.output_dir, help="the run directory: one run each")
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    train.add_argument("--lr", type=float, default=defaults.learning_rate)
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    train.add_argument("--max-length", type=int, default=defaults.max_length,
                       help=f"tokens of prompt + response; longer examples are truncated, with a warning "
                            f"(default: {defaults.max_length})")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (and a bf16 base model)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--save-every", type=int, default=defaults.save_every,
                       help="checkpoint every N steps (0: never)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output-dir from its latest checkpoint (same settings)")
    train.add_argument("--overwrite", action="store_true",
                       help="start over: remove the previous run in --output-dir (checkpoints, latest, metrics, "
                            "adapter, plots) first")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_adapter_flags(train)
    train.set_defaults(handler=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsedoctor", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="run every op on every available backend against the reference")
    check.add_argument("--device", action="append", choices=["cpu", "cuda"],
                       help="device to check (repeatable; default: cpu, and cuda when available)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    check.set_defaults(handler=_check)

    _add_train_parser(commands)

    demo = commands.add_parser("demo", help="train, save, reload and plot on a tiny Qwen3 (a few minutes on CPU)")
    demo.add_argument("--output-dir", default="sparsedoctor-demo")
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--device", default=None)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=_demo)

    from sparsedoctor_kernels.eval.command import positive_int

    evaluate = commands.add_parser("eval", help="evaluate on CMMLU-Med, CMB or CMExam, or score predictions")
    evaluate.add_argument("--benchmark", required=True, choices=["cmmlu-med", "cmb", "cmexam"])
    evaluate.add_argument("--data", help="CMMLU root (dev/, test/), CMB question JSON or CMExam CSV")
    evaluate.add_argument("--answers", help="CMB: the official answer key JSON (CMB-test-choice-answer.json)")
    evaluate.add_argument("--split", default="test", choices=["test", "dev"], help="CMMLU-Med split")
    evaluate.add_argument("--subjects", nargs="+", help="CMMLU subjects (default: the seven medical ones)")
    evaluate.add_argument("--model", default="tiny", help="'tiny' or a local Hugging Face model directory")
    evaluate.add_argument("--adapter", help="a SparseDoctor adapter directory (save_adapter's output)")
    evaluate.add_argument("--tokenizer", help="tokenizer directory (default: the model's, or the run's)")
    evaluate.add_argument("--shots", type=int, default=0, choices=[0, 1, 2, 3, 4, 5])
    evaluate.add_argument("--mode", default="logits", choices=["logits", "generate"],
                          help="logits: option-letter log-probs (multi-answer items are generated anyway)")
    evaluate.add_argument("--limit", type=positive_int, help="only the first N items of each CMMLU subject "
                          "(every requested subject is kept); cmb, cmexam: the first N items. With --score: "
                          "the same items")
    evaluate.add_argument("--batch-size", type=positive_int, default=8)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the tiny model")
    evaluate.add_argument("--output-dir", help="for predictions.jsonl, report.json, report.md; checked before any "
                          "work (default: sparsedoctor-eval). With --score: reports are written only when given, "
                          "else just printed")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.add_argument("--score", action="store_true", help="score --predictions instead of running a model")
    evaluate.add_argument("--predictions", help="with --score: a predictions JSONL ({\"id\", \"prediction\"} lines)")
    evaluate.set_defaults(handler=_eval)

    bench = commands.add_parser("bench", help="benchmark the ops and a training step against the alternatives")
    bench.add_argument("--ops", default="route,lora_moe,queue,infonce,step",
                       help="comma-separated subset of route,lora_moe,queue,infonce,step")
    bench.add_argument("--quick", action="store_true", help="one representative size per op")
    bench.add_argument("--out", default="sparsedoctor-bench", help="directory for the CSV and the plots")
    bench.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
