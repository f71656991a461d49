"""The settings of `sparsedoctor train`: TrainSettings, whose fields carry their flag's value type and help text in
their metadata (cli.py generates the command line from them), their checks, and a run config file (YAML or JSON)
read into them. A setting's value comes from, in rising precedence: the field's default, the --config file, a
flag given on the command line. TrainError (and NoCheckpointError) are the run's one-line user errors, raised by
every module of train/."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import pathlib
import typing
from dataclasses import dataclass, field

from sparsedoctor_kernels.model import SparseDoctorConfig
from sparsedoctor_kernels.train.data.rendering import MODES as RENDERING_MODES


class TrainError(ValueError):
    """A user error (settings, data, model path, output directory, resume state), said in one line."""


class NoCheckpointError(TrainError, FileNotFoundError):
    """--resume where there is no checkpoint to resume from."""


# The CLI flag of a TrainSettings / SparseDoctorConfig field, where it is not "--" + the field with dashes.
# `r` is `--lora-r`: torchrun's own parser reads `--r` as an ambiguous prefix of its `--rdzv-*` flags.
FLAG_NAMES = {"learning_rate": "--lr", "r": "--lora-r", "progress": "--no-progress"}
DEFAULT_STEPS = 100  # when neither steps nor epochs is given
CHAT_TEMPLATES = RENDERING_MODES  # --chat-template: the data's rendering modes


def flag_for(name: str) -> str:
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _setting(default=dataclasses.MISSING, *, type: type, help: str, shown: str | None = None,
             factory=dataclasses.MISSING):
    """A field with its flag's value type (int, float, str, bool, or list: a list of strings) and help text;
    `shown` is the default in --help's words, where the value alone would not say it (None, [])."""
    return field(default=default, default_factory=factory, metadata={"type": type, "help": help, "shown": shown})


@dataclass
class TrainSettings:
    output_dir: str = _setting("sparsedoctor-run", type=str, help="the run directory (one run each)")
    model: str = _setting("tiny", type=str, help="'tiny' (a small random Qwen3 with a BPE tokenizer trained on the "
                          "data) or a local Hugging Face model directory")
    data: list[str] = _setting(factory=list, type=list, shown="the bundled demo set",
                               help="JSONL files of instruction or multiple-choice records")
    steps: int | None = _setting(None, type=int, shown=f"{DEFAULT_STEPS}, or from --epochs",
                                 help="optimizer steps (give --steps or --epochs, not both)")
    epochs: float | None = _setting(None, type=float, shown="none: --steps decides",
                                    help="passes over the training examples instead of --steps: steps = ceil(epochs "
                                    "x examples / (batch size x processes x accumulation steps))")
    batch_size: int = _setting(8, type=int, help="examples per micro-batch, per process")
    gradient_accumulation_steps: int = _setting(1, type=int, help="micro-batches whose gradients make one optimizer "
                                                "step: the effective batch is batch size x processes x this")
    learning_rate: float = _setting(2e-4, type=float, help="peak AdamW learning rate, after a linear warmup and "
                                    "before a cosine decay to a tenth of it")
    weight_decay: float = _setting(0.0, type=float, help="AdamW (decoupled) weight decay on the adapter parameters")
    warmup_steps: int = _setting(10, type=int, help="optimizer steps of linear learning-rate warmup")
    max_length: int = _setting(512, type=int, help="tokens of prompt + response; longer examples are truncated, "
                               "with a warning")
    chat_template: str = _setting("auto", type=str, help="how records are rendered: auto (the tokenizer's chat "
                                  "template when it has one, else plain), chat (the template, required) or plain")
    enable_thinking: bool = _setting(False, type=bool, help="enable_thinking for the chat template (Qwen3's reads "
                                     "it)")
    eval_split: float = _setting(0.0, type=float, help="fraction of the data records held out for the eval loss, "
                                 "chosen by --seed (0: none)")
    eval_data: list[str] = _setting(factory=list, type=list, shown="none",
                                    help="held-out JSONL files for the eval loss (instead of --eval-split)")
    eval_every: int = _setting(50, type=int, help="held-out LM loss (eval_loss in metrics.jsonl) every N optimizer "
                               "steps and after the last (0: only after the last)")
    seed: int = _setting(0, type=int, help="seed of the data order, the eval split, the adapter initialisation and "
                         "the tiny model")
    device: str | None = _setting(None, type=str, shown="cuda when available, else cpu", help="cpu, cuda or cuda:N")
    bf16: bool = _setting(False, type=bool, help="bf16 autocast (and a bf16 base model)")
    gradient_checkpointing: bool = _setting(False, type=bool, help="recompute activations in the backward pass: "
                                            "less memory, more time")
    save_every: int = _setting(50, type=int, help="checkpoint every N optimizer steps (0: never)")
    resume: bool = _setting(False, type=bool, help="continue the run in --output-dir from its latest checkpoint "
                            "(same settings)")
    overwrite: bool = _setting(False, type=bool, help="start over: remove the previous run in --output-dir "
                               "(checkpoints, latest, metrics, adapter, plots, tensorboard) first")
    progress: bool = _setting(True, type=bool, shown="a progress bar", help="no progress bar")
    tensorboard: bool = _setting(False, type=bool, help="also write TensorBoard event files to "
                                 "<output-dir>/tensorboard (needs the tensorboard package)")
    tiny_vocab_size: int = _setting(1500, type=int, help="--model tiny: vocabulary of the BPE tokenizer trained on "
                                    "the data")
    adapter: SparseDoctorConfig = _setting(factory=SparseDoctorConfig, type=SparseDoctorConfig,
                                           help="the adapter's hyper-parameters (an `adapter:` mapping in a config "
                                           "file; their own flags on the command line)")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["adapter"] = self.adapter.to_dict()
        return data


