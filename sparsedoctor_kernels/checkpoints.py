"""Saving and loading a checkpoint, `checkpoint-<step>/` in a run directory: the adapter, the optimizer moments
and the RNG state (tensors in safetensors, the rest in JSON: no pickle anywhere). A checkpoint is written under a
`.tmp` name and renamed when complete, and only then does `latest` name it."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch

from sparsedoctor_kernels import model as sparsedoctor_model
from sparsedoctor_kernels.model import load_adapter
from sparsedoctor_kernels.run_dir import LATEST_FILE, STATE_JSON, STATE_TENSORS, write_atomically


def save_adapter(model, directory: pathlib.Path) -> None:
    """On every rank: under a process group save_adapter commits the staged queue rows with a collective
    all-gather, and rank 0 alone writes."""
    sparsedoctor_model.save_adapter(model, directory)


def save_checkpoint(model, optimizer, step: int, output_dir: pathlib.Path, rank: int) -> None:
    """Written into checkpoint-<step>.tmp/ and renamed when complete; then `latest` is replaced. A run killed
    in between leaves the previous checkpoint and `latest` intact."""
    staging = output_dir / f"checkpoint-{step}.tmp"
    save_adapter(model, staging / "adapter")
    if rank != 0:
        return
    _write_trainer_state(optimizer, step, staging)
    final = output_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)  # this step's checkpoint from an attempt that died before updating `latest`
    os.replace(staging, final)
    write_atomically(output_dir / LATEST_FILE, final.name + "\n")


def _write_trainer_state(optimizer, step: int, directory: pathlib.Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    optimizer_state = optimizer.state_dict()
    tensors = {"torch_rng": torch.get_rng_state()}
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, directory / STATE_TENSORS)
    (directory / STATE_JSON).write_text(json.dumps({"step": step, "param_groups": optimizer_state["param_groups"]}))


def load_checkpoint(model, optimizer, directory: pathlib.Path) -> None:
    from safetensors.torch import load_file

    load_adapter(model, directory / "adapter")
    tensors = load_file(directory / STATE_TENSORS)
    saved = json.loads((directory / STATE_JSON).read_text())
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    device = next(p for p in model.parameters() if p.requires_grad).device
    optimizer.load_state_dict({"state": {i: {k: v.to(device) if k != "step" else v for k, v in entry.items()}
                                         for i, entry in state.items()},
                               "param_groups": saved["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
