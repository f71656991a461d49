"""save_adapter / load_adapter: `adapter_config.json` + `adapter_model.safetensors` (never pickle).

The adapter is every LoraMoELinear's router, experts, projection head and expert-queue state, keyed by the
module's path in the base model. Saving writes a complete adapter or none (a temporary sibling directory is
renamed into place). Loading checks everything first (the config, the module list, every tensor's name, shape
and dtype) and only then copies, so a bad adapter leaves the model untouched.

The file names are PEFT's, the schema is not: the config's `peft_type` is a sentence PEFT shows when it refuses
the directory (its KeyError), and a PEFT adapter given to this loader is named as one, with how to load it."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsedoctor_kernels.model.config import SparseDoctorConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# transformers.Trainer's own state files in a checkpoint directory (torch.save pickles that Trainer reads with
# weights_only=True); never read here, so they may sit beside an adapter that SparseDoctorTrainer saved.
TRAINER_STATE_FILES = re.compile(r"(optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|training_args\.bin|"
                                 r"rng_state(_\d+)?\.pth)")
ADAPTER_TENSORS = ("router", "lora_a", "lora_b", "head.weight", "head.bias", "queue.keys", "queue.ptr", "queue.size")
# What PEFT reads first (`peft_type`) and so what it shows when it refuses this adapter: `PeftModel.from_pretrained`,
# `PeftConfig.from_pretrained` and transformers' `load_adapter` raise KeyError(<this text>). Optional when reading
# (adapters written before it was added lack it); when present it must be exactly this.
PEFT_TYPE_MARKER = ("SPARSEDOCTOR (not a PEFT adapter: a sparsedoctor_kernels mixture of LoRA experts; load it with "
                    "sparsedoctor_kernels.model.SparseDoctorModel.from_pretrained(base_model, directory))")
# The top-level fields of adapter_config.json and their JSON types; base_model is informational only.
REQUIRED_FIELDS = {"format_version": int, "sparsedoctor": dict, "modules": dict}
OPTIONAL_FIELDS = {"peft_type": str, "base_model": dict}
JSON_TYPE_NAMES = {int: "an integer", dict: "an object", str: "a string"}
# SparseDoctorConfig fields added after adapters were first written, with the value every adapter written before
# them had: an adapter without one means that, any other missing field is a damaged file.
FIELDS_ADDED_LATER = {"contrastive_mode": "paper", "contrastive_updates": "all"}
LISTED = 5  # names shown in an error message before "..."


def with_fields_added_later(described: dict) -> dict:
    """A SparseDoctorConfig dict as written by any version, with the fields added since filled in with what the
    writing version did: FIELDS_ADDED_LATER, and contrastive_at_zero_weight True where the weight was 0 (a zero
    weight computed the term before the field existed; at any other weight the field changes nothing)."""
    filled = {**FIELDS_ADDED_LATER, **described}
    if "contrastive_at_zero_weight" not in described:
        filled["contrastive_at_zero_weight"] = described.get("contrastive_coef") == 0
    return filled


@runtime_checkable
class AdaptedModel(Protocol):
    """What saving and loading need of a model, and all they assume of it (SparseDoctorModel has it): this module
    knows the wrapper by these members alone, so the wrapper can import it and not the other way round."""

    config: object  # the base model's Hugging Face config
    sparsedoctor_config: SparseDoctorConfig

    def adapted_modules(self) -> dict[str, torch.nn.Module]: ...

    def commit_queues(self) -> None: ...


def _require_model(model, caller: str) -> None:
    # Duck typing: the protocol's members are present (runtime_checkable checks exactly that) and the config is one.
    if not (isinstance(model, AdaptedModel) and isinstance(model.sparsedoctor_config, SparseDoctorConfig)):
        raise TypeError(f"{caller} needs the model returned by apply_sparsedoctor, got {type(model).__name__}")


def _adapter_tensors(model: AdaptedModel) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, module in model.adapted_modules().items():
        state = module.state_dict(keep_vars=False)
        for key in ADAPTER_TENSORS:
            tensors[f"{name}.{key}"] = state[key]
    return tensors


def _describe(model: AdaptedModel) -> dict:
    base_config = model.config
    return {
        "peft_type": PEFT_TYPE_MARKER,
        "format_version": FORMAT_VERSION,
        "sparsedoctor": model.sparsedoctor_config.to_dict(),
        "base_model": {key: getattr(base_config, key, None)
                       for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "vocab_size")},
        "modules": {name: [m.base.in_features, m.base.out_features] for name, m in model.adapted_modules().items()},
    }


def _listed(names) -> str:
    names = sorted(names)
    return str(names[:LISTED])[:-1] + (", ...]" if len(names) > LISTED else "]")


# ---------------------------------------------------------------------------------------------- saving


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def save_adapter(model: AdaptedModel, directory: str | pathlib.Path, *,
                 replace_directory: bool = True) -> pathlib.Path:
    """Write the adapter into `directory` (created, or replaced whole) and return the directory.

    Staged queue rows are committed first, so nothing is lost. Under an initialised torch.distributed process
    group this is a collective and must be called on every rank: committing gathers every rank's staged rows
    so all queues stay identical, then only rank 0 writes the files; the other ranks write nothing and return
    the directory once rank 0 has finished (an error on rank 0 is raised on every rank). Single-process, it
    just commits and writes.

    The files are written into a temporary sibling directory that is then renamed into place, so a crash
    mid-save leaves either the previous adapter or none at `directory`, never a half-written one. Since the
    directory is replaced whole, an existing one may hold nothing but an adapter's two files.

    `replace_directory=False` writes the two files into `directory` (created if missing) beside whatever else
    it holds, as a Trainer checkpoint or a model directory needs: each file is replaced atomically, the weights
    first, but the pair is not replaced as one. A PEFT adapter's config there is still refused."""
    _require_model(model, "save_adapter")
    directory = pathlib.Path(directory)
    write = _write_adapter if replace_directory else _write_adapter_files
    model.commit_queues()  # a collective under distributed: the reason every rank calls save_adapter
    if not _distributed():
        write(model, directory)
        return directory
    failure = None
    if dist.get_rank() == 0:
        try:
            write(model, directory)
        except Exception as error:  # told to the other ranks first, so none of them waits on rank 0 forever
            failure = error
    _share_outcome(model, failure is None, directory)
    if failure is not None:
        raise failure
    return directory