# SparseDoctorConfig's fields' help (model/config.py holds the fields, this module their command-line words).
ADAPTER_HELP = {
    "num_experts": "LoRA experts per adapted linear layer",
    "top_k": "experts each token is routed to",
    "r": "rank of each expert's LoRA",
    "lora_alpha": "LoRA alpha: the experts' update is scaled by alpha / r",
    "lora_dropout": "dropout on the adapter's input",
    "target_modules": "the linear layers to adapt, by the last part of their module name",
    "proj_dim": "output width of the contrastive projection heads",
    "queue_size": "routed views kept per expert as the contrastive term's negatives",
    "temperature": "InfoNCE temperature of the contrastive term",
    "balance_coef": "weight of the load-balance term in the loss",
    "contrastive_coef": "weight of the contrastive (InfoNCE) term in the loss; unset, the mode's measured weight: "
                        "0.03 for router, 0.1 for paper and sequence",
    "contrastive_tokens": "tokens per forward the contrastive term samples (0: no contrastive term)",
    "contrastive_mode": "the contrastive objective: router (InfoNCE of routing distributions against the "
                        "sequence's, other sequences' as negatives; the measured default), paper (the routed view "
                        "against the token's own fused view, the expert queue's negatives: our reading of "
                        "SparseDoctor) or sequence (the routed view against the mean fused view of the other "
                        "sampled tokens of its sequence)",
    "contrastive_at_zero_weight": "compute the contrastive term even at --contrastive-coef 0, weighted 0 (the "
                                  "ablation's random-stream control); off, a zero weight computes nothing",
    "contrastive_updates": "what the contrastive term trains: all (experts, router, heads) or router (router and "
                           "heads; the experts' outputs enter its views detached)",
}


def setting_fields() -> dict[str, dataclasses.Field]:
    """TrainSettings' fields but `adapter` (whose fields are the adapter's own)."""
    return {f.name: f for f in dataclasses.fields(TrainSettings) if f.name != "adapter"}


