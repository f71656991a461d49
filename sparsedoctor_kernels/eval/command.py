"""`sparsedoctor eval`: evaluate a model (with or without an adapter) on a benchmark, or score a predictions
file. Writes predictions.jsonl, report.json and report.md into the output directory."""

from __future__ import annotations

import json
import pathlib

import torch

from sparsedoctor_kernels.eval.items import EvalDataError, normalize_letters
from sparsedoctor_kernels.eval.loaders import CMMLU_MED_SUBJECTS, load_benchmark, load_cmb_key_items
from sparsedoctor_kernels.eval.runner import evaluate
from sparsedoctor_kernels.eval.scoring import score


def load_model(model: str, adapter: str | None, tokenizer_path: str | None, device: str, seed: int = 0):
    """(model, tokenizer): `tiny` or a local Hugging Face directory, plus an optional SparseDoctor adapter."""
    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor, load_adapter

    adapter_dir = pathlib.Path(adapter) if adapter else None
    if tokenizer_path is None and adapter_dir is not None and (adapter_dir.parent / "tokenizer").is_dir():
        tokenizer_path = str(adapter_dir.parent / "tokenizer")  # a training run's layout
    if model == "tiny":
        from sparsedoctor_kernels.data import build_tokenizer, corpus, demo_records
        from sparsedoctor_kernels.model.tiny import tiny_qwen3

        if tokenizer_path:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        else:
            tokenizer = build_tokenizer(corpus(demo_records()))
        base = tiny_qwen3(vocab_size=len(tokenizer), seed=seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not pathlib.Path(model).is_dir():
            raise FileNotFoundError(f"--model must be 'tiny' or a local Hugging Face model directory; {model} is not")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if device == "cuda" else None)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if adapter_dir is not None:
        described = json.loads((adapter_dir / "adapter_config.json").read_text())
        torch.manual_seed(seed)
        base = apply_sparsedoctor(base, SparseDoctorConfig.from_dict(described["sparsedoctor"]))
        load_adapter(base, adapter_dir)
    return base.to(device).eval(), tokenizer


def report_markdown(benchmark: str, result: dict, title: str) -> str:
    lines = [f"# {title}", "", f"overall accuracy: **{result['accuracy']:.4f}** ({result['correct']}/{result['n']})"]
    if benchmark == "cmb":
        lines += ["", f"macro accuracy over exam types: **{result['macro_accuracy']:.4f}**", "",
                  "| exam type | exam class | accuracy |", "| --- | --- | --- |"]
        for exam_type, group in result["by_group"].items():
            for exam_class, accuracy in group["classes"].items():
                lines.append(f"| {exam_type} | {exam_class} | {accuracy:.4f} |")
            lines.append(f"| **{exam_type}** | (mean of classes) | **{group['accuracy']:.4f}** |")
    else:
        label = "subject" if benchmark == "cmmlu-med" else "clinical department"
        lines += ["", f"| {label} | accuracy |", "| --- | --- |"]
        for group, accuracy in result["by_group"].items():
            name = CMMLU_MED_SUBJECTS.get(group, "")
            lines.append(f"| {group}{f' ({name})' if name else ''} | {accuracy:.4f} |")
    return "\n".join(lines) + "\n"


def _write_report(output: pathlib.Path, benchmark: str, result: dict, title: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "report.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (output / "report.md").write_text(report_markdown(benchmark, result, title), encoding="utf-8")


def run_eval(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    items = load_benchmark(args.benchmark, args.data, split=args.split, subjects=args.subjects,
                           answers=args.answers)
    if args.limit:
        items = items[: args.limit]
    shots = {}
    if args.shots:
        if args.benchmark != "cmmlu-med":
            raise EvalDataError(f"--shots {args.shots}: few-shot examples come from CMMLU's dev split; "
                                f"{args.benchmark} has none here")
        for item in load_benchmark("cmmlu-med", args.data, split="dev", subjects=args.subjects):
            shots.setdefault(item.subject, [])
            if len(shots[item.subject]) < args.shots:
                shots[item.subject].append(item)
    model, tokenizer = load_model(args.model, args.adapter, args.tokenizer, device, seed=args.seed)
    records = evaluate(model, tokenizer, args.benchmark, items, shots=shots, mode=args.mode,
                       batch_size=args.batch_size, progress=not args.no_progress)
    output = pathlib.Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with (output / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    title = f"{args.benchmark} ({args.split if args.benchmark == 'cmmlu-med' else 'test'}), model {args.model}" + (
        f" + adapter {args.adapter}" if args.adapter else "") + f", {args.shots}-shot, {args.mode}"
    if all(item.answer for item in items):
        result = score(args.benchmark, items, {r["id"]: r["prediction"] for r in records})
        _write_report(output, args.benchmark, result, title)
        print(report_markdown(args.benchmark, result, title))
    else:
        print(f"{sum(not i.answer for i in items)} item(s) have no answer: predictions written, not scored "
              f"(score them with --score --answers KEY)")
    print(f"predictions: {output / 'predictions.jsonl'}")
    return 0


def read_predictions(path) -> dict[str, str]:
    from sparsedoctor_kernels.data import DataError, iter_jsonl

    predictions = {}
    try:
        for number, record in iter_jsonl(path):
            if not isinstance(record, dict) or "id" not in record or "prediction" not in record:
                raise EvalDataError(f"{path}:{number}: expected {{\"id\": ..., \"prediction\": \"B\"}}")
            predictions[str(record["id"])] = normalize_letters(record["prediction"])
    except DataError as error:
        raise EvalDataError(str(error)) from None
    return predictions


def run_score(args) -> int:
    if not args.predictions:
        raise EvalDataError("--score needs --predictions P.jsonl")
    predictions = read_predictions(args.predictions)
    if args.benchmark == "cmb" and args.data is None:
        if not args.answers:
            raise EvalDataError("--score --benchmark cmb needs --answers CMB-test-choice-answer.json")
        items = load_cmb_key_items(args.answers)  # the key carries the exam metadata the grouping needs
    else:
        items = load_benchmark(args.benchmark, args.data, split=args.split, subjects=args.subjects,
                               answers=args.answers)
    result = score(args.benchmark, items, predictions)
    title = f"{args.benchmark}: {args.predictions}"
    if args.output_dir:
        _write_report(pathlib.Path(args.output_dir), args.benchmark, result, title)
    print(report_markdown(args.benchmark, result, title))
    return 0
