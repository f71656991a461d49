"""Greedy generation for evaluation: a left-padded batch, the KV cache, and a stop per row at end-of-sequence.
Through the model's own `generate` when it has one (Hugging Face causal LMs), else through an incremental loop
over its forward with the cache (a model that only has `forward`, such as a wrapper without `generate`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# Names transformers has given the KV cache, in its outputs and as the forward's argument (it renamed
# `past_key_values` to `cache`): a forward takes the cache back under the name its output carries it.
_CACHE_NAMES = ("cache", "past_key_values")


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos and pad, the model's generation-config eos (Qwen3 lists
    `<|im_end|>` and `<|endoftext|>`), and `<|im_end|>` when the vocabulary has it (a chat turn's end)."""
    found: set[int] = set()
    generation_config = getattr(model, "generation_config", None) if model is not None else None
    for value in (tokenizer.eos_token_id, tokenizer.pad_token_id, getattr(generation_config, "eos_token_id", None)):
        if value is not None:
            found.update(value if isinstance(value, (list, tuple)) else [value])
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        found.add(vocab["<|im_end|>"])
    if not found:
        raise ValueError("the tokenizer has no eos or pad token, so generation could never stop early")
    return sorted(found)


def last_logits_only(model, count: int = 1) -> dict:
    """`{"logits_to_keep": count}` when the model's forward (for SparseDoctorModel, its base model's) takes it,
    else {}: a prompt's logits at every position over a 150k vocabulary would take batch x length x 600 kB."""
    from sparsedoctor_kernels.model.wrapper import SparseDoctorModel

    inner = model.base_model if isinstance(model, SparseDoctorModel) else model
    try:
        parameters = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": count} if "logits_to_keep" in parameters else {}


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded row sees the positions it would alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Generated:
    """One row's reply: the new tokens before the stop token, and why it ended ("stop": a stop token;
    "length": the max_new_tokens budget ran out first)."""

    tokens: list[int]
    finish_reason: str


def _cut_at_stop(rows: torch.Tensor, stop_ids: list[int]) -> list[Generated]:
    stops = torch.isin(rows, torch.tensor(stop_ids, device=rows.device))
    replies = []
    for row, stop in zip(rows.tolist(), stops.tolist()):
        end = stop.index(True) if True in stop else None
        replies.append(Generated(row[:end], "stop") if end is not None else Generated(row, "length"))
    return replies


def _cache_of(output) -> tuple[str, object]:
    for name in _CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return name, cache
    raise TypeError(f"{type(output).__name__} carries no KV cache (neither `cache` nor `past_key_values`): the "
                    f"model must return one when called with use_cache=True")


@torch.no_grad()
def _greedy_with_cache(model, input_ids, attention_mask, max_new_tokens: int, stop_ids: list[int],
                       pad_id: int) -> torch.Tensor:
    """The incremental greedy loop: the prompt once, then one token per row and step with the cache; a row
    that hit a stop token gets pad tokens after it; the loop ends when every row has stopped."""
    stops = torch.tensor(stop_ids, device=input_ids.device)
    positions = position_ids_for(attention_mask)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                   **last_logits_only(model))
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    next_position = positions[:, -1:]
    for step in range(max_new_tokens):
        token = output.logits[:, -1].argmax(-1).masked_fill(finished, pad_id)
        new_tokens.append(token)
        finished |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        cache_name, cache = _cache_of(output)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        next_position = next_position + 1
        output = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=next_position,
                       use_cache=True, **{cache_name: cache})
    return torch.stack(new_tokens, dim=1)


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                    stop_ids: list[int], pad_id: int) -> list[Generated]:
    """Greedy replies to a LEFT-padded batch, each cut before its first stop token. `model.generate` when the
    model has it (do_sample=False, so a sampling generation config is overridden), else `_greedy_with_cache`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if attention_mask.shape[0] and not bool(attention_mask[:, -1].all()):
        raise ValueError("greedy_generate needs a left-padded batch (a row ends in padding)")
    if callable(getattr(model, "generate", None)):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
        sequences = getattr(output, "sequences", output)
        prompt_length = input_ids.shape[1]
        # Decoder-only models return the prompt and the reply; keep the reply.
        if sequences.shape[1] >= prompt_length and torch.equal(sequences[:, :prompt_length], input_ids):
            sequences = sequences[:, prompt_length:]
    else:
        sequences = _greedy_with_cache(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_id)
    return _cut_at_stop(sequences[:, :max_new_tokens], stop_ids)
