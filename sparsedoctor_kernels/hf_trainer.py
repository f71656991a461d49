"""The import path SparseDoctorTrainer was first published under; it lives in `sparsedoctor_kernels.model.trainer`
(also `sparsedoctor_kernels.model.SparseDoctorTrainer`)."""

from sparsedoctor_kernels.model.trainer import LOG_NAMES, LOSS_TERMS, SparseDoctorTrainer

__all__ = ["LOG_NAMES", "LOSS_TERMS", "SparseDoctorTrainer"]