def _share_outcome(model: AdaptedModel, written: bool, directory: pathlib.Path) -> None:
    """Broadcast rank 0's success to every rank (on the queue's device, which the process group can use)."""
    device = next(iter(model.adapted_modules().values())).queue.ptr.device
    flag = torch.tensor([int(written)], device=device)
    dist.broadcast(flag, src=0)
    if not int(flag) and dist.get_rank() != 0:
        raise RuntimeError(f"rank 0 failed to write the adapter to {directory} (its error says why)")


def _adapter_files(model: AdaptedModel) -> tuple[dict[str, torch.Tensor], str]:
    """(the tensors on the CPU, the config's JSON text): what both ways of saving write."""
    tensors = {key: value.detach().contiguous().cpu() for key, value in _adapter_tensors(model).items()}
    return tensors, json.dumps(_describe(model), indent=2, ensure_ascii=False) + "\n"


def _save_weights(tensors: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    save_file(tensors, path, metadata={"format": "pt", "library": "sparsedoctor_kernels"})


def _write_adapter(model: AdaptedModel, directory: pathlib.Path) -> None:
    tensors, description = _adapter_files(model)
    # The real directory: a symlink keeps pointing at the adapter it names, and the sibling names are real.
    directory = pathlib.Path(os.path.realpath(directory))
    _check_replaceable(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.partial-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        _save_weights(tensors, staging / WEIGHTS_FILE)
        (staging / CONFIG_FILE).write_text(description, encoding="utf-8")
        for path in (staging / WEIGHTS_FILE, staging / CONFIG_FILE, staging):
            _fsync(path)  # the data is on disk before the rename that publishes it
        _move_into_place(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left after a failure: the rename consumed it


def _write_adapter_files(model: AdaptedModel, directory: pathlib.Path) -> None:
    """The two files into `directory`, leaving its other files alone; each one written beside its final name
    and renamed over it, the weights before the config."""
    tensors, description = _adapter_files(model)
    directory = pathlib.Path(os.path.realpath(directory))
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"cannot save an adapter to {directory}: it exists and is not a directory")
    _check_not_foreign(directory)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = f".partial-{uuid.uuid4().hex}"
    weights, config = directory / f".{WEIGHTS_FILE}{suffix}", directory / f".{CONFIG_FILE}{suffix}"
    try:
        _save_weights(tensors, weights)
        config.write_text(description, encoding="utf-8")
        for staged, final in ((weights, WEIGHTS_FILE), (config, CONFIG_FILE)):
            _fsync(staged)
            os.replace(staged, directory / final)
        _fsync(directory)
    finally:
        for leftover in (weights, config):  # only there after a failure
            leftover.unlink(missing_ok=True)


def _check_replaceable(directory: pathlib.Path) -> None:
    """The directory is replaced whole: refuse to delete anything that is not an adapter file."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"cannot save an adapter to {directory}: it exists and is not a directory")
    working = pathlib.Path(os.path.realpath(os.getcwd()))
    if directory == working or directory in working.parents:
        raise ValueError(f"cannot save an adapter to {directory}: saving replaces the whole directory, and it is "
                         "the working directory or holds it; name a directory of its own, e.g. ./adapter")
    foreign = [p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE)]
    if foreign:
        raise ValueError(f"cannot save an adapter to {directory}: saving replaces the whole directory and it holds "
                         f"other files {_listed(foreign)} (replace_directory=False writes the two adapter files "
                         "beside them)")
    _check_not_foreign(directory)


def _check_not_foreign(directory: pathlib.Path) -> None:
    existing = directory / CONFIG_FILE
    if existing.is_file() and not _is_sparsedoctor_config(existing):
        raise ValueError(f"cannot save an adapter to {directory}: its {CONFIG_FILE} is not a sparsedoctor adapter's "
                         "(a PEFT adapter uses the same file names); it is left as it is")


def _json_object(path: pathlib.Path) -> dict | None:
    """The file's JSON object, or None where it is unreadable or not an object (the full reader says why)."""
    try:
        described = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return described if isinstance(described, dict) else None


def _is_sparsedoctor_config(path: pathlib.Path) -> bool:
    described = _json_object(path)
    return (described is not None and "sparsedoctor" in described
            and described.get("peft_type", PEFT_TYPE_MARKER) == PEFT_TYPE_MARKER)


def _move_into_place(staging: pathlib.Path, directory: pathlib.Path) -> None:
    """Rename the complete staging directory to `directory`; an existing adapter is retired first (a crash
    between the two renames leaves no adapter at `directory`, not a mixed one)."""
    retired = None
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex}")
        os.replace(directory, retired)
    try:
        os.replace(staging, directory)
    except BaseException:
        if retired is not None:
            os.replace(retired, directory)
        raise
    _fsync(directory.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _fsync(path: pathlib.Path) -> None:
    # Some platforms (Windows) cannot open a directory to sync it; the rename is still atomic there.
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# ---------------------------------------------------------------------------------------------- loading


def load_adapter(model: AdaptedModel, directory: str | pathlib.Path) -> AdaptedModel:
    """Load an adapter saved by `save_adapter` into `model` (same config and modules), in place.

    Everything is checked before anything is copied, so on any error the model is unchanged. Errors are
    ValueErrors naming the file and the field or tensor (FileNotFoundError for a missing directory or file).
    Queue rows staged by earlier forwards are dropped: they were computed by the weights being replaced and
    must not enter the loaded queues."""
    _require_model(model, "load_adapter")
    directory = _adapter_directory(pathlib.Path(directory))
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    saved = _read_config(config_path)
    _check_matches_model(saved, _describe(model), config_path)
    values = _read_tensors(weights_path, _adapter_tensors(model), list(model.adapted_modules()))
    # Everything is checked and converted: the copies below have matching shapes and dtypes and cannot fail.
    with torch.no_grad():
        for target, value in values:
            target.copy_(value)
    for module in model.adapted_modules().values():
        module._staged.clear()
    return model


def read_adapter_config(directory: str | pathlib.Path) -> dict:
    """The adapter directory's `adapter_config.json`, checked field by field (no pickle files beside it, both
    files present), without loading any weights: what a tool reads before it builds the model to load into.
    Raises ValueError or FileNotFoundError naming the file and the field."""
    directory = _adapter_directory(pathlib.Path(directory))
    return _read_config(directory / CONFIG_FILE)


def _adapter_directory(directory: pathlib.Path) -> pathlib.Path:
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    _refuse_peft_adapter(directory)  # first: a PEFT directory may hold adapter_model.bin, a pickle
    pickles = sorted(p.name for p in directory.iterdir()
                     if p.suffix in PICKLE_SUFFIXES and not TRAINER_STATE_FILES.fullmatch(p.name))
    if pickles:
        raise ValueError(f"refusing to load {directory}: it holds pickle files {pickles}, which can run code; "
                         f"an adapter is {CONFIG_FILE} + {WEIGHTS_FILE}")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / required).is_file():
            raise FileNotFoundError(f"{directory} has no {required}: not a sparsedoctor adapter")
    return directory


def _refuse_peft_adapter(directory: pathlib.Path) -> None:
    """One line naming a PEFT adapter as one, and how to load it, rather than its first unknown field."""
    described = _json_object(directory / CONFIG_FILE)
    if (described is None or "sparsedoctor" in described
            or described.get("peft_type", PEFT_TYPE_MARKER) == PEFT_TYPE_MARKER):
        return  # ours (or no config at all): the full reader checks it
    peft_type = described["peft_type"]
    kind = "a PEFT LoRA adapter" if peft_type == "LORA" else f"a PEFT adapter (peft_type {peft_type!r})"
    raise ValueError(f"{directory / CONFIG_FILE}: {kind}, not a sparsedoctor one: load it with PEFT, "
                     f"peft.PeftModel.from_pretrained(base_model, {str(directory)!r})")


def _read_config(path: pathlib.Path) -> dict:
    """adapter_config.json parsed and checked field by field (SparseDoctorConfig included)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from None
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: the top level must be a JSON object, got {type(saved).__name__}")
    if "sparsedoctor" not in saved and "format_version" not in saved:
        raise ValueError(f"{path}: not a sparsedoctor adapter config (it has neither 'sparsedoctor' nor "
                         f"'format_version'; its fields: {_listed(saved)})")
    _check_format_version(saved, path)
    _check_top_level_fields(saved, path)
    if saved.get("peft_type", PEFT_TYPE_MARKER) != PEFT_TYPE_MARKER:
        raise ValueError(f"{path}: field 'peft_type' must be {PEFT_TYPE_MARKER!r} (the text PEFT shows when it "
                         f"refuses this adapter), got {saved['peft_type']!r}")
    if isinstance(saved["sparsedoctor"], dict):
        saved["sparsedoctor"] = with_fields_added_later(saved["sparsedoctor"])
    _check_sparsedoctor_config(saved["sparsedoctor"], path)
    _check_modules(saved["modules"], path)
    return saved


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no integer


def _has_json_type(value, kind: type) -> bool:
    return _is_int(value) if kind is int else isinstance(value, kind)


def _check_format_version(saved: dict, path: pathlib.Path) -> None:
    version = saved.get("format_version")
    if "format_version" not in saved or not _is_int(version):
        raise ValueError(f"{path}: field 'format_version' must be an integer, got {version!r}")
    if version != FORMAT_VERSION:
        newer = " (written by a newer version of sparsedoctor_kernels)" if version > FORMAT_VERSION else ""
        raise ValueError(f"{path}: format_version {version}{newer}, this library reads {FORMAT_VERSION}")


def _check_top_level_fields(saved: dict, path: pathlib.Path) -> None:
    known = {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}
    unknown = set(saved) - set(known)
    if unknown:
        raise ValueError(f"{path}: unknown fields {_listed(unknown)}; an adapter config has {sorted(known)}")
    missing = set(REQUIRED_FIELDS) - set(saved)
    if missing:
        raise ValueError(f"{path}: missing fields {_listed(missing)}")
    for name, kind in known.items():
        if name in saved and not _has_json_type(saved[name], kind):
            raise ValueError(f"{path}: field {name!r} must be {JSON_TYPE_NAMES[kind]}, "
                             f"got {type(saved[name]).__name__}")


def _check_sparsedoctor_config(fields: dict, path: pathlib.Path) -> None:
    # Every field is required: a default silently standing in for a lost field could hide a damaged file.
    missing = set(SparseDoctorConfig.field_names()) - set(fields)
    if missing:
        raise ValueError(f"{path}: field 'sparsedoctor' lacks {_listed(missing)}")
    try:
        SparseDoctorConfig.from_dict(fields)
    except ValueError as error:
        raise ValueError(f"{path}: field 'sparsedoctor': {error}") from None


def _check_modules(modules: dict, path: pathlib.Path) -> None:
    for name, sizes in modules.items():
        if not (isinstance(sizes, list) and len(sizes) == 2 and all(_is_int(s) and s > 0 for s in sizes)):
            raise ValueError(f"{path}: modules[{name!r}] must be [in_features, out_features], got {sizes!r}")


def _check_matches_model(saved: dict, expected: dict, path: pathlib.Path) -> None:
    saved_config = SparseDoctorConfig.from_dict(saved["sparsedoctor"]).to_dict()
    model_config = expected["sparsedoctor"]
    differing = [f"{k}: adapter {saved_config[k]!r} vs model {model_config[k]!r}"
                 for k in saved_config if saved_config[k] != model_config[k]]
    if differing:
        raise ValueError(f"{path}: the adapter's SparseDoctorConfig does not match the model's: "
                         + ", ".join(differing))
    saved_modules, model_modules = saved["modules"], expected["modules"]
    if saved_modules != model_modules:
        only_saved = set(saved_modules) - set(model_modules)
        only_model = set(model_modules) - set(saved_modules)
        resized = {n for n in set(saved_modules) & set(model_modules) if saved_modules[n] != model_modules[n]}
        raise ValueError(f"{path}: the adapter was saved for other modules or sizes than this model has "
                         f"(only in the adapter: {_listed(only_saved)}, only in the model: {_listed(only_model)}, "
                         f"other sizes: {_listed(resized)}); base model was {saved.get('base_model')}")


def _read_tensors(path: pathlib.Path, targets: dict[str, torch.Tensor],
                  module_names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, value) pairs with every value already in its target's shape, dtype and device."""
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    missing, unexpected = set(targets) - set(tensors), set(tensors) - set(targets)
    if missing or unexpected:
        raise ValueError(f"{path}: the tensors do not match the model's adapter (missing: {_listed(missing)}, "
                         f"unexpected: {_listed(unexpected)})")
    for key, target in targets.items():
        _check_tensor(path, key, tensors[key], target)
    for name in module_names:
        capacity = targets[f"{name}.queue.keys"].shape[1]
        _check_queue_state(path, name, tensors[f"{name}.queue.ptr"], tensors[f"{name}.queue.size"], capacity)
    return [(target, tensors[key].to(device=target.device, dtype=target.dtype)) for key, target in targets.items()]


def _check_tensor(path: pathlib.Path, key: str, value: torch.Tensor, target: torch.Tensor) -> None:
    if value.shape != target.shape:
        raise ValueError(f"{path}: tensor {key}: shape {list(value.shape)}, the model has {list(target.shape)}")
    # Floats load into floats of any precision, integers into integers; anything else would change meaning.
    castable = (value.dtype.is_floating_point and target.dtype.is_floating_point) or (
        _is_integer_dtype(value.dtype) and _is_integer_dtype(target.dtype))
    if not castable:
        raise ValueError(f"{path}: tensor {key}: dtype {value.dtype} cannot be loaded into the model's "
                         f"{target.dtype}")


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_queue_state(path: pathlib.Path, name: str, ptr: torch.Tensor, size: torch.Tensor, capacity: int) -> None:
    """A ring's next slot in [0, Q) (0 when Q = 0) and its fill in [0, Q]: anything else breaks enqueue."""
    ptr, size = ptr.long(), size.long()
    if bool(((ptr < 0) | (ptr >= max(capacity, 1))).any()):
        raise ValueError(f"{path}: tensor {name}.queue.ptr: values {ptr.tolist()} outside [0, {capacity})")
    if bool(((size < 0) | (size > capacity)).any()):
        raise ValueError(f"{path}: tensor {name}.queue.size: values {size.tolist()} outside [0, {capacity}]")