def adapter_types() -> dict[str, type]:
    """SparseDoctorConfig field -> its value type (int, float, or list for a tuple of strings)."""
    declared = typing.get_type_hints(SparseDoctorConfig)

    def value_type(hint):
        if typing.get_origin(hint) is tuple:
            return list
        given = [t for t in typing.get_args(hint) if t is not type(None)]  # `float | None`: None means "the default"
        return given[0] if typing.get_args(hint) and len(given) == 1 else hint

    return {name: value_type(declared[name]) for name in SparseDoctorConfig.field_names()}


def adapter_help(name: str) -> str:
    """The field's own metadata help, else ADAPTER_HELP's (a field in neither still gets its flag; a test asks
    for its help)."""
    own = next(f for f in dataclasses.fields(SparseDoctorConfig) if f.name == name).metadata.get("help")
    return own or ADAPTER_HELP.get(name, f"SparseDoctorConfig.{name}")


# --- checks ---------------------------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_settings(settings: TrainSettings) -> None:
    minimums = {"batch_size": 1, "gradient_accumulation_steps": 1, "max_length": 1, "warmup_steps": 0,
                "save_every": 0, "eval_every": 0, "tiny_vocab_size": 1}
    if settings.steps is not None:
        minimums["steps"] = 1
    for name, minimum in minimums.items():
        value = getattr(settings, name)
        if not _is_int(value) or value < minimum:
            raise TrainError(f"{flag_for(name)} must be an integer >= {minimum}, got {value!r}")
    if settings.steps is not None and settings.epochs is not None:
        raise TrainError(f"--steps ({settings.steps}) and --epochs ({settings.epochs}) both say how long to train: "
                         "pass one of them")
    if settings.epochs is not None and not (_is_number(settings.epochs) and settings.epochs > 0):
        raise TrainError(f"--epochs must be a finite number > 0, got {settings.epochs!r}")
    rate = settings.learning_rate
    if not (_is_number(rate) and rate > 0):
        raise TrainError(f"--lr must be a finite number > 0, got {rate!r}")
    if not (_is_number(settings.weight_decay) and settings.weight_decay >= 0):
        raise TrainError(f"--weight-decay must be a finite number >= 0, got {settings.weight_decay!r}")
    if not (_is_number(settings.eval_split) and 0 <= settings.eval_split < 1):
        raise TrainError(f"--eval-split must be a fraction in [0, 1), got {settings.eval_split!r}")
    for name in ("data", "eval_data"):
        paths = getattr(settings, name)
        if not isinstance(paths, (list, tuple)) or not all(isinstance(p, str) for p in paths):
            raise TrainError(f"{flag_for(name)} must be a list of JSONL file paths, got {paths!r}")
    if settings.eval_split and settings.eval_data:
        raise TrainError("--eval-split holds part of --data out and --eval-data names held-out files: pass one of "
                         "them")
    for name in ("output_dir", "model", "chat_template") + (("device",) if settings.device is not None else ()):
        if not isinstance(getattr(settings, name), str):
            raise TrainError(f"{flag_for(name)} must be a string, got {getattr(settings, name)!r}")
    if settings.chat_template not in CHAT_TEMPLATES:
        raise TrainError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, got {settings.chat_template!r}")
    for name, f in setting_fields().items():
        if f.metadata["type"] is bool and not isinstance(getattr(settings, name), bool):
            raise TrainError(f"{name} must be true or false, got {getattr(settings, name)!r}")
    if settings.resume and settings.overwrite:
        raise TrainError("--resume continues the run in --output-dir and --overwrite removes it: pass one of them")
    if settings.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard (or the "
                         "sparsedoctor_kernels[tensorboard] extra)")
    if not isinstance(settings.adapter, SparseDoctorConfig):
        raise TrainError(f"adapter must be a SparseDoctorConfig, got {type(settings.adapter).__name__}")


