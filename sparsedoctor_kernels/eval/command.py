"""`sparsedoctor eval`: evaluate a model (with or without an adapter) on a benchmark, or score a predictions
file. Writes predictions.jsonl, report.json and report.md into the output directory (with --score, only when
--output-dir is given). User errors raise EvalDataError naming the file, line or flag."""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import re

import torch

from sparsedoctor_kernels._util.files import write_atomically
from sparsedoctor_kernels.eval.files import output_directory, read_text
from sparsedoctor_kernels.eval.items import MCQ, EvalDataError
from sparsedoctor_kernels.eval.loaders import CMMLU_MED_SUBJECTS, load_benchmark, load_cmb_key_items
from sparsedoctor_kernels.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS
from sparsedoctor_kernels.eval.runner import (
    DEFAULT_MAX_NEW_TOKENS,
    THINKING_MAX_NEW_TOKENS,
    evaluate,
    model_max_length,
)
from sparsedoctor_kernels.eval.scoring import score

DEFAULT_OUTPUT_DIR = "sparsedoctor-eval"


def positive_int(text: str) -> int:
    """argparse type of --limit, --batch-size and --max-new-tokens (0 or a negative count would silently mean
    something else)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_adapter(adapter) -> dict:
    """The adapter directory's config, read and checked (no pickle files, both files there, every field valid)
    before any data or model is loaded; a bad adapter is an EvalDataError naming --adapter."""
    from sparsedoctor_kernels.model.adapter import read_adapter_config

    try:
        return read_adapter_config(adapter)
    except (OSError, ValueError, TypeError) as error:
        raise EvalDataError(f"--adapter {adapter}: {error}") from None


def check_model_dir(model: str) -> None:
    """`tiny`, or a directory that at least looks like a Hugging Face model (config.json)."""
    if model == "tiny":
        return
    path = pathlib.Path(model)
    if not path.is_dir():
        raise EvalDataError(f"--model {model}: must be 'tiny' or a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise EvalDataError(f"--model {model}: no config.json there, so not a Hugging Face model directory")


@contextlib.contextmanager
def _user_error(flag: str, value):
    """Loading errors caused by the files a flag names (ValueError, OSError, KeyError from transformers or
    safetensors) as one EvalDataError naming the flag."""
    try:
        yield
    except EvalDataError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise EvalDataError(f"{flag} {value}: cannot be loaded ({message})") from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model: str, adapter: str | None, tokenizer_path: str | None, device: str, seed: int = 0,
               dtype: str = "auto"):
    """(model, tokenizer): `tiny` or a local Hugging Face directory, loaded as train/loading.py loads them
    (`dtype`, or for "auto" bfloat16 on CUDA and float32 elsewhere; EOS pads where there is no pad token), plus
    an optional SparseDoctor adapter (SparseDoctorModel.from_pretrained), on `device`, in eval mode."""
    from sparsedoctor_kernels.model import SparseDoctorModel
    from sparsedoctor_kernels.train.loading import load_causal_lm, load_tokenizer

    adapter_dir = pathlib.Path(adapter) if adapter else None
    if tokenizer_path is None and adapter_dir is not None and (adapter_dir.parent / "tokenizer").is_dir():
        tokenizer_path = str(adapter_dir.parent / "tokenizer")  # a training run's layout
    check_model_dir(model)
    with _user_error("--tokenizer" if tokenizer_path else "--model", tokenizer_path or model):
        tokenizer = load_tokenizer(model, tokenizer=tokenizer_path)
    with _user_error("--model", model):
        base = load_causal_lm(model, tokenizer, device=device, seed=seed, dtype=DTYPES.get(dtype))
    if adapter_dir is not None:
        check_adapter(adapter_dir)
        with _user_error("--adapter", adapter_dir):
            base = SparseDoctorModel.from_pretrained(base, adapter_dir)
        if dtype in DTYPES:  # the adapter's parameters load in float32: the whole model in the asked dtype
            base = base.to(DTYPES[dtype])
    return base.eval(), tokenizer


def _unscored_lines(result: dict) -> list[str]:
    parts = [f"{result[key]} {what}" for key, what in (
        ("unknown_ids", "prediction id(s) match no item (ignored)"),
        ("missing", "item(s) have no prediction (counted wrong)"),
        ("no_answer", "prediction(s) hold no answer letter (counted wrong)")) if result.get(key)]
    return ["", "warning: " + "; ".join(parts)] if parts else []


def report_markdown(benchmark: str, result: dict, title: str) -> str:
    lines = [f"# {title}", "", f"overall accuracy: **{result['accuracy']:.4f}** ({result['correct']}/{result['n']})"]
    if "acc_norm" in result:
        lines.append(f"acc_norm (lm-eval's: log-likelihood per character of the option; the same picks as acc when "
                     f"every option is one letter): **{result['acc_norm']:.4f}**")
    if "protocol" in result:
        lines.append(f"protocol: `{result['protocol']}` ({result['protocol_source']}), {result['shots']}-shot, "
                     f"dtype {result['dtype']}")
    lines += _unscored_lines(result)
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
    write_atomically(output / "report.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    write_atomically(output / "report.md", report_markdown(benchmark, result, title))


def _check_eval_flags(args) -> None:
    """The flag errors that need no data, so they surface before the output directory or any loading."""
    if args.data is None:
        raise EvalDataError("--data is required to run a model (the CMMLU root, CMB question JSON or CMExam CSV)")
    if args.subjects and args.benchmark != "cmmlu-med":
        raise EvalDataError(f"--subjects applies to cmmlu-med only, not {args.benchmark}")
    if args.shots and args.benchmark != "cmmlu-med":
        raise EvalDataError(f"--shots {args.shots}: few-shot examples come from CMMLU's dev split; "
                            f"{args.benchmark} has none here")
    check_model_dir(args.model)
    for flag, value in (("--adapter", args.adapter), ("--tokenizer", args.tokenizer)):
        if value is not None and not pathlib.Path(value).is_dir():
            raise EvalDataError(f"{flag} {value}: not a directory")
    if args.adapter is not None:
        check_adapter(args.adapter)
    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        raise EvalDataError(f"--device {args.device}: CUDA is not available here")
    protocol = resolve_protocol(args)
    if args.harness and protocol not in ("lm-eval", "cmb", "cmexam"):
        raise EvalDataError(f"--harness lm-eval runs lm-eval's own protocol (cmmlu-med), or the official one of cmb "
                            f"and cmexam as an lm-eval task: not --protocol {protocol}")
    if args.harness and args.split != "test":
        raise EvalDataError("--harness lm-eval evaluates the test split (lm-eval's cmmlu tasks take their shots "
                            "from dev): drop --split dev")
    if args.enable_thinking and not args.chat_template:
        raise EvalDataError("--enable-thinking is passed to the chat template: it needs --chat-template")
    if args.enable_thinking and args.mode != "generate":
        raise EvalDataError("--enable-thinking needs --mode generate: in logits mode the option letters are scored "
                            "at the first assistant token, which a thinking model spends on <think>")


def resolve_protocol(args) -> str:
    """--protocol, or the benchmark's reference protocol; the library's own where its flags ask for it."""
    own_flags = [flag for flag, on in (("--chat-template", args.chat_template), ("--enable-thinking",
                 args.enable_thinking), ("--mode generate", args.mode == "generate")) if on]
    protocol = args.protocol or ("sparsedoctor" if own_flags else DEFAULT_PROTOCOL[args.benchmark])
    if protocol != "sparsedoctor" and own_flags:
        raise EvalDataError(f"--protocol {protocol} fixes its prompt and scoring: {', '.join(own_flags)} belong "
                            f"to --protocol sparsedoctor")
    if not PROTOCOLS[protocol].applies_to(args.benchmark):
        raise EvalDataError(f"--protocol {protocol} is for {', '.join(PROTOCOLS[protocol].benchmarks)}, not "
                            f"{args.benchmark}")
    return protocol


def _limited(items: list, limit: int | None, per_subject: bool) -> list:
    """The first `limit` items, of each subject when `per_subject` (so --limit never drops a requested
    subject)."""
    if not limit:
        return items
    if not per_subject:
        return items[:limit]
    taken: dict[str, int] = {}
    kept = []
    for item in items:
        if taken.get(item.subject, 0) < limit:
            kept.append(item)
            taken[item.subject] = taken.get(item.subject, 0) + 1
    return kept


def _few_shot_examples(args) -> dict[str, list]:
    shots: dict[str, list] = {}
    if args.shots:
        for item in load_benchmark("cmmlu-med", args.data, split="dev", subjects=args.subjects):
            shots.setdefault(item.subject, [])
            if len(shots[item.subject]) < args.shots:
                shots[item.subject].append(item)
    return shots


def max_new_tokens(args) -> int:
    """--max-new-tokens, or its default: room for a short answer, or for the reasoning with --enable-thinking."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return THINKING_MAX_NEW_TOKENS if args.enable_thinking else DEFAULT_MAX_NEW_TOKENS


