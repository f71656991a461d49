"""SparseDoctor on Hugging Face Qwen3: LoRA-MoE linears with routers, contrastive views over expert queues,
the hybrid loss, adapter save/load and the Trainer subclass. Uses only the library's public ops.

`SparseDoctorTrainer` (model/trainer.py) is imported on first use: `transformers.Trainer` takes seconds to
import, and most users of the model never need it."""

from sparsedoctor_kernels.model.adapter import load_adapter, save_adapter
from sparsedoctor_kernels.model.config import SparseDoctorConfig
from sparsedoctor_kernels.model.layer import LoraMoELinear
from sparsedoctor_kernels.model.loss import hybrid_loss
from sparsedoctor_kernels.model.wrapper import SparseDoctorModel, SparseDoctorOutput, apply_sparsedoctor

__all__ = ["LoraMoELinear", "SparseDoctorConfig", "SparseDoctorModel", "SparseDoctorOutput", "SparseDoctorTrainer",
           "apply_sparsedoctor", "hybrid_loss", "load_adapter", "save_adapter"]


def __getattr__(name: str):
    if name == "SparseDoctorTrainer":
        from sparsedoctor_kernels.model.trainer import SparseDoctorTrainer

        return SparseDoctorTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
