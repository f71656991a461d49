"""SparseDoctor on Hugging Face Qwen3: LoRA-MoE linears with routers, contrastive views over expert queues,
the hybrid loss, and adapter save/load. Uses only the library's public ops."""

from sparsedoctor_kernels.model.adapter import load_adapter, save_adapter
from sparsedoctor_kernels.model.config import SparseDoctorConfig
from sparsedoctor_kernels.model.layer import LoraMoELinear
from sparsedoctor_kernels.model.wrapper import SparseDoctorModel, SparseDoctorOutput, apply_sparsedoctor

__all__ = ["LoraMoELinear", "SparseDoctorConfig", "SparseDoctorModel", "SparseDoctorOutput", "apply_sparsedoctor",
           "load_adapter", "save_adapter"]
