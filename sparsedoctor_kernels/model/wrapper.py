"""apply_sparsedoctor: wrap a Hugging Face causal LM (Qwen3) so every target linear becomes a LoraMoELinear,
and return the hybrid loss `lm + balance_coef * balance + contrastive_coef * contrastive` with its terms.

The wrapper keeps the habits of a PEFT model: `generate`, `print_trainable_parameters`, `save_pretrained` and
`SparseDoctorModel.from_pretrained(base_model, adapter_dir)`."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparsedoctor_kernels.model.adapter import load_adapter, read_adapter_config, save_adapter
from sparsedoctor_kernels.model.config import SparseDoctorConfig
from sparsedoctor_kernels.model.layer import ForwardContext, LoraMoELinear
from sparsedoctor_kernels.model.loss import balance_loss, hybrid_loss
from sparsedoctor_kernels.model.siblings import SiblingGroup, find_sibling_groups


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

    # transformers.Trainer passes `num_items_in_batch` to a forward that takes **kwargs and then counts the loss
    # as already scaled for gradient accumulation; only the LM term would be, not the balance and contrastive
    # terms. Declining makes a plain Trainer average whole per-batch losses; SparseDoctorTrainer does the
    # token-exact scaling itself.
    accepts_loss_kwargs = False

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
        # Projections that read one input (q/k/v, gate/up) in groups; every other one a group of one, so that each
        # adapted projection takes the fused call (routers, routing and experts in one `routed_sibling_lora_moe`).
        self.sibling_groups = find_sibling_groups(base_model, LoraMoELinear)
        grouped = {id(member) for group in self.sibling_groups for member in group.members}
        singles = [SiblingGroup([m]) for m in self.adapted_modules().values() if id(m) not in grouped]
        for group in (*self.sibling_groups, *singles):
            for member in group.members:
                member.siblings = group
        self.context.sibling_groups = [*self.sibling_groups, *singles]

    @property
    def device(self) -> torch.device:
        """The device of the base model's parameters (as `PreTrainedModel.device`: what lm-eval's HFLM and other
        Hugging Face tools read)."""
        return next(self.base_model.parameters()).device

    @property
    def config(self):
        """The base model's Hugging Face config (what `Trainer` and generation utilities look for)."""
        return self.base_model.config

    @property
    def generation_config(self):
        """The base model's generation config (what `generate` uses; Trainer aligns its special tokens)."""
        return getattr(self.base_model, "generation_config", None)

    @property
    def loss_type(self):
        """The base model's loss type (Trainer reads it to count a causal LM's shifted labels)."""
        return getattr(self.base_model, "loss_type", None)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_dir: str | pathlib.Path, *,
                        is_trainable: bool = False) -> SparseDoctorModel:
        """`base_model` adapted as the adapter in `adapter_dir` says (its SparseDoctorConfig) and the adapter
        loaded, checked as `load_adapter` checks it. In eval mode with the adapter frozen, as PEFT loads one;
        `is_trainable=True` keeps the adapter trainable. On any error `base_model` is left as it was. The
        random initialisation that loading overwrites does not disturb the caller's RNG."""
        if isinstance(base_model, SparseDoctorModel):
            raise TypeError("SparseDoctorModel.from_pretrained takes the base causal LM, not a SparseDoctorModel; "
                            "load an adapter into one with load_adapter(model, directory)")
        if not isinstance(base_model, nn.Module):
            raise TypeError(f"SparseDoctorModel.from_pretrained: base_model must be a loaded causal LM (an "
                            f"nn.Module, e.g. from sparsedoctor_kernels.train.loading.load_causal_lm), got "
                            f"{type(base_model).__name__}")
        described = read_adapter_config(adapter_dir)  # before the base is touched
        config = SparseDoctorConfig.from_dict(described["sparsedoctor"])
        requires_grad = {name: p.requires_grad for name, p in base_model.named_parameters()}
        cuda_devices = sorted({p.device.index for p in base_model.parameters() if p.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=cuda_devices):
                model = cls(base_model, config)
            load_adapter(model, adapter_dir)
        except BaseException:
            _unadapt(base_model, requires_grad)
            raise
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model

    def group_siblings(self, enabled: bool = True) -> SparseDoctorModel:
        """Compute the projections of a block that read one input (q/k/v, gate/up) as one group (the default):
        one pass over the shared input for every member's experts. `False` computes each projection alone
        (the same outputs and losses on the torch backend; use it when a member is sharded or hooked on its own,
        e.g. FSDP wrapping single projections). Returns the model."""
        for group in self.context.sibling_groups:
            group.enabled = bool(enabled)
            group.clear()
        return self

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

    def save_pretrained(self, save_directory: str | pathlib.Path, *, replace_directory: bool = True) -> pathlib.Path:
        """`save_adapter(self, save_directory, replace_directory=...)`: the adapter's two files (PEFT's habit).
        By default the directory is replaced whole; `replace_directory=False` writes beside other files."""
        return save_adapter(self, save_directory, replace_directory=replace_directory)

    def trainable_parameter_counts(self) -> tuple[int, int]:
        """(trainable parameters, all parameters); a tied embedding counts once."""
        parameters = list(self.parameters())  # each shared tensor once
        return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameter_counts()
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)")

    def generate(self, *args, **kwargs):
        """The base model's `generate` (same arguments): its forward runs through the adapted linears, so the
        adapter is applied; nothing is recorded (no loss terms, no queue rows). Call `.eval()` first, as with
        any Hugging Face model (in training mode dropout is on)."""
        # Start and stop an empty forward: the previous forward's token mask and per-forward constants must
        # not be applied to the tokens generate feeds the layers.
        self.context.start(None)
        self.context.stop()
        return self.base_model.generate(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> SparseDoctorOutput:
        if self.training:
            self.commit_queues()  # the previous step's views; a recomputation then sees the same queue
        token_mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        # Without labels outside training (generation) nothing reads the balance term: the layers skip it.
        self.context.start(token_mask, wants_losses=self.training or labels is not None)
        try:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            balance_terms, contrastive_terms = self.context.stop()
        zero = out.logits.new_zeros((), dtype=torch.float32)
        balance = balance_loss(balance_terms, self.sparsedoctor_config.top_k) if balance_terms else zero
        contrastive = _mean_over_modules(contrastive_terms) if contrastive_terms else zero
        lm = out.loss
        loss = None if lm is None else hybrid_loss(lm, balance, contrastive, self.sparsedoctor_config)
        passed_on = {name: getattr(out, name, None) for name in (*_cache_names, "hidden_states", "attentions")}
        return SparseDoctorOutput(loss=loss, logits=out.logits,
                                  aux_losses={"lm": lm, "balance": balance, "contrastive": contrastive}, **passed_on)

    def expert_load(self) -> dict[str, torch.Tensor]:
        """Per module, the fraction of routed pairs each expert got in the last forward (for plots)."""
        return {name: m.last_load for name, m in self.adapted_modules().items() if m.last_load is not None}


def _mean_over_modules(terms: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the modules' contrastive terms: 0-d each, or [modules] computed for several at once."""
    if len(terms) == 1:
        return terms[0].mean()
    return torch.cat([term.reshape(-1) for term in terms]).mean()


def _unadapt(base_model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Undo SparseDoctorModel(base_model, ...): the original linears back in place, requires_grad as it was."""
    for name, module in list(base_model.named_modules()):
        if isinstance(module, LoraMoELinear):
            parent_name, _, child = name.rpartition(".")
            parent = base_model.get_submodule(parent_name) if parent_name else base_model
            setattr(parent, child, module.base)
    for name, parameter in base_model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))


def apply_sparsedoctor(model: nn.Module, config: SparseDoctorConfig | None = None) -> SparseDoctorModel:
    """Adapt `model` (a Hugging Face causal LM such as Qwen3ForCausalLM) in place and wrap it."""
    return SparseDoctorModel(model, config or SparseDoctorConfig())