def resolved_steps(settings: TrainSettings, num_examples: int, world: int) -> int:
    """The optimizer steps to train: --steps, or --epochs passes over `num_examples` training examples."""
    if settings.epochs is None:
        return DEFAULT_STEPS if settings.steps is None else settings.steps
    per_step = settings.batch_size * world * settings.gradient_accumulation_steps
    return max(1, math.ceil(settings.epochs * num_examples / per_step))


# --- config files ---------------------------------------------------------------------------------------------

def read_config_file(path: str | pathlib.Path) -> dict:
    """The settings a YAML (.yaml, .yml) or JSON (.json) file gives, checked: {field: value}, with `adapter` a
    {field: value} dict of SparseDoctorConfig fields. Keys are the fields' names (learning_rate, not --lr);
    relative paths in it are read from the working directory, as flags are."""
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise TrainError(f"--config {path}: a config file is YAML (.yaml, .yml) or JSON (.json), by its suffix")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise TrainError(f"--config {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from None
    data = _parse_json(text, path) if suffix == ".json" else _parse_yaml(text, path)
    if data is None:
        data = {}  # an empty YAML file: nothing set
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a mapping of settings (field: value), got {type(data).__name__}")
    known = setting_fields()
    values = {}
    for key, value in data.items():
        if key == "adapter":
            values["adapter"] = _adapter_values(value, path)
        elif key in known:
            values[key] = _checked(key, value, known[key].metadata["type"], path, nullable=known[key].default is None)
        else:
            raise TrainError(f"{path}: unknown key {key!r}{_did_you_mean(key, [*known, 'adapter'])}; keys are "
                             "TrainSettings field names, with SparseDoctorConfig's under adapter:")
    return values


def _parse_json(text: str, path: pathlib.Path):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TrainError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None


def _parse_yaml(text: str, path: pathlib.Path):
    try:
        import yaml
    except ImportError:
        raise TrainError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml, or the "
                         "sparsedoctor_kernels[train] extra); or write the settings as a .json file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise TrainError(f"{where}: malformed YAML ({problem})") from None


def _adapter_values(value, path: pathlib.Path) -> dict:
    if not isinstance(value, dict):
        raise TrainError(f"{path}: adapter must be a mapping of SparseDoctorConfig fields, got {type(value).__name__}")
    types = adapter_types()
    values = {}
    for key, item in value.items():
        if key not in types:
            raise TrainError(f"{path}: unknown key 'adapter.{key}'{_did_you_mean(key, list(types))}; adapter keys are "
                             f"SparseDoctorConfig fields: {', '.join(types)}")
        values[key] = _checked(f"adapter.{key}", item, types[key], path, nullable=False)
    return values


def _checked(key: str, value, kind: type, path: pathlib.Path, nullable: bool):
    """`value` as a setting of type `kind`, or a one-line error naming the key and the file. YAML reads `2e-4`
    (no dot) as a string: a float setting takes a string that is a number."""
    if value is None and nullable:
        return None
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is list and isinstance(value, str):
        value = [value]  # one path or module name
    fits = {int: _is_int, float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
            list: lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v)}[kind]
    if not fits(value):
        wanted = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                  list: "a list of strings"}[kind]
        raise TrainError(f"{path}: {key} must be {wanted}{' or null' if nullable else ''}, got {value!r}")
    return value


def _did_you_mean(key, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(key), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def merged_values(file_values: dict, flag_values: dict) -> dict:
    """The config file's values with the given flags' on top: {field: value, "adapter": {field: value}}. A flag
    giving --steps or --epochs replaces the file's other one (they are two ways to say one thing)."""
    adapter_fields = set(SparseDoctorConfig.field_names())
    values = {k: v for k, v in file_values.items() if k != "adapter"}
    adapter = dict(file_values.get("adapter", {}))
    for name, value in flag_values.items():
        (adapter if name in adapter_fields else values)[name] = value
    for given, other in (("steps", "epochs"), ("epochs", "steps")):
        if given in flag_values and other not in flag_values:
            values.pop(other, None)
    return {**values, "adapter": adapter}
