"""Shared by the training tests: a small adapter, TrainSettings for a few-second tiny run, and a snapshot of a
directory to prove an error wrote nothing."""

import json
import pathlib

from sparsedoctor_kernels.model import SparseDoctorConfig
from sparsedoctor_kernels.train.settings import TrainSettings

SMALL = SparseDoctorConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, proj_dim=16, queue_size=32,
                           contrastive_tokens=16)
# The same adapter as `sparsedoctor train` flags.
SMALL_FLAGS = ["--num-experts", "4", "--top-k", "2", "--lora-r", "4", "--lora-alpha", "8", "--proj-dim", "16",
               "--queue-size", "32", "--contrastive-tokens", "16"]
PNG = b"\x89PNG\r\n\x1a\n"


def quiet(*_):
    pass


def settings(tmp_path, name="run", **overrides) -> TrainSettings:
    values = dict(output_dir=str(tmp_path / name), steps=4, batch_size=4, max_length=48, save_every=0,
                  progress=False, tiny_vocab_size=600, adapter=SMALL)
    values.update(overrides)
    return TrainSettings(**values)


def snapshot(path: pathlib.Path) -> dict:
    """Every file under `path` (or `path` itself) with its bytes; {} when nothing is there."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def metric_steps(run_dir: pathlib.Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def one_error_line(capsys, command: str = "train") -> str:
    """The single stderr line a user error prints (`sparsedoctor <command>: error: ...`), with no traceback."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sparsedoctor {command}: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]
