"""Loaders of CMMLU-Med (CMMLU's CSV layout), CMB (its exam JSON schema) and CMExam (its CSV)."""

from __future__ import annotations

import csv
import io
import json
import pathlib
import warnings

from sparsedoctor_kernels.eval.answers import normalize_letters
from sparsedoctor_kernels.eval.files import read_text
from sparsedoctor_kernels.eval.items import MCQ, EvalDataError

# The seven medical subjects used with the HuatuoGPT baselines, and their Chinese names for the prompts.
CMMLU_MED_SUBJECTS = {
    "anatomy": "解剖学", "clinical_knowledge": "临床知识", "college_medicine": "大学医学", "genetics": "遗传学",
    "nutrition": "营养学", "traditional_chinese_medicine": "中医中药", "virology": "病毒学",
}
CMMLU_COLUMNS = ("Question", "A", "B", "C", "D", "Answer")


def _read_csv(path: pathlib.Path, required: tuple[str, ...]) -> list[dict]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise EvalDataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)
    except csv.Error as error:
        raise EvalDataError(f"{path}:{reader.line_num}: malformed CSV ({error})") from None


def load_cmmlu(root, split: str = "test", subjects=None) -> list[MCQ]:
    root = pathlib.Path(root)
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    if not root.is_dir():
        raise EvalDataError(f"--data {root}: expected the CMMLU root directory (with dev/ and test/)")
    # A subject named twice would give every one of its items twice, under the same ids.
    subjects = list(dict.fromkeys(subjects)) if subjects is not None else list(CMMLU_MED_SUBJECTS)
    items = []
    for subject in subjects:
        path = root / split / f"{subject}.csv"
        for index, row in enumerate(_read_csv(path, CMMLU_COLUMNS)):
            answer = normalize_letters(row["Answer"])
            if len(answer) != 1 or answer not in "ABCD":
                raise EvalDataError(f"{path}: row {index + 2}: answer {row['Answer']!r} is not one of A-D")
            # The fields as written, for protocols that reproduce a reference's prompt byte for byte.
            raw = {column: row[column] for column in ("Question", "A", "B", "C", "D")}
            items.append(MCQ(id=f"{subject}/{index}", question=row["Question"].strip(),
                             options={letter: row[letter].strip() for letter in "ABCD"}, answer=answer,
                             subject=subject, meta={"raw": raw}))
    return items


def _load_json_list(path: pathlib.Path) -> list[dict]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise EvalDataError(f"{path}: malformed JSON at {where}: {error.msg}") from None
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise EvalDataError(f"{path}: entry {index}: expected a JSON object, got {type(entry).__name__}")
    return data


def load_cmb_answers(path) -> dict[str, str]:
    path = pathlib.Path(path)
    key = {}
    for index, entry in enumerate(_load_json_list(path)):
        if not isinstance(entry, dict) or "id" not in entry or "answer" not in entry:
            raise EvalDataError(f"{path}: entry {index}: needs 'id' and 'answer'")
        key[str(entry["id"])] = normalize_letters(entry["answer"])
    return key


def load_cmb_key_items(path) -> list[MCQ]:
    """Items from the official answer key alone (ids, exam metadata, answers; no question text or options):
    enough to score a predictions file with the official grouping."""
    path = pathlib.Path(path)
    items = []
    for index, entry in enumerate(_load_json_list(path)):
        missing = [f for f in ("id", "exam_type", "exam_class", "answer") if f not in entry]
        if missing:
            raise EvalDataError(f"{path}: entry {index}: missing field(s) {missing}")
        meta = {k: entry.get(k, "") for k in ("exam_type", "exam_class", "exam_subject", "question_type")}
        items.append(MCQ(id=str(entry["id"]), question="", options={}, answer=normalize_letters(entry["answer"]),
                         subject=str(entry.get("exam_subject", "")), meta=meta))
    return items


def load_cmb(path, answers=None) -> list[MCQ]:
    path = pathlib.Path(path)
    key = load_cmb_answers(answers) if answers is not None else {}
    items = []
    for index, entry in enumerate(_load_json_list(path)):
        where = f"{path}: entry {index}"
        missing = [f for f in ("id", "exam_type", "exam_class", "question_type", "question", "option")
                   if f not in entry]
        if missing:
            raise EvalDataError(f"{where}: missing field(s) {missing}")
        if not isinstance(entry["option"], dict):
            raise EvalDataError(f"{where}: 'option' must map letters to texts, got {type(entry['option']).__name__}")
        options = {str(k).strip().upper(): str(v).strip() for k, v in entry["option"].items() if str(v).strip()}
        item_id = str(entry["id"])
        answer = key.get(item_id, normalize_letters(entry.get("answer", "")))
        unknown = set(answer) - set(options)
        if unknown:
            raise EvalDataError(f"{where} (id {item_id}): answer letter(s) {sorted(unknown)} not among the "
                                f"options {list(options)}")
        meta = {k: entry.get(k, "") for k in ("exam_type", "exam_class", "exam_subject", "question_type")}
        meta["raw"] = {"Question": str(entry["question"])}
        meta["raw_options"] = {str(k).strip().upper(): str(v) for k, v in entry["option"].items()}
        items.append(MCQ(id=item_id, question=str(entry["question"]).strip(), options=options, answer=answer,
                         subject=str(entry.get("exam_subject", "")), meta=meta))
    return items


def _parse_cmexam_options(text: str, where: str) -> dict[str, str]:
    options = {}
    for line in str(text).splitlines():
        line = line.strip()
        if not line:
            continue
        letter, _, body = line.partition(" ")
        if len(letter) != 1 or not letter.isalpha():
            raise EvalDataError(f"{where}: option line {line!r} does not start with a letter and a space")
        options[letter.upper()] = body.strip()
    if not options:
        raise EvalDataError(f"{where}: no options")
    return options


def load_cmexam(path) -> list[MCQ]:
    path = pathlib.Path(path)
    items, skipped = [], 0
    for index, row in enumerate(_read_csv(path, ("Question", "Options", "Answer"))):
        where = f"{path}: row {index + 2}"
        answer = normalize_letters(row.get("Answer") or "")
        if not answer:
            skipped += 1
            continue
        options = _parse_cmexam_options(row["Options"], where)
        unknown = set(answer) - set(options)
        if unknown:
            raise EvalDataError(f"{where}: answer letter(s) {sorted(unknown)} not among the options {list(options)}")
        meta = {k: row.get(k, "") for k in ("Explanation", "Disease Group", "Clinical Department",
                                             "Medical Discipline", "Competency", "Difficulty level")}
        meta["raw"] = {"Question": row["Question"], "Options": row["Options"]}
        items.append(MCQ(id=str(index), question=row["Question"].strip(), options=options, answer=answer,
                         subject=row.get("Clinical Department", "") or "", meta=meta))
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} row(s) without an answer", stacklevel=2)
    return items


def load_benchmark(name: str, path, *, split: str = "test", subjects=None, answers=None) -> list[MCQ]:
    """`name` is 'cmmlu-med' (path: the CMMLU root with dev/ and test/), 'cmb' (path: the exam JSON; `answers`:
    the official key JSON) or 'cmexam' (path: the CSV)."""
    if name == "cmmlu-med":
        return load_cmmlu(path, split=split, subjects=subjects)
    if name == "cmb":
        return load_cmb(path, answers=answers)
    if name == "cmexam":
        return load_cmexam(path)
    raise ValueError(f"unknown benchmark {name!r}; expected 'cmmlu-med', 'cmb' or 'cmexam'")
