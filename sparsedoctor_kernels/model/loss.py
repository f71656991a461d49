"""SparseDoctor's hybrid training loss, in the one place both the model's output and SparseDoctorTrainer take it,
and its load-balancing term over every adapted module of a forward."""

from __future__ import annotations

import torch

from sparsedoctor_kernels.model.config import SparseDoctorConfig


def hybrid_loss(lm: torch.Tensor, balance: torch.Tensor, contrastive: torch.Tensor,
                config: SparseDoctorConfig) -> torch.Tensor:
    """`lm + balance_coef * balance + contrastive_coef * contrastive`, the coefficients from `config`."""
    return lm + config.balance_coef * balance + config.contrastive_coef * contrastive


def balance_loss(statistics: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | int]], top_k: int) -> torch.Tensor:
    """The mean over modules of `sdk.load_balance_loss` (E * sum_e counts[e] / (T * k) * probs_mean[e]), from
    each module's (counts [E], probs_mean [E], T real tokens) in one expression for all of them: a handful of
    launches per forward instead of a handful per module. 0 for no module."""
    if not statistics:
        return torch.zeros((), dtype=torch.float32)
    counts, probs_mean, tokens = zip(*statistics)
    probs_mean = torch.stack(probs_mean)  # [modules, E]
    per_module = (torch.stack(counts).to(probs_mean.dtype) * probs_mean).sum(-1)
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
