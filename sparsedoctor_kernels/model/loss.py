"""SparseDoctor's hybrid training loss, in the one place both the model's output and SparseDoctorTrainer take it,
and its load-balancing term over every adapted module of a forward."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparsedoctor_kernels.model.config import SparseDoctorConfig


def hybrid_loss(lm: torch.Tensor, balance: torch.Tensor, contrastive: torch.Tensor,
                config: SparseDoctorConfig) -> torch.Tensor:
    """`lm + balance_coef * balance + contrastive_coef * contrastive`, the coefficients from `config`."""
    return lm + config.balance_coef * balance + config.contrastive_coef * contrastive


class Row(NamedTuple):
    """A module's tensor as a loss term records it: `source` itself (`row` None), or row `row` of a sibling
    group's batched `source` (every member's, from one call)."""

    source: torch.Tensor
    row: int | None = None


def stack_rows(entries: list[Row | torch.Tensor]) -> torch.Tensor:
    """The modules' tensors stacked, [modules, ...], in one launch (none for one group's batch alone). A group's
    batch recorded whole and in order (rows 0..S-1 one after another) goes in as it is, so its gradient reaches
    it as a slice, not through a select per member."""
    entries = [entry if isinstance(entry, Row) else Row(entry) for entry in entries]
    parts, i = [], 0
    while i < len(entries):
        source, row = entries[i]
        size = 1 if row is None else source.shape[0]
        whole = row == 0 and all(i + j < len(entries) and entries[i + j].source is source and entries[i + j].row == j
                                 for j in range(size))
        if whole:
            parts.append(source)
            i += size
        else:
            parts.append((source if row is None else source[row])[None])
            i += 1
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def balance_loss(statistics: list[tuple[Row | torch.Tensor, Row | torch.Tensor, torch.Tensor | int]],
                 top_k: int) -> torch.Tensor:
    """The mean over modules of `sdk.load_balance_loss` (E * sum_e counts[e] / (T * k) * probs_mean[e]), from
    each module's (counts [E], probs_mean [E], T real tokens) in one expression for all of them: a handful of
    launches per forward instead of a handful per module. 0 for no module."""
    if not statistics:
        return torch.zeros((), dtype=torch.float32)
    counts, probs_mean, tokens = zip(*statistics)
    probs_mean = stack_rows(probs_mean)  # [modules, E]
    per_module = (stack_rows(counts).to(probs_mean.dtype) * probs_mean).sum(-1)
    first = tokens[0]
    # One count for all, the usual case (every module sees the batch): the context's tensor, or the same int.
    if all(t is first or (isinstance(t, int) and not isinstance(first, torch.Tensor) and t == first) for t in tokens):
        per_token = per_module.mean() / _at_least_one(first)
    else:
        per_token = (per_module / torch.stack([torch.as_tensor(_at_least_one(t), dtype=per_module.dtype,
                                                               device=per_module.device) for t in tokens])).mean()
    return per_token * (probs_mean.shape[-1] / top_k)


def _at_least_one(tokens: torch.Tensor | int) -> torch.Tensor | int:
    return tokens.clamp_min(1) if isinstance(tokens, torch.Tensor) else max(tokens, 1)
