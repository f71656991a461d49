"""The base model and tokenizer that `train`, `eval` and `demo` start from: `tiny` (a small random Qwen3 whose
BPE tokenizer is trained on the records), a local Hugging Face directory, or anything else `from_pretrained`
accepts.

The dtype rule, the same everywhere: the weights load in the `dtype` asked for; when none is asked for, in
bfloat16 on a CUDA device and float32 on any other. Never in the checkpoint's own dtype (transformers' "auto"),
so a model loads the same way whatever precision it was saved in; `tiny` follows the same rule.

A tokenizer without a pad token pads with its end-of-sequence token (labels mask the padding out); one with
neither is refused. Errors from transformers propagate as they are (OSError, ValueError): the callers name the
flag that caused them."""

from __future__ import annotations

import torch

TINY = "tiny"


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 on a CUDA device, float32 elsewhere (None: the CPU)."""
    return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32


def fix_pad_token(tokenizer):
    """The tokenizer, padding with its end-of-sequence token when it has no pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an "
                             "end-of-sequence token to pad with; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(model: str, *, tokenizer: str | None = None, records: list[dict] | None = None,
                   tiny_vocab_size: int | None = None):
    """The tokenizer at `tokenizer` if given, else `model`'s; for `tiny`, a BPE tokenizer trained on
    `records` (default: the bundled demo records) with `tiny_vocab_size` entries (default: build_tokenizer's)."""
    if tokenizer is None and model == TINY:
        from sparsedoctor_kernels.train.data import build_tokenizer, corpus, demo_records

        sizes = {} if tiny_vocab_size is None else {"vocab_size": tiny_vocab_size}
        return fix_pad_token(build_tokenizer(corpus(demo_records() if records is None else records), **sizes))
    from transformers import AutoTokenizer

    return fix_pad_token(AutoTokenizer.from_pretrained(tokenizer or model))


def load_causal_lm(model: str, tokenizer=None, *, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None, seed: int = 0) -> torch.nn.Module:
    """The causal LM `model` in `dtype` (None: the module's rule), on `device` when given (else the CPU).
    `tiny` is built from `seed` with `tokenizer`'s vocabulary size. With a tokenizer, a generation config
    without a pad token id takes the tokenizer's (so `generate` pads as training did)."""
    dtype = default_dtype(device) if dtype is None else dtype
    if model == TINY:
        if tokenizer is None:
            raise ValueError("load_causal_lm('tiny') needs the tokenizer: its vocabulary sizes the model")
        from sparsedoctor_kernels.model.tiny import tiny_qwen3

        loaded = tiny_qwen3(vocab_size=len(tokenizer), seed=seed).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    generation = getattr(loaded, "generation_config", None)
    if tokenizer is not None and generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return loaded if device is None else loaded.to(device)


def load_model_and_tokenizer(model: str, *, tokenizer: str | None = None, records: list[dict] | None = None,
                             tiny_vocab_size: int | None = None, dtype: torch.dtype | None = None,
                             device: str | torch.device | None = None, seed: int = 0):
    """(causal LM, tokenizer): `load_tokenizer` then `load_causal_lm`, for callers that need both at once."""
    loaded_tokenizer = load_tokenizer(model, tokenizer=tokenizer, records=records, tiny_vocab_size=tiny_vocab_size)
    return load_causal_lm(model, loaded_tokenizer, dtype=dtype, device=device, seed=seed), loaded_tokenizer
