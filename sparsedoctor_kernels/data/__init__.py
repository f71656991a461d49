"""Training data: JSONL records, prompts, the bundled demo set and a tokenizer built from text.

Two record kinds, one JSON object a line:
- instruction: {"instruction": "...", "response": "..."}
- multiple choice: {"question": "...", "options": {"A": "...", "B": "...", ...} or ["...", ...], "answer": "B"}
Loss is on response tokens only (for multiple choice, the answer letter and its text).
"""

from __future__ import annotations

import json
import pathlib
import random

from sparsedoctor_kernels.data.facts import FACTS

LETTERS = "ABCDEFGHIJ"


class DataError(ValueError):
    """A record that is not one of the two kinds, named by file and line."""


def normalize_options(options) -> dict[str, str]:
    if isinstance(options, list):
        options = dict(zip(LETTERS, options))
    if not isinstance(options, dict) or not options or not all(isinstance(v, str) for v in options.values()):
        raise DataError(f"options must be a non-empty list or letter->text mapping of strings, got {options!r}")
    return {str(k).strip().upper(): v for k, v in options.items()}


def multiple_choice_prompt(question: str, options) -> str:
    lines = [f"以下是单项选择题，请选出正确答案。\n{question}"]
    lines += [f"{letter}. {text}" for letter, text in normalize_options(options).items()]
    return "\n".join(lines) + "\n答案："


def format_example(record: dict) -> tuple[str, str]:
    """(prompt, response) of a record of either kind."""
    if "instruction" in record:
        if not isinstance(record.get("response"), str):
            raise DataError("an instruction record needs a string 'response'")
        return f"问题：{record['instruction']}\n回答：", record["response"]
    if "question" in record:
        options = normalize_options(record.get("options"))
        answer = str(record.get("answer", "")).strip().upper()
        if answer not in options:
            raise DataError(f"answer {record.get('answer')!r} is not one of the options {list(options)}")
        return multiple_choice_prompt(record["question"], options), f"{answer}. {options[answer]}"
    raise DataError(f"a record needs 'instruction'+'response' or 'question'+'options'+'answer', got keys "
                    f"{sorted(record)}")


def iter_jsonl(path: str | pathlib.Path):
    """(line number, object) for every non-empty line; malformed JSON raises DataError naming file and line."""
    path = pathlib.Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: malformed JSON ({error.msg})") from None


def load_jsonl(path: str | pathlib.Path) -> list[dict]:
    records = []
    for number, record in iter_jsonl(path):
        try:
            format_example(record)
        except DataError as error:
            raise DataError(f"{path}:{number}: {error}") from None
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def write_jsonl(records: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def demo_records(seed: int = 0) -> list[dict]:
    """The bundled Chinese medical QA set (300 records), generated deterministically from `facts.FACTS`:
    four instruction records and two multiple-choice records per condition."""
    rng = random.Random(seed)
    records = []
    for index, (name, department, presentation, exam, treatment) in enumerate(FACTS):
        records += [
            {"instruction": f"患者{presentation}，最可能的诊断是什么？",
             "response": f"最可能的诊断是{name}，属于{department}疾病。"},
            {"instruction": f"{name}有哪些典型表现？", "response": f"{name}的典型表现是{presentation}。"},
            {"instruction": f"{name}的关键检查是什么？", "response": f"{name}的关键检查是{exam}。"},
            {"instruction": f"{name}的首选治疗是什么？", "response": f"{name}的首选治疗是{treatment}。"},
        ]
        others = [i for i in range(len(FACTS)) if i != index]
        for question, column, truth in ((f"患者{presentation}，最可能的诊断是", 0, name),
                                        (f"{name}的首选治疗是", 4, treatment)):
            choices = [FACTS[i][column] for i in rng.sample(others, 3)] + [truth]
            rng.shuffle(choices)
            options = dict(zip(LETTERS, choices))
            records.append({"question": question, "options": options,
                            "answer": LETTERS[choices.index(truth)]})
    return records


def build_tokenizer(texts: list[str], vocab_size: int = 1500):
    """A byte-level BPE tokenizer trained on `texts` with the `tokenizers` library, wrapped for transformers
    (pad and eos tokens set). Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def corpus(records: list[dict]) -> list[str]:
    return ["".join(format_example(r)) for r in records]
