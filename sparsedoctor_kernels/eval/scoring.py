"""score(): exact set match of answer letters, overall and per group (CMB: the official aggregation)."""

from __future__ import annotations

from collections import defaultdict

from sparsedoctor_kernels.eval.items import MCQ, normalize_letters


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def score(benchmark: str, items: list[MCQ], predictions: dict[str, str]) -> dict:
    """A prediction is right when its set of letters equals the answer's (order and case ignored; missing
    counts as wrong). Returns {"accuracy", "n", "correct", "by_group"}. `by_group`: per subject (CMMLU-Med) or
    clinical department (CMExam); for CMB, per exam_type the macro-average of its exam_class accuracies, with
    the classes listed."""
    right = {}
    for item in items:
        if not item.answer:
            raise ValueError(f"item {item.id} has no answer; load CMB with answers=<the official key>")
        right[item.id] = normalize_letters(predictions.get(item.id, "")) == item.answer
    result = {"accuracy": _mean(right.values()), "n": len(items), "correct": sum(right.values())}
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