def _eval_title(args) -> str:
    prompting = (", chat template" + (" (thinking)" if args.enable_thinking else "")) if args.chat_template else ""
    return f"{args.benchmark} ({args.split if args.benchmark == 'cmmlu-med' else 'test'}), model {args.model}" + (
        f" + adapter {args.adapter}" if args.adapter else "") + (
        f", protocol {resolve_protocol(args)}" + (" (lm-evaluation-harness itself)" if args.harness else "")
        + f", {args.shots}-shot" + (f", {args.mode}{prompting}" if resolve_protocol(args) == "sparsedoctor" else ""))


def _described(result: dict, args, model) -> dict:
    """The result with what produced it: protocol, its source, shots, dtype, model and adapter."""
    protocol = resolve_protocol(args)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {**result, "benchmark": args.benchmark, "protocol": protocol, "protocol_source": PROTOCOLS[protocol].source
            + (" (run by lm-evaluation-harness)" if args.harness else ""), "shots": args.shots, "dtype": dtype,
            "model": args.model, "adapter": args.adapter, "split": args.split if args.benchmark == "cmmlu-med"
            else "test", "mode": args.mode, "chat_template": args.chat_template}


def _acc_norm(records: list[dict]) -> float:
    """lm-eval's acc_norm: the option whose log-likelihood per character of its continuation is largest."""
    hits = []
    for record in records:
        scores = {letter: value / len(letter) for letter, value in record["log_probs"].items()}
        best = max(scores.values())
        hits.append(next(letter for letter, value in scores.items() if value == best) == record["answer"])
    return sum(hits) / len(hits) if hits else 0.0


