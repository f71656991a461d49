"""The `sparsedoctor` command."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def _check(args: argparse.Namespace) -> int:
    import torch

    from sparsedoctor_kernels import __version__
    from sparsedoctor_kernels.testing.check import format_table, run_checks

    print(f"sparsedoctor_kernels {__version__}, torch {torch.__version__}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    results = run_checks(args.device, seed=args.seed)
    print(format_table(results))
    failed = [r for r in results if r.passed is False]
    ran = [r for r in results if r.passed is not None]
    print(f"\n{len(ran) - len(failed)} passed, {len(failed)} failed, {len(results) - len(ran)} skipped")
    return 1 if failed else 0


def _settings_from(args: argparse.Namespace):
    """TrainSettings from the --config file, if any, with the flags given on the command line on top."""
    from sparsedoctor_kernels.model import SparseDoctorConfig
    from sparsedoctor_kernels.train.settings import TrainError, TrainSettings, merged_values, read_config_file

    file_values = read_config_file(args.config) if args.config else {}
    flag_values = {name: getattr(args, name) for name in sorted(getattr(args, GIVEN))}
    values = merged_values(file_values, flag_values)
    adapter_values = values.pop("adapter")
    try:
        adapter = SparseDoctorConfig(**adapter_values)
    except ValueError as error:
        raise TrainError(_with_flags(str(error), list(SparseDoctorConfig.field_names()))) from None
    return TrainSettings(**values, adapter=adapter)


def _with_flags(message: str, fields: list[str]) -> str:
    """A SparseDoctorConfig error in the words of the command line: `SparseDoctorConfig.top_k` -> `--top-k`."""
    import re

    from sparsedoctor_kernels.train.settings import flag_for

    # Bare names only where they cannot be ordinary words (they hold an underscore).
    names = "|".join(sorted((re.escape(f) for f in fields), key=len, reverse=True))
    pattern = rf"SparseDoctorConfig\.({names})\b|\b([a-z]+_[a-z_]+)\b"
    return re.sub(pattern, lambda m: flag_for(m[1] or m[2]) if (m[1] or m[2]) in fields else m[0], message)


def _train(args: argparse.Namespace) -> int:
    from sparsedoctor_kernels.train.data import DataError
    from sparsedoctor_kernels.train.loop import train
    from sparsedoctor_kernels.train.settings import TrainError

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
    from sparsedoctor_kernels.experiments.demo import run_demo
    from sparsedoctor_kernels.train.settings import TrainError

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


# The namespace attribute naming the train flags given on the command line (the rest keep the --config file's
# values, or the defaults).
GIVEN = "given_settings"


class _SettingAction(argparse.Action):
    """Stores a setting's value (a switch, nargs=0, stores its const) and records that its flag was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        setattr(namespace, GIVEN, getattr(namespace, GIVEN, frozenset()) | {self.dest})


def _add_setting(group, name: str, kind: type, default, help_text: str, shown: str | None = None,
                 metavar: str | None = None) -> None:
    """The flag of one setting: `kind` int, float or str takes a value, list one or more, bool is a switch that
    turns the default over (a True default's flag is --no-...)."""
    from sparsedoctor_kernels.train.settings import flag_for

    flag = flag_for(name)
    if shown is None:
        shown = ("off" if not default else "on") if kind is bool else (
            " ".join(default) if isinstance(default, (list, tuple)) else str(default))
    text = f"{help_text} (default: {shown})".replace("%", "%%")
    metavar = metavar or flag.removeprefix("--").upper().replace("-", "_")
    if kind is bool:
        if default and not flag.startswith("--no-"):
            raise AssertionError(f"{name} defaults to True, so its flag must be --no-...: add it to FLAG_NAMES")
        group.add_argument(flag, dest=name, action=_SettingAction, nargs=0, const=not default, default=default,
                           help=text)
    elif kind is list:
        group.add_argument(flag, dest=name, action=_SettingAction, nargs="+", metavar=metavar,
                           default=list(default), help=text)
    else:
        group.add_argument(flag, dest=name, action=_SettingAction, type=kind, default=default, help=text,
                           metavar=metavar)


def _add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """Every SparseDoctorConfig field as a flag, with the config's default (`r` is `--lora-r`)."""
    from sparsedoctor_kernels.model import SparseDoctorConfig
    from sparsedoctor_kernels.train.settings import adapter_help, adapter_types, flag_for

    group = parser.add_argument_group("adapter (SparseDoctorConfig; an `adapter:` mapping in a config file)")
    defaults = SparseDoctorConfig()
    declared = {f.name: f.default for f in dataclasses.fields(SparseDoctorConfig)}
    for name, kind in adapter_types().items():  # `lora_alpha: float = 32` takes 0.5, not just ints
        renamed = f" (SparseDoctorConfig.{name})" if flag_for(name) != "--" + name.replace("_", "-") else ""
        # A field declared None (contrastive_coef) resolves per mode: its help says how, its default is "unset".
        shown = "unset" if declared.get(name, ...) is None else None
        _add_setting(group, name, kind, getattr(defaults, name), adapter_help(name) + renamed, shown)


TRAIN_EPILOG = """A --config file (YAML or JSON, by its suffix) holds settings by their field names (learning_rate,
not --lr), with the adapter's under `adapter:`; a flag given on the command line overrides the file, and a
given --steps or --epochs replaces the file's other one. Relative paths in the file are read from the working
directory, as on the command line. run_config.json in the run directory records the resolved settings."""


