"""Training data: records in the formats Hugging Face users have (this project's instruction and multiple-choice
records, Alpaca, ShareGPT, TRL/OpenAI messages, TRL prompt-completion; see `formats`), read from JSON Lines or JSON
array files (`files`), rendered with the tokenizer's chat template when it has one or as plain text (`rendering`),
the bundled demo set and a tokenizer built from text.

The loss is on the assistant turns only (for multiple choice, the answer letter and its text), each with its
end-of-turn token: `encode` gives the labels, `trainable_examples` leaves out the examples that `max_length` cut
down to no answer token. `chat_template` is "auto" (the tokenizer's chat template when `tokenizer.chat_template` is
set, else plain), "chat" (required) or "plain"; `enable_thinking` reaches the template (Qwen3's reads it).
"""

from __future__ import annotations

import random

import torch

from sparsedoctor_kernels._util.progress import progress as progress_bar
from sparsedoctor_kernels.train.data.facts import FACTS
from sparsedoctor_kernels.train.data.files import (  # noqa: F401  (this package's API)
    SourcedRecord,
    is_json_array,
    iter_json_array,
    iter_jsonl,
    iter_records,
    read_records,
    write_jsonl,
)
from sparsedoctor_kernels.train.data.formats import (  # noqa: F401  (this package's API)
    LETTERS,
    Conversation,
    DataError,
    Message,
    multiple_choice_prompt,
    normalize_options,
    record_format,
    to_conversation,
)
from sparsedoctor_kernels.train.data.rendering import (  # noqa: F401  (this package's API)
    IGNORE,
    MODES,
    Encoded,
    chat_spans,
    encode_conversation,
    plain_pieces,
    plain_text,
    rendering_mode,
)

load_jsonl = read_records  # its first name, from when it read JSON Lines only


def format_example(record: dict) -> tuple[str, str]:
    """(prompt, answer) of a single-turn record of any format, in plain rendering."""
    pieces = plain_pieces(to_conversation(record))
    if len(pieces) != 3:  # prompt, answer, eos
        raise DataError("a multi-turn conversation has no single (prompt, answer); use encode")
    return pieces[0].text, pieces[1].text


def encode(records: list[dict], tokenizer, max_length: int, *, chat_template: str = "auto",
           enable_thinking: bool = False) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record; labels are -100 except on the assistant turns, which are what is learnt."""
    mode = rendering_mode(tokenizer, chat_template)
    return [_encoded(record, tokenizer, max_length, mode, enable_thinking, f"records[{index}]").input_ids_labels
            for index, record in enumerate(records)]


def encode_example(record: dict, tokenizer, max_length: int, *, chat_template: str = "auto",
                   enable_thinking: bool = False):
    """((input_ids, labels), whether max_length cut the example)."""
    encoded = _encoded(record, tokenizer, max_length, rendering_mode(tokenizer, chat_template), enable_thinking,
                       "the record")
    return encoded.input_ids_labels, encoded.truncated


def _encoded(record: dict, tokenizer, max_length: int, mode: str, enable_thinking: bool, where: str) -> Encoded:
    """The record encoded; a DataError names where it came from (its file and line when it was read from one)."""
    try:
        return encode_conversation(to_conversation(record), tokenizer, max_length, mode, enable_thinking)
    except DataError as error:
        raise DataError(f"{getattr(record, 'source', '') or where}: {error}") from None


def supervised_tokens(labels) -> int:
    """Tokens the LM loss learns: a causal LM predicts token t from the ones before it, so position 0 never is."""
    return sum(1 for label in labels[1:] if label != -100)


def trainable_examples(records: list[dict], tokenizer, max_length: int, log, *, chat_template: str = "auto",
                       enable_thinking: bool = False, progress: bool = False, with_indices: bool = False):
    """The encoded examples that keep at least one answer token within max_length; says how the data is
    rendered and warns with counts (truncated, left out, BPE merges across a prompt/answer boundary).
    `with_indices`: (examples, the index in `records` of each kept example)."""
    mode = rendering_mode(tokenizer, chat_template)
    if mode == "chat":
        learnt = "with its <think> block" if enable_thinking else "without the generation prompt's empty <think> block"
        log(f"data: rendered with the tokenizer's chat template; the loss learns each assistant turn through its "
            f"end-of-turn token ({learnt})")
    elif enable_thinking:
        log("warning: --enable-thinking has no effect: the data is rendered plain (no chat template is used)")
    kept, indices, truncated, merged = [], [], 0, 0
    for index, record in enumerate(progress_bar(records, progress, "encoding", "record")):
        encoded = _encoded(record, tokenizer, max_length, mode, enable_thinking, f"records[{index}]")
        truncated += encoded.truncated
        merged += encoded.boundary_merges > 0
        if supervised_tokens(encoded.labels):
            kept.append(encoded.input_ids_labels)
            indices.append(index)
    dropped = len(records) - len(kept)
    if not kept:
        raise DataError(f"--max-length {max_length} cuts away the whole response of every one of the "
                        f"{len(records)} examples: nothing is left to learn; raise --max-length")
    if truncated:
        log(f"warning: {truncated} of {len(records)} examples are longer than --max-length {max_length} tokens and "
            f"were truncated; {dropped} of them lost every response token and are left out")
    if merged:
        log(f"warning: in {merged} of {len(records)} examples a token joins the end of a prompt and the start of an "
            "answer (a BPE merge across the boundary); such tokens are not learnt")
    return (kept, indices) if with_indices else kept


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
    """The records' plain text, what the demo tokenizer is trained on."""
    return [plain_text(to_conversation(r)) for r in records]
