"""SparseDoctorTrainer: `transformers.Trainer` for a SparseDoctorModel.

What it changes from Trainer:
- checkpoints and `save_model` hold the adapter only (`adapter_config.json` + `adapter_model.safetensors`, via
  save_adapter), never the frozen base: tied embeddings are no obstacle, and a checkpoint directory loads with
  `SparseDoctorModel.from_pretrained(base_model, checkpoint_dir)`;
- resuming (`train(resume_from_checkpoint=...)`) and `load_best_model_at_end` load that adapter back;
- the loss is the hybrid loss with every term scaled for gradient accumulation (the LM term normalised by the
  step's supervised tokens, as Trainer does for plain causal LMs; balance and contrastive averaged over the
  step's micro-batches);
- the logs carry `lm_loss`, `balance_loss` and `contrastive_loss` (unweighted, averaged over the logging
  interval like `loss`) beside `loss`.

The expert queues need nothing from it: each training forward commits the previous forward's routed views,
and saving commits what is left (a collective under DDP, which is why every rank saves). Single process or DDP
(torchrun) only: DataParallel would lose the views staged on its replicas, and FSDP / DeepSpeed shard or gather
state this adapter format does not describe. Written against transformers 5.x's Trainer hooks (`_save`,
`_load_from_checkpoint`, `_load_best_model`, `compute_loss`, `log`, `prediction_step`).
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from sparsedoctor_kernels.model.adapter import load_adapter, save_adapter
from sparsedoctor_kernels.model.loss import hybrid_loss
from sparsedoctor_kernels.model.wrapper import SparseDoctorModel

LOSS_TERMS = ("lm", "balance", "contrastive")
LOG_NAMES = {term: f"{term}_loss" for term in LOSS_TERMS}


class SparseDoctorTrainer(Trainer):
    """`Trainer(model=apply_sparsedoctor(base), args=..., ...)` with the changes the module docstring lists."""

    # compute_loss scales every term for gradient accumulation itself (Trainer must not divide again).
    loss_is_scaled_for_ga = True

    def __init__(self, model: SparseDoctorModel | None = None, *args, **kwargs):
        if not isinstance(model, SparseDoctorModel):
            raise TypeError(f"SparseDoctorTrainer trains a SparseDoctorModel (from apply_sparsedoctor or "
                            f"SparseDoctorModel.from_pretrained(..., is_trainable=True)), got {type(model).__name__}")
        super().__init__(model, *args, **kwargs)
        self._check_supported()
        # Ask Trainer for the step's supervised-token count (it does so only for models taking loss kwargs):
        # compute_loss passes it to the base model, which then normalises the LM term by it.
        self.model_accepts_loss_kwargs = True
        self._term_sums: torch.Tensor | None = None  # [3] since the last log: lm, balance, contrastive
        self._term_steps = 0  # optimizer steps those sums cover
        self._term_last_step: int | None = None

    def _check_supported(self) -> None:
        unsupported = [
            (self.compute_loss_func is not None, "compute_loss_func: the loss is SparseDoctor's hybrid loss"),
            (self.label_smoother is not None, "label_smoothing_factor: the LM term is the base model's own loss"),
            (self.is_deepspeed_enabled, "DeepSpeed: the adapter is saved and loaded whole, not sharded"),
            (self.is_fsdp_enabled, "FSDP: the adapter is saved and loaded whole, not sharded"),
            (self.args.n_gpu > 1, f"DataParallel over {self.args.n_gpu} GPUs: its replicas would drop the staged "
                                  "queue rows; launch with torchrun (one process per GPU) or expose one GPU"),
        ]
        for refused, why in unsupported:
            if refused:
                raise ValueError(f"SparseDoctorTrainer does not support {why}")

    def _sparsedoctor_model(self, model=None) -> SparseDoctorModel:
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        return getattr(unwrapped, "_orig_mod", unwrapped)  # under torch.compile, the module it compiled

    # --- the loss and its logged terms -------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training
        token_normalised = training and num_items_in_batch is not None
        extra = {"num_items_in_batch": num_items_in_batch} if token_normalised else {}
        outputs = model(**inputs, **extra)
        if outputs.loss is None:
            raise ValueError("SparseDoctorTrainer: the batch has no `labels`, so there is no LM loss; the data "
                             "collator must provide labels (-100 where a token is not learned)")
        if not training:  # evaluation: the model's own per-batch hybrid loss
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        terms = outputs.aux_losses
        micro_batches = getattr(self, "current_gradient_accumulation_steps", 1)  # set by Trainer's loop
        # Normalised by the step's token count, the LM term already sums to the step's mean over its
        # micro-batches; with tokens averaged across processes the count is global, and DDP's gradient mean
        # needs it multiplied back by the number of processes (as Trainer does).
        lm = terms["lm"] * self._token_scale() if token_normalised else terms["lm"] / micro_batches
        balance, contrastive = terms["balance"] / micro_batches, terms["contrastive"] / micro_batches
        loss = hybrid_loss(lm, balance, contrastive, self._sparsedoctor_model(model).sparsedoctor_config)
        self._record_terms(torch.stack([lm.detach().float(), balance.detach().float(), contrastive.detach().float()]))
        return (loss, outputs) if return_outputs else loss

    def _token_scale(self) -> int:
        if not self.args.average_tokens_across_devices:
            return 1
        tensor_parallel = self.get_tp_size() if hasattr(self, "get_tp_size") else 1  # replicas share a batch
        return self.accelerator.num_processes // tensor_parallel

    def _record_terms(self, terms: torch.Tensor) -> None:
        self._term_sums = terms if self._term_sums is None else self._term_sums + terms
        # Every micro-batch of an optimizer step sees the same global_step: count each step once.
        if self._term_last_step != self.state.global_step:
            self._term_last_step = self.state.global_step
            self._term_steps += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # "loss" marks the training log of _maybe_log_save_evaluate (evaluation logs "eval_loss").
        if "loss" in logs and self._term_sums is not None and self._term_steps:
            # Every process logs together (as for `loss`): gather, then average over processes and steps.
            gathered = self.accelerator.gather(self._term_sums.reshape(1, -1)).reshape(-1, len(LOSS_TERMS))
            averaged = (gathered.mean(0) / self._term_steps).tolist()
            logs.update({LOG_NAMES[term]: value for term, value in zip(LOSS_TERMS, averaged)})
            self._term_sums, self._term_steps = None, 0
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The loss terms are no logits: keep them out of what evaluation gathers.
        if ignore_keys is None:
            ignore_keys = list(getattr(self._sparsedoctor_model(model).config, "keys_to_ignore_at_inference", []))
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=[*ignore_keys, "aux_losses"])

    # --- saving and loading: the adapter only ------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter's two files (on every rank: save_adapter commits the queues collectively, and rank 0
        writes), then, from the saving process, the tokenizer and the training arguments as Trainer does.
        `state_dict` only comes from the sharded setups refused at construction."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(self._sparsedoctor_model(), output_dir, replace_directory=False)
        if not self.args.should_save:
            return
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter(self._sparsedoctor_model(model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter(self._sparsedoctor_model(), self.state.best_model_checkpoint)
