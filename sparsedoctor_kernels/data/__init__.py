"""Training data: JSONL records, prompts, the bundled demo set and a tokenizer built from text.

Two record kinds, one JSON object a line:
- instruction: {"instruction": "...", "response": "..."}
- multiple choice: {"question": "...", "options": {"A": "...", "B": "...", ...} or ["...", ...], "answer": "B"}
Loss is on response tokens only (for multiple choice, the answer letter and its text): `encode` gives the labels,
`trainable_examples` leaves out the examples that `max_length` cut down to no response token.
"""

from __future__ import annotations

import json
import pathlib
import random

import torch

from sparsedoctor_kernels.data.facts import FACTS

LETTERS = "ABCDEFGHIJ"
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A record that is not one of the two kinds, named by file and line."""


def normalize_options(options) -> dict[str, str]:
    if isinstance(options, list):
        if len(options) > len(LETTERS):
            raise DataError(f"options: {len(options)} given, at most {len(LETTERS)} ({LETTERS[0]}-{LETTERS[-1]})")
        options = dict(zip(LETTERS, options))
    if not isinstance(options, dict) or not options or not all(isinstance(v, str) for v in options.values()):
        raise DataError(f"options must be a non-empty list or letter->text mapping of strings, got {options!r}")
    normalized = {str(k).strip().upper(): v for k, v in options.items()}
    if len(normalized) != len(options):  # "a" and "A" would silently become one option
        raise DataError(f"options name the same letter twice (letters are case-insensitive): {sorted(options)}")
    return normalized


def multiple_choice_prompt(question: str, options) -> str:
    lines = [f"以下是单项选择题，请选出正确答案。\n{question}"]
    lines += [f"{letter}. {text}" for letter, text in normalize_options(options).items()]
    return "\n".join(lines) + "\n答案："


def format_example(record: dict) -> tuple[str, str]:
    """(prompt, response) of a record of either kind."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object (one record a line), got {_json_kind(record)}")
    if "instruction" in record:
        if not isinstance(record["instruction"], str) or not isinstance(record.get("response"), str):
            raise DataError("an instruction record needs a string 'instruction' and a string 'response'")
        return f"问题：{record['instruction']}\n回答：", record["response"]
    if "question" in record:
        if not isinstance(record["question"], str):
            raise DataError("a multiple-choice record needs a string 'question'")
        options = normalize_options(record.get("options"))
        answer = str(record.get("answer", "")).strip().upper()
        if answer not in options:
            raise DataError(f"answer {record.get('answer')!r} is not one of the options {list(options)}")
        return multiple_choice_prompt(record["question"], options), f"{answer}. {options[answer]}"
    raise DataError(f"a record needs 'instruction'+'response' or 'question'+'options'+'answer', got keys "
                    f"{sorted(record)}")


def _json_kind(value) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _text_lines(path: pathlib.Path):
    """(line number, text) of a UTF-8 file. A BOM at the start is dropped (editors on Windows write one); bytes
    that are not UTF-8, and a file that cannot be read, raise DataError naming the file (and line)."""
    try:
        handle = path.open("rb")  # bytes, so that a decoding error can name its line
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a JSONL file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                f"{error.start + 1})") from None


def iter_jsonl(path: str | pathlib.Path):
    """(line number, object) for every non-empty line; malformed JSON, bytes that are not UTF-8 and an unreadable
    file raise DataError naming the file (and line). A leading UTF-8 BOM is accepted."""
    path = pathlib.Path(path)
    for number, line in _text_lines(path):
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


def encode(records: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record; labels are -100 on the prompt, so only the response is learnt."""
    return [encode_example(record, tokenizer, max_length)[0] for record in records]


def encode_example(record: dict, tokenizer, max_length: int):
    """((input_ids, labels), whether max_length cut the example)."""
    prompt, response = format_example(record)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    return (ids[:max_length], labels[:max_length]), len(ids) > max_length


def supervised_tokens(labels) -> int:
    """Tokens the LM loss learns: a causal LM predicts token t from the ones before it, so position 0 never is."""
    return sum(1 for label in labels[1:] if label != -100)


def trainable_examples(records: list[dict], tokenizer, max_length: int, log) -> list:
    """The encoded examples that keep at least one response token within max_length; warns with counts."""
    kept, truncated = [], 0
    for record in records:
        example, was_cut = encode_example(record, tokenizer, max_length)
        truncated += was_cut
        if supervised_tokens(example[1]):
            kept.append(example)
    dropped = len(records) - len(kept)
    if not kept:
        raise DataError(f"--max-length {max_length} cuts away the whole response of every one of the "
                        f"{len(records)} examples: nothing is left to learn; raise --max-length")
    if truncated:
        log(f"warning: {truncated} of {len(records)} examples are longer than --max-length {max_length} tokens and "
            f"were truncated; {dropped} of them lost every response token and are left out")
    return kept


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, target) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(target)] = torch.tensor(target)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def supervised_tokens_in(labels: torch.Tensor) -> int:
    """supervised_tokens over a batch of label rows."""
    return int((labels[:, 1:] != -100).sum())


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
