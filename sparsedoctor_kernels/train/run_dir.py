"""What a run directory is, and how it is kept to one run. It holds `run_config.json` (the resolved settings),
`metrics.jsonl` (one line a step), `loss.png` and `expert_load.png`, `tensorboard/` (with --tensorboard),
`checkpoint-<step>/` (adapter + trainer state, for `--resume`) with `latest` naming the newest, and finally
`adapter/` and `tokenizer/`. Before a run starts, a fresh run refuses a
directory holding another run (unless --overwrite) and --resume needs a compatible run with a checkpoint; then
rank 0 prepares the directory. Files here are written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile

from sparsedoctor_kernels._util.files import PARTIAL, write_atomically
from sparsedoctor_kernels.model.adapter import CONFIG_FILE, WEIGHTS_FILE, with_fields_added_later
from sparsedoctor_kernels.train.settings import NoCheckpointError, TrainError, TrainSettings

RUN_FILE = "run_config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LATEST_FILE = "latest"
STATE_TENSORS = "trainer_state.safetensors"  # optimizer moments and the RNG state: no pickle anywhere
STATE_JSON = "trainer_state.json"
# What a run writes at the top of its directory (besides checkpoint-<step>[.tmp]/): a fresh run refuses a
# directory that holds any of them, --overwrite removes them. Other files are the user's and are left alone.
RUN_ENTRIES = (RUN_FILE, METRICS_FILE, LATEST_FILE, "adapter", "tokenizer", "loss.png", "expert_load.png",
               TENSORBOARD_DIR)
# checkpoint-<step>/, one being written (.tmp), and what a killed save_adapter leaves of adapter/.
UNNAMED_ENTRIES = re.compile(r"checkpoint-\d+(\.tmp)?|\.adapter\.partial-\w+")
# Settings a resumed run may change: they do not alter what is being trained (steps and epochs: how long).
RESUMABLE_CHANGES = frozenset({"output_dir", "steps", "epochs", "resume", "overwrite", "progress", "save_every",
                               "device", "gradient_checkpointing", "eval_every", "tensorboard"})


def run_entries(output_dir: pathlib.Path) -> list[pathlib.Path]:
    """The files and directories a previous run left in `output_dir` (empty for a fresh or missing one)."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir()
                  if p.name.removesuffix(PARTIAL) in RUN_ENTRIES or UNNAMED_ENTRIES.fullmatch(p.name))


def unfinished_entries(output_dir: pathlib.Path) -> list[pathlib.Path]:
    """What an interrupted run left half-written: checkpoint-<step>.tmp/ and *.partial files."""
    return [p for p in run_entries(output_dir) if p.name.endswith((".tmp", PARTIAL)) or ".partial-" in p.name]


