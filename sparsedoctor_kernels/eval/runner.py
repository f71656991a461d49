"""Run a causal LM over benchmark items: single-answer questions scored by the next-token log-probabilities of
the option letters, multi-answer questions (or all, in `generate` mode) by greedy generation and letter
extraction. Batched, with a progress bar."""

from __future__ import annotations

import torch

from sparsedoctor_kernels.eval.answers import extract_answer
from sparsedoctor_kernels.eval.items import MCQ
from sparsedoctor_kernels.eval.prompts import build_prompt


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", dynamic_ncols=True)


def _encode(tokenizer, prompts: list[str], device, max_length: int):
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"  # keep the question's end
    batch = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt",
                      add_special_tokens=False)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _letter_token_ids(tokenizer, letters: str) -> list[int]:
    ids = []
    for letter in letters:
        pieces = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"the tokenizer maps option letter {letter!r} to no token")
        ids.append(pieces[0])
    return ids


@torch.no_grad()
def _next_token_logits(model, tokenizer, prompts, device, max_length):
    input_ids, mask = _encode(tokenizer, prompts, device, max_length)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    return torch.log_softmax(logits[torch.arange(len(prompts), device=device), last].float(), dim=-1)


@torch.no_grad()
def _generate(model, tokenizer, prompts, device, max_length, max_new_tokens):
    """Greedy decoding without a cache (short answers), one batch at a time."""
    texts = [""] * len(prompts)
    current = list(prompts)
    finished = [False] * len(prompts)
    for _ in range(max_new_tokens):
        log_probs = _next_token_logits(model, tokenizer, current, device, max_length)
        for row, token in enumerate(log_probs.argmax(-1).tolist()):
            if finished[row]:
                continue
            if token == tokenizer.eos_token_id:
                finished[row] = True
                continue
            piece = tokenizer.decode([token])
            texts[row] += piece
            current[row] += piece
            finished[row] = "\n" in piece
        if all(finished):
            break
    return texts


def evaluate(model, tokenizer, benchmark: str, items: list[MCQ], *, shots: dict[str, list[MCQ]] | None = None,
             mode: str = "logits", batch_size: int = 8, max_new_tokens: int = 8, progress: bool = True,
             device=None) -> list[dict]:
    """One record per item: {"id", "prediction", "answer", "correct", "method"} (and "output" when generated).
    `shots` maps a subject to its few-shot examples."""
    if mode not in ("logits", "generate"):
        raise ValueError(f"mode must be 'logits' or 'generate', got {mode!r}")
    device = device or next(model.parameters()).device
    max_length = int(getattr(getattr(model, "config", None), "max_position_embeddings", 4096) or 4096)
    model.eval()
    records: dict[str, dict] = {}
    by_method = {"logits": [], "generate": []}
    for item in items:
        by_method["generate" if mode == "generate" or item.multi_answer else "logits"].append(item)
    for method, chosen in by_method.items():
        batches = [chosen[i: i + batch_size] for i in range(0, len(chosen), batch_size)]
        for batch in _progress(batches, len(batches), progress and bool(batches), f"{benchmark} ({method})"):
            prompts = [build_prompt(benchmark, item, (shots or {}).get(item.subject, [])) for item in batch]
            if method == "logits":
                log_probs = _next_token_logits(model, tokenizer, prompts, device, max_length)
                for row, item in enumerate(batch):
                    letters = "".join(item.options)
                    scores = log_probs[row, _letter_token_ids(tokenizer, letters)]
                    records[item.id] = {"prediction": letters[int(scores.argmax())]}
            else:
                outputs = _generate(model, tokenizer, prompts, device, max_length, max_new_tokens)
                for item, output in zip(batch, outputs):
                    records[item.id] = {"prediction": extract_answer(output, "".join(item.options)),
                                        "output": output}
    results = []
    for item in items:
        record = records[item.id]
        results.append({"id": item.id, "subject": item.subject, "prediction": record["prediction"],
                        "answer": item.answer, "correct": bool(item.answer) and record["prediction"] == item.answer,
                        "method": "generate" if "output" in record else "logits", **({"output": record["output"]}
                                                                                     if "output" in record else {})})
    return results