def _records_from_harness(args, model, tokenizer, items: list, output: pathlib.Path) -> list[dict]:
    """lm-evaluation-harness run on the model, its results and samples saved under output/lm-eval/, and its
    picks as our records (CMMLU-Med: the log-likelihoods per letter included; CMB, CMExam: the reply and the
    official protocol's reading of it)."""
    from sparsedoctor_kernels.eval.harness import (
        run_lm_eval,
        sample_prediction,
        write_cmmlu_tasks,
        write_generation_task,
    )

    directory = output / "lm-eval" / "tasks"
    if args.benchmark == "cmmlu-med":
        subjects = list(dict.fromkeys(item.subject for item in items))
        tasks = write_cmmlu_tasks(args.data, directory, subjects)
        limit = args.limit
    else:  # the items as loaded (answers merged, --limit applied) are the task's data
        subjects = [""]
        tasks = [write_generation_task(args.benchmark, items, directory, max_new_tokens=max_new_tokens(args))]
        limit = None
    results = run_lm_eval(model, tokenizer, tasks, directory, num_fewshot=args.shots, batch_size=args.batch_size,
                          limit=limit)
    protocol = PROTOCOLS[resolve_protocol(args)]
    by_id = {item.id: item for item in items}
    records = []
    for task, subject in zip(tasks, subjects):
        samples = results["samples"][task]
        write_atomically(output / "lm-eval" / f"samples_{task}.jsonl", "".join(
            json.dumps(sample, ensure_ascii=False, default=str) + "\n" for sample in samples))
        for sample in samples:
            if args.benchmark != "cmmlu-med":  # the task's rows are the items, in order
                item = items[sample["doc_id"]]
                reply = str(sample["filtered_resps"][0])
                prediction = protocol.extract(reply, item)
                records.append({"id": item.id, "subject": item.subject, "prediction": prediction,
                                "answer": item.answer, "correct": prediction == item.answer, "method": "generate",
                                "protocol": protocol.name, "output": reply})
                continue
            item = by_id[f"{subject}/{sample['doc_id']}"]
            prediction = sample_prediction(sample)
            log_probs = {letter: float(response[0]) for letter, response in zip(item.options, sample["filtered_resps"])}
            records.append({"id": item.id, "subject": subject, "prediction": prediction, "answer": item.answer,
                            "correct": prediction == item.answer, "method": "loglikelihood",
                            "protocol": protocol.name, "log_probs": log_probs})
    summary = {key: value for key, value in results.items() if key in ("results", "versions", "n-shot", "config")}
    write_atomically(output / "lm-eval" / "results.json", json.dumps(summary, ensure_ascii=False, indent=2,
                                                                      default=str) + "\n")
    return records


