"""Run a causal LM over benchmark items: single-answer questions scored by the next-token log-probabilities of
the option letters, multi-answer questions (or all, in `generate` mode) by greedy generation (KV cache, stop at
end-of-sequence) and letter extraction after any `<think>` reasoning. Prompts are plain or rendered by the
tokenizer's chat template; batches are left-padded, longest prompts first, with a progress bar."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from sparsedoctor_kernels._util.progress import progress as progress_bar
from sparsedoctor_kernels.eval.answers import extract_answer, opens_thinking, strip_thinking
from sparsedoctor_kernels.eval.generation import greedy_generate, last_logits_only, position_ids_for, stop_token_ids
from sparsedoctor_kernels.eval.items import MCQ
from sparsedoctor_kernels.eval.prompts import chat_prompt
from sparsedoctor_kernels.eval.protocols import Protocol, get_protocol

# New tokens per generated answer: enough for "答案：A、C、D" and a short sentence. A thinking model needs room
# for its reasoning before the answer (Qwen3: 1024 or more); a reply cut off inside <think> holds no answer.
DEFAULT_MAX_NEW_TOKENS = 32
THINKING_MAX_NEW_TOKENS = 1024


def model_max_length(model) -> int:
    """The positions the model was built for (config.max_position_embeddings; 4096 when it does not say)."""
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", 4096) or 4096)


@contextlib.contextmanager
def _padding_side(tokenizer, side: str):
    """The tokenizer pads on `side` inside the block and as before after it (it is the caller's tokenizer)."""
    saved = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = saved


@dataclass
class _Prompt:
    item: MCQ
    token_ids: list[int]
    in_thinking: bool  # the prompt opened a <think> block the reply continues


def _prompts(tokenizer, protocol: Protocol, items: list[MCQ], shots: dict, *, chat_template: bool,
             enable_thinking: bool, max_tokens: int) -> tuple[list[_Prompt], int]:
    """Each item's prompt as token ids, cut from the left to `max_tokens` (the end, where the answer comes,
    is kept), longest first so each batch pads little; and how many were cut."""
    texts = [protocol.prompt(item, shots.get(item.subject, [])) for item in items]
    if chat_template:
        texts = [chat_prompt(tokenizer, text, enable_thinking) for text in texts]
    if protocol.name == "sparsedoctor":  # the text holds any special tokens (a template's <|im_start|>) itself
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:  # a reference encodes its prompt with the tokenizer's defaults (a BOS where the tokenizer adds one)
        rows = tokenizer(texts)["input_ids"]
    cut = sum(len(row) > max_tokens for row in rows)
    prompts = [_Prompt(item, row[-max_tokens:], opens_thinking(text)) for item, row, text in zip(items, rows, texts)]
    return sorted(prompts, key=lambda prompt: -len(prompt.token_ids)), cut


def _left_padded(tokenizer, prompts: list[_Prompt], device) -> tuple[torch.Tensor, torch.Tensor]:
    with _padding_side(tokenizer, "left"):
        batch = tokenizer.pad({"input_ids": [p.token_ids for p in prompts]}, padding=True, return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _letter_token_ids(tokenizer, letters: str, protocol: str = "sparsedoctor") -> list[int]:
    if protocol == "cmmlu":  # the official script: convert_tokens_to_ids("A") (the bare letter, no "▁")
        return [tokenizer.convert_tokens_to_ids(letter) for letter in letters]
    ids = []
    for letter in letters:
        pieces = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ValueError(f"the tokenizer maps option letter {letter!r} to no token")
        ids.append(pieces[0])
    return ids


@torch.no_grad()
def _next_token_log_probs(model, input_ids, attention_mask) -> torch.Tensor:
    """Log-probabilities of the token after each left-padded prompt: with a chat template, the first token of
    the assistant's turn (after its generation prompt, and after Qwen3's empty think block)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask),
                   **last_logits_only(model)).logits
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


def _warn_lost_answers(records: dict[str, dict], cut: int, max_new_tokens: int) -> None:
    unterminated = [item_id for item_id, record in records.items() if record.get("unterminated_thinking")]
    if unterminated:
        budget_out = sum(records[item_id]["finish_reason"] == "length" for item_id in unterminated)
        warnings.warn(f"{len(unterminated)} generated repl(ies) ended inside an unterminated <think> block "
                      f"({budget_out} of them when max_new_tokens={max_new_tokens} ran out), so they hold no answer "
                      f"and count wrong (e.g. id {unterminated[0]}); raise --max-new-tokens", stacklevel=3)
    if cut:
        warnings.warn(f"{cut} prompt(s) were longer than the model's positions allow and lost their beginning",
                      stacklevel=3)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's `_encode_pair`: the context's trailing spaces move to the continuation, whose
    tokens are what the whole string's encoding has beyond the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def _loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], *, batch_size: int, max_length: int,
                    device, progress: bool, label: str) -> list[float]:
    """Summed log-probability of each (context, continuation), as lm-evaluation-harness's HFLM computes it:
    the input is (context + continuation)[-(max_length + 1):][:-1] and the continuation's tokens are scored
    at the positions before them (full float32 log-softmax)."""
    encoded = [_encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    rows = [((context + continuation)[-(max_length + 1):][:-1], continuation) for context, continuation in encoded]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results = [0.0] * len(rows)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress_bar(batches, progress, label, "batch", total=len(batches)):
        prompts = [_Prompt(None, rows[i][0], False) for i in batch]
        input_ids, attention_mask = _left_padded(tokenizer, prompts, device)
        keep = max(len(rows[i][1]) for i in batch)
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_for(attention_mask), **last_logits_only(model, keep)).logits
        log_probs = torch.log_softmax(logits[:, -keep:].float(), dim=-1)
        for row, i in enumerate(batch):
            targets = rows[i][1]
            picked = log_probs[row, keep - len(targets):].gather(-1, torch.tensor(targets, device=device)[:, None])
            results[i] = float(picked.sum())
    return results


def _score_by_likelihood(model, tokenizer, protocol: Protocol, items: list[MCQ], shots: dict, *, batch_size: int,
                         max_length: int, device, progress: bool, label: str) -> dict[str, dict]:
    contexts = {item.id: protocol.prompt(item, shots.get(item.subject, [])) for item in items}
    requests = [(contexts[item.id], protocol.continuation(letter)) for item in items for letter in item.options]
    scores = iter(_loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length,
                                  device=device, progress=progress, label=label))
    records = {}
    for item in items:
        log_probs = {letter: next(scores) for letter in item.options}
        records[item.id] = {"prediction": _first_best(log_probs), "log_probs": log_probs}
    return records


def _first_best(scores: dict[str, float]) -> str:
    """The letter of the largest score, the first one on a tie (numpy's argmax, as the references use)."""
    best = max(scores.values())
    return next(letter for letter, value in scores.items() if value == best)


def evaluate(model, tokenizer, benchmark: str, items: list[MCQ], *, shots: dict[str, list[MCQ]] | None = None,
             mode: str = "logits", batch_size: int = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             chat_template: bool = False, enable_thinking: bool = False, progress: bool = True,
             device=None, protocol: str = "sparsedoctor") -> list[dict]:
    """One record per item: {"id", "subject", "prediction", "answer", "correct", "method"}; scored ones add
    "log_probs" (letter -> log-probability: of the letter token, or of the protocol's continuation), generated
    ones "output" (the raw reply, reasoning included) and "finish_reason" ("stop" at end-of-sequence, "length"
    when `max_new_tokens` ran out). `shots` maps a subject to its few-shot examples. `protocol` names how
    prompts are written and scored (`sparsedoctor_kernels.eval.protocols`); with the library's own
    ("sparsedoctor"), `mode` picks letter scoring or generation and `chat_template` renders each prompt as one
    user message of the tokenizer's chat template, `enable_thinking` passed to it."""
    if mode not in ("logits", "generate"):
        raise ValueError(f"mode must be 'logits' or 'generate', got {mode!r}")
    protocol = get_protocol(protocol, benchmark)
    if protocol.name != "sparsedoctor" and (chat_template or enable_thinking or mode != "logits"):
        raise ValueError(f"protocol {protocol.name!r} fixes its prompt and scoring: chat templates, thinking and "
                         f"mode='generate' are the 'sparsedoctor' protocol's")
    max_length = model_max_length(model)
    if not 0 < max_new_tokens < max_length:
        raise ValueError(f"max_new_tokens must be in [1, {max_length - 1}] (the model has {max_length} positions), "
                         f"got {max_new_tokens}")
    device = device or next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    model.eval()
    records: dict[str, dict] = {}
    by_method = {"logits": [], "generate": [], "loglikelihood": []}
    for item in items:
        if protocol.name != "sparsedoctor":
            by_method[{"next-token": "logits"}.get(protocol.scoring, protocol.scoring)].append(item)
        else:
            by_method["generate" if mode == "generate" or item.multi_answer else "logits"].append(item)
    cut = 0
    likelihood_items = by_method.pop("loglikelihood")
    if likelihood_items:
        records.update(_score_by_likelihood(model, tokenizer, protocol, likelihood_items, shots or {},
                                            batch_size=batch_size, max_length=max_length, device=device,
                                            progress=progress, label=f"{benchmark} ({protocol.name})"))
    for method, chosen in by_method.items():
        if not chosen:
            continue
        room = max_length - (max_new_tokens if method == "generate" else 0)
        prompts, cut_here = _prompts(tokenizer, protocol, chosen, shots or {}, chat_template=chat_template,
                                     enable_thinking=enable_thinking, max_tokens=room)
        cut += cut_here
        batches = [prompts[i: i + batch_size] for i in range(0, len(prompts), batch_size)]
        for batch in progress_bar(batches, progress, f"{benchmark} ({method})", "batch", total=len(batches)):
            input_ids, attention_mask = _left_padded(tokenizer, batch, device)
            if method == "logits":
                log_probs = _next_token_log_probs(model, input_ids, attention_mask)
                for row, prompt in enumerate(batch):
                    letters = "".join(prompt.item.options)
                    scores = log_probs[row, _letter_token_ids(tokenizer, letters, protocol.name)].tolist()
                    by_letter = dict(zip(letters, scores))
                    records[prompt.item.id] = {"prediction": _first_best(by_letter), "log_probs": by_letter}
                continue
            replies = greedy_generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                      stop_ids=stop_ids, pad_id=pad_id)
            for prompt, reply in zip(batch, replies):
                # Special tokens stay: a template's <think> must survive to be stripped (stop tokens are cut).
                output = tokenizer.decode(reply.tokens, skip_special_tokens=False)
                if protocol.extract is not None:  # the reference's own reading of a reply
                    prediction = protocol.extract(tokenizer.decode(reply.tokens, skip_special_tokens=True),
                                                  prompt.item)
                else:
                    prediction = extract_answer(output, "".join(prompt.item.options), in_thinking=prompt.in_thinking)
                records[prompt.item.id] = {
                    "prediction": prediction,
                    "output": output, "finish_reason": reply.finish_reason,
                    "unterminated_thinking": strip_thinking(output, prompt.in_thinking) is None}
    _warn_lost_answers(records, cut, max_new_tokens)
    results = []
    for item in items:
        record = records[item.id]
        generated = {key: record[key] for key in ("output", "finish_reason") if key in record}
        method = "generate" if generated else ("loglikelihood" if protocol.scoring == "loglikelihood" else "logits")
        scored = {"log_probs": record["log_probs"]} if "log_probs" in record else {}
        results.append({"id": item.id, "subject": item.subject, "prediction": record["prediction"],
                        "answer": item.answer, "correct": bool(item.answer) and record["prediction"] == item.answer,
                        "method": method, "protocol": protocol.name, **scored, **generated})
    return results