def _add_train_parser(commands) -> None:
    """Every TrainSettings field as a flag, generated from its metadata (type, help), then the adapter's.
    Every flag must pass through `torchrun ... -m sparsedoctor_kernels.cli train`: torchrun's parser reads
    abbreviations, so no flag here may be a prefix of one of its flags (tests/test_cli.py checks)."""
    from sparsedoctor_kernels.train.settings import CHAT_TEMPLATES, TrainSettings, setting_fields

    train = commands.add_parser("train", help="train a SparseDoctor adapter on a causal LM", allow_abbrev=False,
                                description="Train a SparseDoctor adapter on a causal LM.", epilog=TRAIN_EPILOG)
    train.add_argument("--config", help="a YAML (.yaml, .yml) or JSON (.json) file of settings (default: none)")
    group = train.add_argument_group("training (TrainSettings)")
    defaults = TrainSettings()
    for name, f in setting_fields().items():
        # Checked with the settings (validate_settings), not by argparse: a config file's value is checked too.
        metavar = "{" + ",".join(CHAT_TEMPLATES) + "}" if name == "chat_template" else None
        _add_setting(group, name, f.metadata["type"], getattr(defaults, name), f.metadata["help"],
                     f.metadata["shown"], metavar)
    _add_adapter_flags(train)
    train.set_defaults(handler=_train, **{GIVEN: frozenset()})


def build_parser() -> argparse.ArgumentParser:
    from sparsedoctor_kernels import __version__

    parser = argparse.ArgumentParser(prog="sparsedoctor", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sparsedoctor_kernels {__version__}")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("check", help="run every op on every available backend against the reference")
    check.add_argument("--device", action="append", choices=["cpu", "cuda"],
                       help="device to check (repeatable; default: cpu, and cuda when available)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    check.set_defaults(handler=_check)

    _add_train_parser(commands)

    demo = commands.add_parser("demo", help="train, save, reload and plot on a tiny Qwen3 (25 s on an idle "
                                            "2-core CPU)")
    demo.add_argument("--output-dir", default="sparsedoctor-demo")
    demo.add_argument("--steps", type=int, default=100)
    demo.add_argument("--device", default=None)
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=_demo)

    from sparsedoctor_kernels.eval.command import positive_int
    from sparsedoctor_kernels.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS
    from sparsedoctor_kernels.eval.runner import DEFAULT_MAX_NEW_TOKENS, THINKING_MAX_NEW_TOKENS

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
    evaluate.add_argument("--protocol", choices=list(PROTOCOLS),
                          help="how prompts are written and scored, as a reference does it (docs/evaluation.md): "
                          "lm-eval or cmmlu (the official script) for cmmlu-med, cmb, cmexam (their official "
                          "prompts and answer reading), sparsedoctor (this library's, with --chat-template, "
                          "--enable-thinking, --mode generate). Default: " + ", ".join(
                              f"{name} for {benchmark}" for benchmark, name in DEFAULT_PROTOCOL.items())
                          + "; sparsedoctor with any of those three flags")
    evaluate.add_argument("--harness", choices=["lm-eval"],
                          help="run lm-evaluation-harness itself (in process, lm-eval's HFLM on the loaded model, "
                          "task files written for --data into the output directory); cmmlu-med")
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                          help="the model's dtype (default: bfloat16 on CUDA, float32 elsewhere)")
    evaluate.add_argument("--mode", default="logits", choices=["logits", "generate"],
                          help="logits: option-letter log-probs (multi-answer items are generated anyway); "
                          "generate: greedy generation, answer read after any <think> block (default: logits)")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=None,
                          help=f"new tokens per generated answer; generation stops earlier at end-of-sequence "
                          f"(default: {DEFAULT_MAX_NEW_TOKENS}, or {THINKING_MAX_NEW_TOKENS} with --enable-thinking; "
                          f"a thinking model needs room for its reasoning: a reply cut off inside <think> holds "
                          f"no answer)")
    evaluate.add_argument("--chat-template", action="store_true",
                          help="render each prompt as one user message of the tokenizer's chat template, with "
                          "the assistant turn opened (for chat/instruct models; default: off, plain prompts)")
    evaluate.add_argument("--enable-thinking", action="store_true",
                          help="with --chat-template and --mode generate: pass enable_thinking=True to the "
                          "template (Qwen3 reasons in <think> first; default: off, Qwen3's template then writes "
                          "an empty think block)")
    evaluate.add_argument("--limit", type=positive_int, help="only the first N items of each CMMLU subject "
                          "(every requested subject is kept); cmb, cmexam: the first N items. With --score: "
                          "the same items")
    evaluate.add_argument("--batch-size", type=positive_int, default=8, help="default: 8")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the tiny model")
    evaluate.add_argument("--output-dir", help="for predictions.jsonl, report.json, report.md; checked before any "
                          "work (default: sparsedoctor-eval). With --score: reports are written only when given, "
                          "else just printed")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.add_argument("--score", action="store_true", help="score --predictions instead of running a model")
    evaluate.add_argument("--predictions", help="with --score: a predictions JSONL ({\"id\", \"prediction\"} lines), "
                          "or an lm-evaluation-harness samples file of a CMMLU subject (--log_samples)")
    evaluate.set_defaults(handler=_eval)

    from sparsedoctor_kernels.experiments.ablate import add_parser as add_ablate_parser

    add_ablate_parser(commands)

    bench = commands.add_parser("bench", help="benchmark the ops and a training step against the alternatives")
    bench.add_argument("--ops", default="route,lora_moe,queue,infonce,step,versus_lora",
                       help="comma-separated subset of route,lora_moe,queue,infonce,step,versus_lora (the adapter "
                            "against PEFT LoRA: step, decoding, saved bytes, launches per layer; needs peft)")
    bench.add_argument("--quick", action="store_true", help="one representative size per op")
    bench.add_argument("--out", default="sparsedoctor-bench", help="directory for the CSV and the plots")
    bench.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`sparsedoctor` with no command prints the help and exits 0, as `sparsedoctor --help` does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
