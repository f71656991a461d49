"""lm-evaluation-harness in one command: task files for the local benchmark data, and `lm_eval.simple_evaluate`
run in process on a model (a base with or without a SparseDoctor adapter) through lm-eval's own `HFLM`.

The CMMLU-Med tasks are lm-eval's `cmmlu_<subject>` (lm_eval/tasks/cmmlu: the same template, description,
first-n dev shots, `acc` / `acc_norm`) with the dataset read from the user's CSVs (`dataset_path: csv`, the
hub is not assumed reachable) and named `sparsedoctor_cmmlu_<subject>` (lm-eval refuses a second task of a
built-in's name). They are written for the data folder the user gives, so their paths are the user's.
"""

from __future__ import annotations

import json
import pathlib

from sparsedoctor_kernels.eval.items import EvalDataError
from sparsedoctor_kernels.eval.loaders import CMMLU_MED_SUBJECTS

TASK_PREFIX = "sparsedoctor_cmmlu_"
# lm_eval/tasks/cmmlu/_default_template_yaml (v0.4.4-v0.4.13), the dataset source replaced by local CSVs.
_TEMPLATE = """\
dataset_path: csv
dataset_name: null
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "{{Question.strip()}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{['A', 'B', 'C', 'D'].index(Answer)}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _cache_dir(directory: pathlib.Path) -> str:
    """The `datasets` cache of the tasks' data, beside the task files (not the user's ~/.cache: what a run
    converts stays with its outputs)."""
    return json.dumps(str((directory / "datasets-cache").resolve()))


def write_cmmlu_tasks(data_root, directory, subjects=None) -> list[str]:
    """lm-eval task files (YAML) for the CMMLU-Med subjects of `data_root` (CMMLU's layout: dev/ and test/ CSVs)
    written into `directory`; returns the task names. Pass the directory to lm-eval as `--include_path`."""
    root = pathlib.Path(data_root).resolve()
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "_sparsedoctor_cmmlu_template_yaml").write_text(_TEMPLATE, encoding="utf-8")
    names = []
    for subject in subjects or CMMLU_MED_SUBJECTS:
        files = {split: root / split / f"{subject}.csv" for split in ("test", "dev")}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise EvalDataError(f"--data {data_root}: no {' or '.join(missing)} (CMMLU's dev/ and test/ CSVs)")
        name = TASK_PREFIX + subject
        name_zh = CMMLU_MED_SUBJECTS.get(subject, subject)
        description = f"以下是关于{name_zh}的单项选择题，请直接给出正确答案的选项。\\n\\n"  # YAML escapes
        (directory / f"{name}.yaml").write_text(
            f"include: _sparsedoctor_cmmlu_template_yaml\ntask: {name}\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(files['test']))}\n"
            f"    dev: {json.dumps(str(files['dev']))}\n  cache_dir: {_cache_dir(directory)}\n"
            f"description: \"{description}\"\n", encoding="utf-8")
        names.append(name)
    return names


# CMB and CMExam: their official protocols generate text (`sparsedoctor_kernels.eval.protocols`), so their tasks
# are `generate_until` tasks whose prompt and answer reading are those protocols' (utils.py, written beside them).
_GENERATION_TEMPLATE = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache_dir}
test_split: test
output_type: generate_until
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_new_tokens}
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  protocol: {benchmark}
"""
_GENERATION_UTILS = """\
# Written by sparsedoctor_kernels.eval.harness: the official {benchmark} protocol (prompt and answer reading)
# as sparsedoctor_kernels.eval.protocols implements it, for lm-evaluation-harness.
import json

from sparsedoctor_kernels.eval.items import MCQ
from sparsedoctor_kernels.eval.protocols import get_protocol

PROTOCOL = get_protocol("{benchmark}", "{benchmark}")


def _item(doc):
    return MCQ(id=str(doc["id"]), question=doc["question"], options=json.loads(doc["options"]),
               answer=doc["answer"], subject=doc["subject"], meta=json.loads(doc["meta"]))


def doc_to_text(doc):
    return PROTOCOL.prompt(_item(doc), [])


def process_results(doc, results):
    return {{"acc": float(PROTOCOL.extract(results[0], _item(doc)) == doc["answer"])}}
"""


def write_generation_task(benchmark: str, items: list, directory, *, max_new_tokens: int) -> str:
    """An lm-eval task for CMB or CMExam items (as the library loaded them, answers merged from the key): the
    items as JSON Lines, the task YAML and its utils.py in `directory`. Returns the task's name."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"sparsedoctor_{benchmark}"
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"id": item.id, "question": item.question, "options": json.dumps(
        item.options, ensure_ascii=False), "answer": item.answer, "subject": item.subject, "meta": json.dumps(
        item.meta, ensure_ascii=False)}, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    (directory / f"{name}.yaml").write_text(_GENERATION_TEMPLATE.format(
        name=name, data=json.dumps(str(data.resolve())), max_new_tokens=max_new_tokens, benchmark=benchmark,
        cache_dir=_cache_dir(directory)),
        encoding="utf-8")
    (directory / "utils.py").write_text(_GENERATION_UTILS.format(benchmark=benchmark), encoding="utf-8")
    return name


def run_lm_eval(model, tokenizer, tasks: list[str], include_path, *, num_fewshot: int = 0, batch_size: int = 8,
                limit: int | None = None) -> dict:
    """`lm_eval.simple_evaluate` on the loaded model (lm-eval's HFLM wraps it as it is), the samples logged;
    returns lm-eval's results dictionary ("results" per task, "samples" per task)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise EvalDataError(f"--harness lm-eval needs lm-evaluation-harness (pip install lm_eval): {error}") from None
    from sparsedoctor_kernels.model import SparseDoctorModel

    # lm-eval drives a transformers model (tie_weights, generation config...): a SparseDoctorModel's base model
    # is one, its adapted layers in place (without gradients they compute the adapter's fused inference).
    hf_model = model.base_model if isinstance(model, SparseDoctorModel) else model
    wrapped = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=wrapped, tasks=tasks, num_fewshot=num_fewshot, limit=limit, log_samples=True,
                           task_manager=TaskManager(include_path=str(include_path)), bootstrap_iters=0)


def sample_prediction(sample: dict) -> str:
    """The option letter of a logged lm-eval multiple-choice sample: the first largest log-likelihood of its
    `filtered_resps` ([[ll, is_greedy], ...], numbers or the strings lm-eval's file writer makes of them)."""
    scores = [float(response[0] if isinstance(response, (list, tuple)) else response)
              for response in sample["filtered_resps"]]
    best = max(scores)
    return "ABCDEFGH"[scores.index(best)]
