"""What a training run measures and where it goes: each optimizer step's row to metrics.jsonl (and, with
--tensorboard, to TensorBoard event files in <output-dir>/tensorboard), and the held-out LM loss (eval_loss)."""

from __future__ import annotations

import json
import pathlib

import torch
import torch.distributed as dist

from sparsedoctor_kernels.train.data import collate, supervised_tokens_in

# The rows' numbers drawn in TensorBoard, under these tags.
TENSORBOARD_TAGS = {"loss": "train/loss", "lm": "train/lm", "balance": "train/balance",
                    "contrastive": "train/contrastive", "lr": "train/lr", "load_entropy": "train/load_entropy",
                    "eval_loss": "eval/loss", "eval_router_entropy": "eval/router_entropy",
                    "eval_load_entropy": "eval/load_entropy", "eval_max_load": "eval/max_load",
                    "eval_mi_domain_top1_bits": "eval/mi_domain_top1_bits",
                    "eval_mi_domain_top1_given_token_bits": "eval/mi_domain_top1_given_token_bits"}


class MetricsWriter:
    """Appends rows to metrics.jsonl (flushed each row, so an interrupted run keeps its steps) and, when asked,
    writes their numbers as TensorBoard scalars. A resumed run's TensorBoard writer purges the events of the
    steps after the checkpoint, as run_dir cuts metrics.jsonl back to it."""

    def __init__(self, metrics_path: pathlib.Path, tensorboard_dir: pathlib.Path | None, resumed_step: int):
        self._metrics = metrics_path.open("a", encoding="utf-8")
        self._board = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(str(tensorboard_dir), purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, row: dict) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self._board is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if key in row:
                    self._board.add_scalar(tag, row[key], row["step"])
            self._board.flush()

    def close(self) -> None:
        self._metrics.close()
        if self._board is not None:
            self._board.close()


@torch.no_grad()
def eval_loss(model, examples: list, pad_id: int, batch_size: int, device: torch.device, bf16: bool,
              world: int = 1, rank: int = 0) -> float:
    """The LM loss over `examples`: the mean over all their supervised tokens (not a mean of batch means), in
    eval mode (no dropout, no contrastive sampling, the expert queues untouched). Under DDP each rank takes every
    world-th example and the ranks sum their parts. The caller puts the model back in training mode."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (summed token losses, supervised tokens)
    mine = examples[rank::world]
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start: start + batch_size], pad_id)
        tokens = supervised_tokens_in(batch["labels"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**{k: v.to(device) for k, v in batch.items()})
        total[0] += out.aux_losses["lm"].double() * tokens  # the batch's mean over its supervised tokens
        total[1] += tokens
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])
