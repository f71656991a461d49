"""apply_sparsedoctor: wrap a Hugging Face causal LM (Qwen3) so every target linear becomes a LoraMoELinear,
and return the hybrid loss `lm + balance_coef * balance + contrastive_coef * contrastive` with its terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparsedoctor_kernels.model.config import SparseDoctorConfig
from sparsedoctor_kernels.model.layer import ForwardContext, LoraMoELinear


@dataclass
class SparseDoctorOutput(CausalLMOutputWithPast):
    """The base model's causal-LM output (`loss` is the hybrid loss, None without labels; `logits`; the KV cache
    under whatever name this transformers version gives it; hidden states, attentions) plus `aux_losses`
    {"lm", "balance", "contrastive"}."""

    aux_losses: dict[str, torch.Tensor | None] | None = None


# transformers renamed `past_key_values` to `cache` in its outputs; carry the base model's under either name.
_cache_names = tuple(name for name in ("cache", "past_key_values") if name in SparseDoctorOutput.__dataclass_fields__)


class SparseDoctorModel(nn.Module):
    """The base model with its target linears adapted; base weights frozen, only the adapter trains."""

    def __init__(self, base_model: nn.Module, config: SparseDoctorConfig):
        super().__init__()
        self.base_model = base_model.requires_grad_(False)
        self.sparsedoctor_config = config
        self.context = ForwardContext()
        targets = [(name, module) for name, module in base_model.named_modules()
                   if name.rsplit(".", 1)[-1] in config.target_modules and isinstance(module, nn.Linear)]
        if not targets:
            raise ValueError(f"no nn.Linear named one of {list(config.target_modules)} in "
                             f"{type(base_model).__name__}")
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            setattr(parent, child, LoraMoELinear(module, config, self.context))

    @property
    def config(self):
        """The base model's Hugging Face config (what `Trainer` and generation utilities look for)."""
        return self.base_model.config

    def adapted_modules(self) -> dict[str, LoraMoELinear]:
        return {name: m for name, m in self.base_model.named_modules() if isinstance(m, LoraMoELinear)}

    def commit_queues(self) -> None:
        """Write every staged routed view into its module's expert queue (done by each training forward).
        Under an initialised process group this is a collective (each rank's rows reach every rank's queues):
        every rank must call it, as every rank runs the training forward and `save_adapter`."""
        for module in self.adapted_modules().values():
            module.commit_queue()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options):
        """Non-reentrant by default: it keeps the graph of the auxiliary losses computed inside the layers.
        `options` (every_n_layers, offload) go to transformers versions that take them."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers' newer name
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.base_model, "activation_checkpointing_disable", None)
        (disable or self.base_model.gradient_checkpointing_disable)()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> SparseDoctorOutput:
        if self.training:
            self.commit_queues()  # the previous step's views; a recomputation then sees the same queue
        token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        self.context.start(token_mask)
        try:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            balance_terms, contrastive_terms = self.context.stop()
        zero = out.logits.new_zeros((), dtype=torch.float32)
        balance = torch.stack(balance_terms).mean() if balance_terms else zero
        contrastive = torch.stack(contrastive_terms).mean() if contrastive_terms else zero
        lm = out.loss
        config = self.sparsedoctor_config
        loss = None if lm is None else lm + config.balance_coef * balance + config.contrastive_coef * contrastive
        passed_on = {name: getattr(out, name, None) for name in (*_cache_names, "hidden_states", "attentions")}
        return SparseDoctorOutput(loss=loss, logits=out.logits,
                                  aux_losses={"lm": lm, "balance": balance, "contrastive": contrastive}, **passed_on)

    def expert_load(self) -> dict[str, torch.Tensor]:
        """Per module, the fraction of routed pairs each expert got in the last forward (for plots)."""
        return {name: m.last_load for name, m in self.adapted_modules().items() if m.last_load is not None}


def apply_sparsedoctor(model: nn.Module, config: SparseDoctorConfig | None = None) -> SparseDoctorModel:
    """Adapt `model` (a Hugging Face causal LM such as Qwen3ForCausalLM) in place and wrap it."""
    return SparseDoctorModel(model, config or SparseDoctorConfig())
