"""SparseDoctor's hybrid training loss, in the one place both the model's output and SparseDoctorTrainer take it."""

from __future__ import annotations

import torch

from sparsedoctor_kernels.model.config import SparseDoctorConfig


def hybrid_loss(lm: torch.Tensor, balance: torch.Tensor, contrastive: torch.Tensor,
                config: SparseDoctorConfig) -> torch.Tensor:
    """`lm + balance_coef * balance + contrastive_coef * contrastive`, the coefficients from `config`."""
    return lm + config.balance_coef * balance + config.contrastive_coef * contrastive
