"""save_adapter / load_adapter: `adapter_config.json` + `adapter_model.safetensors` (never pickle).

The adapter is every LoraMoELinear's router, experts, projection head and expert-queue state, keyed by the
module's path in the base model. Loading checks the config and the module list against the model first."""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import load_file, save_file

from sparsedoctor_kernels.model.config import SparseDoctorConfig
from sparsedoctor_kernels.model.wrapper import SparseDoctorModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ADAPTER_TENSORS = ("router", "lora_a", "lora_b", "head.weight", "head.bias", "queue.keys", "queue.ptr", "queue.size")


def _adapter_tensors(model: SparseDoctorModel) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in model.adapted_modules().items():
        state = module.state_dict(keep_vars=False)
        for key in ADAPTER_TENSORS:
            tensors[f"{name}.{key}"] = state[key]
    return tensors


def _describe(model: SparseDoctorModel) -> dict:
    base_config = model.config
    return {
        "format_version": FORMAT_VERSION,
        "sparsedoctor": model.sparsedoctor_config.to_dict(),
        "base_model": {key: getattr(base_config, key, None)
                       for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "vocab_size")},
        "modules": {name: [m.base.in_features, m.base.out_features] for name, m in model.adapted_modules().items()},
    }


def save_adapter(model: SparseDoctorModel, directory: str | pathlib.Path) -> pathlib.Path:
    """Write the adapter (staged queue rows are committed first, so nothing is lost). Returns the directory."""
    if not isinstance(model, SparseDoctorModel):
        raise TypeError(f"save_adapter needs the model returned by apply_sparsedoctor, got {type(model).__name__}")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.commit_queues()
    tensors = {key: value.detach().contiguous().cpu() for key, value in _adapter_tensors(model).items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt", "library": "sparsedoctor_kernels"})
    (directory / CONFIG_FILE).write_text(json.dumps(_describe(model), indent=2, ensure_ascii=False) + "\n")
    return directory


def load_adapter(model: SparseDoctorModel, directory: str | pathlib.Path) -> SparseDoctorModel:
    """Load an adapter saved by `save_adapter` into `model` (same config and modules), in place."""
    if not isinstance(model, SparseDoctorModel):
        raise TypeError(f"load_adapter needs the model returned by apply_sparsedoctor, got {type(model).__name__}")
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"refusing to load {directory}: it holds pickle files {pickles}, which can run code; "
                         f"an adapter is {CONFIG_FILE} + {WEIGHTS_FILE}")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"{directory} has no {required}: not a sparsedoctor adapter")
    saved = json.loads((directory / CONFIG_FILE).read_text())
    if saved.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_FILE}: format_version {saved.get('format_version')!r}, "
                         f"this library reads {FORMAT_VERSION}")
    expected = _describe(model)
    saved_config = SparseDoctorConfig.from_dict(saved["sparsedoctor"]).to_dict()
    differing = {k: (saved_config[k], expected["sparsedoctor"][k]) for k in saved_config
                 if saved_config[k] != expected["sparsedoctor"][k]}
    if differing:
        raise ValueError("the adapter's SparseDoctorConfig does not match the model's: "
                         + ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in differing.items()))
    if saved["modules"] != expected["modules"]:
        missing = sorted(set(expected["modules"]) ^ set(saved["modules"]))
        raise ValueError(f"the adapter was saved for other modules or sizes than this model has "
                         f"(differing: {missing[:5] or 'sizes'}); base model was {saved.get('base_model')}")
    tensors = load_file(directory / WEIGHTS_FILE)
    targets = _adapter_tensors(model)
    if set(tensors) != set(targets):
        raise ValueError(f"{WEIGHTS_FILE} holds tensors {sorted(set(tensors) ^ set(targets))[:5]} that do not "
                         "match the model's adapter")
    with torch.no_grad():
        for key, target in targets.items():
            if tensors[key].shape != target.shape:
                raise ValueError(f"{key}: saved shape {list(tensors[key].shape)}, model has {list(target.shape)}")
            target.copy_(tensors[key])
    for module in model.adapted_modules().values():
        module._staged.clear()
    return model
