"""Saving and loading a checkpoint, `checkpoint-<step>/` in a run directory: the adapter, the optimizer moments
and the RNG state (tensors in safetensors, the rest in JSON: no pickle anywhere). A checkpoint is written under a
`.tmp` name and renamed when complete, and only then does `latest` name it."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import torch
import torch.distributed as dist

from sparsedoctor_kernels._util.files import write_atomically
from sparsedoctor_kernels.model import adapter
from sparsedoctor_kernels.model.adapter import WEIGHTS_FILE, load_adapter
from sparsedoctor_kernels.train.run_dir import LATEST_FILE, STATE_JSON, STATE_TENSORS
from sparsedoctor_kernels.train.settings import TrainError


def save_adapter(model, directory: pathlib.Path) -> None:
    """On every rank: under a process group save_adapter commits the staged queue rows with a collective
    all-gather, and rank 0 alone writes."""
    adapter.save_adapter(model, directory)


def save_checkpoint(model, optimizer, step: int, output_dir: pathlib.Path, rank: int) -> None:
    """Written into checkpoint-<step>.tmp/ and renamed when complete; then `latest` is replaced. A run killed
    in between leaves the previous checkpoint and `latest` intact."""
    staging = output_dir / f"checkpoint-{step}.tmp"
    save_adapter(model, staging / "adapter")
    rng_states = _gather_rng_states(model)  # a collective under distributed: every rank's own RNG state
    if rank != 0:
        return
    _write_trainer_state(optimizer, step, staging, rng_states)
    final = output_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)  # this step's checkpoint from an attempt that died before updating `latest`
    os.replace(staging, final)
    write_atomically(output_dir / LATEST_FILE, final.name + "\n")


def _device_of(model) -> torch.device:
    return next(p for p in model.parameters() if p.requires_grad).device


def _rng_state(model) -> dict[str, torch.Tensor]:
    """This process's RNG state: the CPU generator's, and the CUDA device's when training on CUDA."""
    state = {"torch_rng": torch.get_rng_state()}
    device = _device_of(model)
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _gather_rng_states(model) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG state, in rank order (on rank 0; the others get them too)."""
    own = _rng_state(model)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    return states


def _write_trainer_state(optimizer, step: int, directory: pathlib.Path,
                         rng_states: list[dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    optimizer_state = optimizer.state_dict()
    # `torch_rng` is rank 0's (what single-process checkpoints always held); `<name>.rank<r>` each rank's own.
    tensors = {"torch_rng": rng_states[0]["torch_rng"].cpu().clone()}
    for rank, state in enumerate(rng_states):
        for name, value in state.items():
            tensors[f"{name}.rank{rank}"] = value.cpu().clone()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, directory / STATE_TENSORS)
    (directory / STATE_JSON).write_text(json.dumps({"step": step, "param_groups": optimizer_state["param_groups"]}))


def load_checkpoint(model, optimizer, directory: pathlib.Path) -> None:
    """Restore the adapter, the optimizer and this rank's RNG state. A checkpoint that cannot be read (cut
    short, corrupt, or from another adapter) is a TrainError naming the file."""
    try:
        load_adapter(model, directory / "adapter")
    except Exception as error:  # safetensors' own errors are no ValueError
        raise TrainError(f"--resume: cannot load {directory / 'adapter' / WEIGHTS_FILE}: "
                         f"{_first_line(error)}") from None
    tensors_file, state_file = directory / STATE_TENSORS, directory / STATE_JSON
    try:
        from safetensors.torch import load_file

        tensors = load_file(tensors_file)
    except Exception as error:
        raise TrainError(f"--resume: cannot load {tensors_file}: {_first_line(error)}") from None
    try:
        saved = json.loads(state_file.read_text(encoding="utf-8"))
        param_groups = saved["param_groups"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise TrainError(f"--resume: cannot load {state_file}: {_first_line(error)}") from None
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    device = _device_of(model)
    try:
        optimizer.load_state_dict({"state": {int(i): {k: v.to(device) if k != "step" else v
                                                      for k, v in entry.items()}
                                             for i, entry in state.items()},
                                   "param_groups": param_groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise TrainError(f"--resume: {tensors_file} does not fit this adapter's optimizer: "
                         f"{_first_line(error)}") from None
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    cpu_rng = tensors.get(f"torch_rng.rank{rank}", tensors.get("torch_rng"))
    if cpu_rng is None:
        raise TrainError(f"--resume: {tensors_file} holds no RNG state")
    try:
        torch.set_rng_state(cpu_rng)
        if device.type == "cuda" and f"cuda_rng.rank{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"cuda_rng.rank{rank}"], device)
    except (RuntimeError, TypeError) as error:
        raise TrainError(f"--resume: {tensors_file}: its RNG state cannot be restored ({_first_line(error)})"
                         ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