def _check_loaded(args, model, tokenizer) -> None:
    """The flag errors that only the loaded model and tokenizer can show."""
    if args.chat_template and not getattr(tokenizer, "chat_template", None):
        source = f"--tokenizer {args.tokenizer}" if args.tokenizer else f"--model {args.model}"
        raise EvalDataError(f"--chat-template: the tokenizer of {source} has no chat template (pass --tokenizer "
                            f"with one, or drop --chat-template)")
    positions = model_max_length(model)
    if max_new_tokens(args) >= positions:
        raise EvalDataError(f"--max-new-tokens {max_new_tokens(args)}: leaves no room for a prompt in the model's "
                            f"{positions} positions")


def run_eval(args) -> int:
    _check_eval_flags(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with output_directory(args.output_dir or DEFAULT_OUTPUT_DIR) as output:
        items = load_benchmark(args.benchmark, args.data, split=args.split, subjects=args.subjects,
                               answers=args.answers)
        items = _limited(items, args.limit, per_subject=args.benchmark == "cmmlu-med")
        if not items:
            raise EvalDataError(f"--data {args.data}: no questions to evaluate")
        shots = _few_shot_examples(args)
        model, tokenizer = load_model(args.model, args.adapter, args.tokenizer, device, seed=args.seed,
                                      dtype=args.dtype)
        _check_loaded(args, model, tokenizer)
        protocol = resolve_protocol(args)
        if args.harness:
            records = _records_from_harness(args, model, tokenizer, items, output)
        else:
            records = evaluate(model, tokenizer, args.benchmark, items, shots=shots, mode=args.mode,
                               batch_size=args.batch_size, max_new_tokens=max_new_tokens(args),
                               chat_template=args.chat_template, enable_thinking=args.enable_thinking,
                               progress=not args.no_progress, protocol=protocol)
        scored = all(item.answer for item in items)
        result = None
        if scored:
            # A reference's own reading of a reply is final (CMB's exact string match); ours extracts letters.
            exact = PROTOCOLS[protocol].extract is not None
            result = _described(score(args.benchmark, items, {r["id"]: r["prediction"] for r in records},
                                      exact=exact), args, model)
            if protocol == "lm-eval":
                result["acc_norm"] = _acc_norm(records)
        write_atomically(output / "predictions.jsonl",
                         "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        if result is not None:
            _write_report(output, args.benchmark, result, _eval_title(args))
    if result is not None:
        print(report_markdown(args.benchmark, result, _eval_title(args)))
    else:
        print(f"{sum(not i.answer for i in items)} item(s) have no answer: predictions written, not scored "
              f"(score them with --score --answers KEY)")
    print(f"predictions: {output / 'predictions.jsonl'}")
    return 0


def _prediction_text(value, where: str) -> str:
    """A prediction as text: a string, or the list lm-evaluation-harness logs (`filtered_resps`: ["B"])."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_prediction_text(part, where) for part in value)
    raise EvalDataError(f'{where}: "prediction" must be a string or a list of strings, got {type(value).__name__}')


_GENERATION_SAMPLES_FILE = re.compile(r"samples_sparsedoctor_(?P<benchmark>cmb|cmexam)(?:_.*)?\.jsonl$")
_SAMPLES_FILE = re.compile(r"samples_(?:sparsedoctor_)?cmmlu_(?P<subject>[a-z_]+?)(?:_\d{4}-\d\d-\d\dT.*)?\.jsonl$")


def _lm_eval_sample(record: dict, path, where: str) -> dict:
    """An lm-evaluation-harness sample (`--log_samples`) as {"id", "prediction"}: of a CMMLU subject, the subject
    from the file's name (samples_cmmlu_<subject>_<date>.jsonl) and the letter of the largest log-likelihood;
    of the CMB / CMExam tasks `--harness lm-eval` writes, the item's id and the reply."""
    from sparsedoctor_kernels.eval.harness import sample_prediction

    doc = record.get("doc")
    if isinstance(doc, dict) and "id" in doc and "answer" in doc:  # our CMB / CMExam task's: the reply
        reply = _prediction_text(record["filtered_resps"], where)
        ours = _GENERATION_SAMPLES_FILE.search(pathlib.Path(path).name)
        if ours is not None:  # read as the run did: the official protocol's reading
            item = MCQ(id=str(doc["id"]), question=doc["question"], options=json.loads(doc["options"]),
                       answer=doc["answer"], subject=doc["subject"], meta=json.loads(doc["meta"]))
            reply = PROTOCOLS[ours["benchmark"]].extract(reply, item)
        return {"id": str(doc["id"]), "prediction": reply}
    named = _SAMPLES_FILE.search(pathlib.Path(path).name)
    if named is None:
        raise EvalDataError(f"{where}: an lm-evaluation-harness sample, but the file name does not say its task "
                            f"(expected samples_cmmlu_<subject>_<date>.jsonl, as lm-eval writes it)")
    try:
        return {"id": f"{named['subject']}/{int(record['doc_id'])}", "prediction": sample_prediction(record)}
    except (TypeError, ValueError, IndexError, KeyError) as error:
        raise EvalDataError(f"{where}: unreadable lm-evaluation-harness sample ({error})") from None


def _prediction_record(line: str, where: str, path=None) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise EvalDataError(f"{where}: malformed JSON ({error.msg})") from None
    if isinstance(record, dict) and "doc_id" in record and "filtered_resps" in record and "id" not in record:
        return _lm_eval_sample(record, path, where)
    if not isinstance(record, dict) or "id" not in record or "prediction" not in record:
        got = f"an object with keys {sorted(record)}" if isinstance(record, dict) else type(record).__name__
        raise EvalDataError(f'{where}: expected {{"id": ..., "prediction": "B"}}, got {got}')
    return record


def read_predictions(path) -> dict[str, str]:
    """id -> the prediction as written (letters, or a model's text such as "答案：B"): `score` extracts the
    answer with each item's option letters. Errors name the file and line; a UTF-8 BOM is accepted. An
    lm-evaluation-harness samples file of a CMMLU subject gives each doc's pick by log-likelihood."""
    predictions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks at.
    for number, line in enumerate(read_text(path, "--predictions").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        record = _prediction_record(line, where, path)
        item_id = str(record["id"])
        if item_id in first_line:
            raise EvalDataError(f"{where}: id {item_id} already has a prediction on line {first_line[item_id]}")
        first_line[item_id] = number
        predictions[item_id] = _prediction_text(record["prediction"], where)
    if not predictions:
        raise EvalDataError(f"--predictions {path}: holds no predictions")
    return predictions


def _items_to_score(args) -> list:
    """The items a run with the same flags evaluates (--limit included, per subject for CMMLU-Med), with their
    answers."""
    per_subject = args.benchmark == "cmmlu-med"
    if args.benchmark == "cmb" and args.data is None:
        if not args.answers:
            raise EvalDataError("--score --benchmark cmb needs --answers CMB-test-choice-answer.json")
        # The key carries the exam metadata the grouping needs.
        return _limited(load_cmb_key_items(args.answers), args.limit, per_subject)
    if args.data is None:
        raise EvalDataError(f"--score --benchmark {args.benchmark} needs --data (the benchmark with its answers)")
    items = load_benchmark(args.benchmark, args.data, split=args.split, subjects=args.subjects,
                           answers=args.answers)
    items = _limited(items, args.limit, per_subject)
    unanswered = [item.id for item in items if not item.answer]
    if unanswered:
        examples = ", ".join(unanswered[:3]) + (", ..." if len(unanswered) > 3 else "")
        if args.answers:
            raise EvalDataError(f"--answers {args.answers}: the key lacks {len(unanswered)} of the {len(items)} "
                                f"item(s) of --data {args.data} (id(s) {examples})")
        raise EvalDataError(f"--data {args.data}: {len(unanswered)} item(s) have no answer (id(s) {examples}); "
                            f"pass --answers KEY")
    return items


def run_score(args) -> int:
    """Score a predictions file; reports are written only where --output-dir says, else just printed."""
    if not args.predictions:
        raise EvalDataError("--score needs --predictions P.jsonl")
    # The protocol is the file's: lm-eval's for its samples files, the official one for the CMB / CMExam tasks'
    # samples (their reading is final: exact match), else whatever wrote the predictions.
    name = pathlib.Path(args.predictions).name
    generated = _GENERATION_SAMPLES_FILE.search(name)
    if generated is not None:
        protocol = f"{generated['benchmark']} (its lm-eval samples file)"
    elif _SAMPLES_FILE.search(name) is not None:
        protocol = "lm-eval (its samples file)"
    else:
        protocol = "of the predictions file (answers read by letter sets)"
    title = f"{args.benchmark}: {args.predictions}, protocol {protocol}"
    with output_directory(args.output_dir) if args.output_dir else contextlib.nullcontext() as output:
        predictions = read_predictions(args.predictions)
        result = score(args.benchmark, _items_to_score(args), predictions, exact=generated is not None)
        if output is not None:
            _write_report(output, args.benchmark, result, title)
    print(report_markdown(args.benchmark, result, title))
    return 0
