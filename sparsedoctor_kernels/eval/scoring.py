"""score(): exact set match of answer letters, overall and per group (CMB: the official aggregation)."""

from __future__ import annotations

import warnings
from collections import defaultdict

from sparsedoctor_kernels.eval.answers import extract_answer
from sparsedoctor_kernels.eval.items import MCQ


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _warn_unscored(unknown_ids: list[str], missing: list[str], no_answer: list[str]) -> None:
    """One warning for everything that silently lowers or escapes the score: ids of another data set, a
    truncated predictions file, outputs the extractor cannot read."""
    def examples(ids):
        return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")

    parts = []
    if unknown_ids:
        parts.append(f"{len(unknown_ids)} prediction id(s) match no item, ignored (e.g. {examples(unknown_ids)})")
    if missing:
        parts.append(f"{len(missing)} item(s) have no prediction, counted wrong (e.g. {examples(missing)})")
    if no_answer:
        parts.append(f"{len(no_answer)} prediction(s) hold no answer letter, counted wrong "
                     f"(e.g. {examples(no_answer)})")
    if parts:
        warnings.warn("score: " + "; ".join(parts), stacklevel=3)


def _grade(items: list[MCQ], predictions: dict[str, str], exact: bool) -> tuple[dict[str, bool], list[str]]:
    """item id -> right, and the ids whose prediction holds no answer."""
    right, no_answer = {}, []
    for item in items:
        if not item.answer:
            raise ValueError(f"item {item.id} has no answer; load CMB with answers=<the official key>")
        if item.id not in predictions:
            right[item.id] = False
            continue
        # exact: the prediction is the letters a reference's own reading gave, compared as its script does.
        letters = predictions[item.id] if exact else extract_answer(predictions[item.id], "".join(item.options) or None)
        if not letters:
            no_answer.append(item.id)
        right[item.id] = letters == item.answer
    return right, no_answer


def score(benchmark: str, items: list[MCQ], predictions: dict[str, str], *, exact: bool = False) -> dict:
    """`predictions` maps an item id to its prediction: letters ("B", "ac") or a model's text ("答案：B",
    "The answer is (C)"), read by `extract_answer` with the item's option letters. A prediction is right when
    its set of letters equals the answer's; missing or unreadable counts as wrong. Returns {"accuracy", "n",
    "correct", "by_group", "unknown_ids", "missing", "no_answer"} (the last three are counts, also warned
    about). `by_group`: per subject (CMMLU-Med) or clinical department (CMExam); for CMB, per exam_type the
    macro-average of its exam_class accuracies, with the classes listed. `exact`: predictions are letters read
    by a reference protocol's own rules, right only when equal to the answer as written (CMB's exact match)."""
    predictions = {str(key): value for key, value in predictions.items()}
    right, no_answer = _grade(items, predictions, exact)
    unknown_ids = sorted(set(predictions) - set(right))
    missing = [item.id for item in items if item.id not in predictions]
    _warn_unscored(unknown_ids, missing, no_answer)
    result = {"accuracy": _mean(right.values()), "n": len(items), "correct": sum(right.values()),
              "unknown_ids": len(unknown_ids), "missing": len(missing), "no_answer": len(no_answer)}
    if benchmark == "cmb":
        by_class = defaultdict(list)
        for item in items:
            by_class[(item.meta.get("exam_type", ""), item.meta.get("exam_class", ""))].append(right[item.id])
        by_type = defaultdict(dict)
        for (exam_type, exam_class), hits in sorted(by_class.items()):
            by_type[exam_type][exam_class] = _mean(hits)
        result["by_group"] = {exam_type: {"accuracy": _mean(classes.values()), "classes": classes}
                              for exam_type, classes in by_type.items()}
        result["macro_accuracy"] = _mean(group["accuracy"] for group in result["by_group"].values())
    else:
        groups = defaultdict(list)
        for item in items:
            groups[item.subject].append(right[item.id])
        result["by_group"] = {subject: _mean(hits) for subject, hits in sorted(groups.items())}
    return result