def check_output_dir(output_dir: pathlib.Path) -> None:
    """The directory is (or can be created as) a directory we can write in: tried, not guessed from the mode
    bits, which root ignores. Nothing is left behind."""
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainError(f"--output-dir {output_dir} is a file, not a directory")
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise TrainError(f"--output-dir {output_dir}: {existing} is a file, not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=".sparsedoctor-write-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise TrainError(f"--output-dir {output_dir}: cannot write in {existing} ({error.strerror})") from None


def holds_run(output_dir: pathlib.Path) -> bool:
    """A directory holds a run only when it has run_config.json or a checkpoint-<step>/ with trainer state: an
    `adapter/`, `latest` or `loss.png` alone may be the user's own."""
    if (output_dir / RUN_FILE).is_file():
        return True
    return output_dir.is_dir() and any(re.fullmatch(r"checkpoint-\d+", p.name) and (p / STATE_JSON).is_file()
                                       for p in output_dir.iterdir())


def check_run_dir(settings: TrainSettings, output_dir: pathlib.Path) -> tuple[pathlib.Path, int] | None:
    """A fresh run needs a directory without another run in it (or --overwrite); --resume needs a compatible
    run with a checkpoint. Entries named like a run's but without a run (no run_config.json, no checkpoint)
    are not ours: refused, never removed. Returns (checkpoint directory, step) to resume from, or None."""
    if settings.resume:
        found = find_checkpoint(settings, output_dir)
        check_outputs_writable(settings, output_dir, found[1])
        return found
    entries = run_entries(output_dir)
    if entries and not holds_run(output_dir):
        names = ", ".join(p.name for p in entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise TrainError(f"--output-dir {output_dir} holds {names}, which a run would write over, but no "
                         f"training run ({RUN_FILE}): they are not removed; move them away or choose another "
                         "--output-dir")
    if entries and not settings.overwrite:
        names = ", ".join(p.name for p in entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise TrainError(f"--output-dir {output_dir} already holds a training run ({names}); pass --resume to "
                         "continue it or --overwrite to start over")
    return None


def find_checkpoint(settings: TrainSettings, output_dir: pathlib.Path) -> tuple[pathlib.Path, int]:
    latest = output_dir / LATEST_FILE
    if not latest.is_file():
        raise NoCheckpointError(f"--resume: no checkpoint in {output_dir} (no '{LATEST_FILE}' file)")
    directory = output_dir / latest.read_text(encoding="utf-8").strip()
    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        raise NoCheckpointError(f"--resume: {latest} names {directory.name}, which is missing or incomplete")
    check_same_run(settings, output_dir)
    step = _read_json(directory / STATE_JSON).get("step")
    if not isinstance(step, int):
        raise TrainError(f"--resume: {directory / STATE_JSON} holds no step")
    if step == settings.steps and not final_outputs_written(output_dir):
        return directory, step  # killed after its last checkpoint: the final outputs are still to be written
    if step >= settings.steps:
        raise TrainError(f"--resume: {directory.name} is at step {step} and --steps is {settings.steps}: nothing "
                         "is left to train; raise --steps")
    return directory, step


def final_outputs_written(output_dir: pathlib.Path) -> bool:
    return (output_dir / "adapter" / WEIGHTS_FILE).is_file() and (output_dir / "tokenizer").is_dir()


def check_outputs_writable(settings: TrainSettings, output_dir: pathlib.Path, start: int) -> None:
    """Before a resumed run trains: the final adapter/ (replaced whole, so holding only an adapter's files),
    tokenizer/ and the checkpoints still to come can be written."""
    adapter = output_dir / "adapter"
    if adapter.exists() or adapter.is_symlink():
        if not adapter.is_dir():
            raise TrainError(f"--resume: {adapter} is not a directory, so the final adapter cannot be written there")
        foreign = sorted(p.name for p in adapter.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if foreign:
            raise TrainError(f"--resume: {adapter} holds other files ({', '.join(foreign[:6])}) and the final "
                             "adapter replaces the whole directory; move them away first")
    tokenizer = output_dir / "tokenizer"
    if tokenizer.exists() and not tokenizer.is_dir():
        raise TrainError(f"--resume: {tokenizer} is not a directory, so the tokenizer cannot be written there")
    if settings.save_every:
        for step in range(start + 1, settings.steps + 1):
            checkpoint = output_dir / f"checkpoint-{step}"
            if step % settings.save_every == 0 and checkpoint.exists() and not checkpoint.is_dir():
                raise TrainError(f"--resume: {checkpoint} is not a directory, so that checkpoint cannot be written")


def data_digests(settings: TrainSettings) -> dict[str, str]:
    """The sha256 of each data and eval data file that can be read (one that cannot is reported when the data is
    loaded)."""
    digests = {}
    for path in [*settings.data, *settings.eval_data]:
        try:
            with open(path, "rb") as handle:
                digests[path] = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError:
            continue
    return digests


def run_record(settings: TrainSettings) -> dict:
    """What run_config.json holds: the settings and the sha256 of each data file."""
    return {**json.loads(json.dumps(settings.to_dict())), DATA_DIGESTS: data_digests(settings)}


DATA_DIGESTS = "data_sha256"


def check_same_run(settings: TrainSettings, output_dir: pathlib.Path) -> None:
    """Refuse to resume with settings that change what is trained (data, model, schedule, adapter...)."""
    run_file = output_dir / RUN_FILE
    if not run_file.is_file():
        raise TrainError(f"--resume: {output_dir} has no {RUN_FILE}, so its settings cannot be checked")
    now = json.loads(json.dumps(settings.to_dict()))  # tuples as lists, as the saved file has them
    saved = _with_defaults(_read_json(run_file))
    saved_digests = saved.pop(DATA_DIGESTS, None)
    differences = settings_differences(saved, now)
    if differences:
        raise TrainError(f"--resume: the run in {output_dir} was trained with other settings ("
                         + "; ".join(differences) + "); resume with the run's settings or pass --overwrite")
    if isinstance(saved_digests, dict):
        for path, digest in data_digests(settings).items():
            if path in saved_digests and saved_digests[path] != digest:
                raise TrainError(f"--resume: the data file {path} changed since the run in {output_dir} began "
                                 "(its sha256 differs); resume with the run's data or pass --overwrite")


def _with_defaults(saved: dict) -> dict:
    """A run_config.json written before a setting existed ran as its default then did: today's default fills
    it in, except for the adapter fields whose default has changed since (a run from before the contrastive
    mode existed ran the paper mode, not today's router mode)."""
    defaults = json.loads(json.dumps(TrainSettings().to_dict()))
    adapter = saved.get("adapter")
    if isinstance(adapter, dict):
        saved = {**saved, "adapter": {**defaults["adapter"], **with_fields_added_later(adapter)}}
    return {**defaults, **saved}


def settings_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    missing = "<absent>"
    differences = []
    for key in sorted(set(saved) | set(now)):
        if not prefix and key in RESUMABLE_CHANGES:
            continue
        old, new = saved.get(key, missing), now.get(key, missing)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += settings_differences(old, new, prefix=f"{prefix}{key}.")
        elif old != new:
            differences.append(f"{prefix}{key}: {old!r} in the run, {new!r} now")
    return differences


def _read_json(path: pathlib.Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainError(f"{path}: cannot read it ({error})") from None
    if not isinstance(value, dict):
        raise TrainError(f"{path}: expected a JSON object")
    return value


def _remove(paths: list[pathlib.Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def prepare_run_dir(settings: TrainSettings, output_dir: pathlib.Path, resumed_step: int, log) -> None:
    """Rank 0, once every check has passed: start over (--overwrite) or tidy up for a resume, then record the
    settings."""
    if settings.overwrite and holds_run(output_dir) and (entries := run_entries(output_dir)):
        _remove(entries)
        log(f"--overwrite: removed the previous run from {output_dir}: " + ", ".join(p.name for p in entries))
    if settings.resume:
        leftovers = unfinished_entries(output_dir)
        if leftovers:
            _remove(leftovers)  # a checkpoint or file an interrupted run did not finish writing
            log("--resume: removed unfinished " + ", ".join(p.name for p in leftovers))
        _cut_metrics(output_dir / METRICS_FILE, resumed_step)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / RUN_FILE, json.dumps(run_record(settings), indent=2, ensure_ascii=False) + "\n")


def _cut_metrics(path: pathlib.Path, step: int) -> None:
    """Keep the rows up to the checkpoint's step, so the resumed steps are not there twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the interruption
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    write_atomically(path, "".join(kept))
