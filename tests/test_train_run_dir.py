"""A run directory holds one run: a fresh run refuses another run's directory, --overwrite starts over,
--resume continues only a compatible run, checkpoints are written atomically and metrics hold each step once."""

import json
import os
import re

import pytest

pytest.importorskip("transformers")

from train_helpers import PNG, SMALL_FLAGS, metric_steps, quiet, settings, snapshot  # noqa: E402

from sparsedoctor_kernels import checkpoints, cli  # noqa: E402
from sparsedoctor_kernels.training import TrainError, train  # noqa: E402


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsedoctor train: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path, capsys):
    train(settings(tmp_path, steps=2, save_every=2), log=quiet)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    code = cli.main(["train", "--output-dir", str(run_dir), "--steps", "2", "--batch-size", "4", "--no-progress",
                     *SMALL_FLAGS])
    assert code == 2
    message = _one_error_line(capsys)
    assert "already holds a training run" in message and "--resume" in message and "--overwrite" in message
    assert "checkpoint-2" in message
    assert snapshot(run_dir) == before


def test_a_directory_with_only_other_files_is_fine_for_a_fresh_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    train(settings(tmp_path, steps=1), log=quiet)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_overwrite_removes_the_previous_run_and_says_what_it_removed(tmp_path):
    train(settings(tmp_path, steps=4, save_every=2), log=quiet)
    run_dir = tmp_path / "run"
    (run_dir / "notes.txt").write_text("mine")
    lines = []
    train(settings(tmp_path, steps=2, overwrite=True), log=lines.append)
    removed = next(line for line in lines if line.startswith("--overwrite: removed"))
    for name in ("checkpoint-2", "checkpoint-4", "latest", "metrics.jsonl", "adapter", "run_config.json"):
        assert name in removed
    assert not (run_dir / "latest").exists() and not list(run_dir.glob("checkpoint-*"))
    assert metric_steps(run_dir) == [1, 2]
    assert json.loads((run_dir / "run_config.json").read_text())["steps"] == 2
    assert (run_dir / "notes.txt").read_text() == "mine"  # not a run file: left alone


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(TrainError, match="pass one of them"):
        train(settings(tmp_path, resume=True, overwrite=True), log=quiet)


def test_resume_refuses_changed_settings_and_names_every_field(tmp_path, capsys):
    train(settings(tmp_path, steps=2, save_every=2), log=quiet)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    code = cli.main(["train", "--output-dir", str(run_dir), "--resume", "--steps", "4", "--batch-size", "2",
                     "--lr", "0.01", "--max-length", "48", "--no-progress", *SMALL_FLAGS])
    assert code == 2
    message = _one_error_line(capsys)
    assert "batch_size: 4 in the run, 2 now" in message and "learning_rate: 0.005 in the run, 0.01 now" in message
    assert "tiny_vocab_size" in message  # 600 in the test's run, the CLI's 1500 now
    assert not re.search(r"\bsteps:", message)  # steps may change on a resume
    assert snapshot(run_dir) == before


def test_resume_accepts_the_fields_that_may_change(tmp_path):
    train(settings(tmp_path, steps=2, save_every=2, device="cpu"), log=quiet)
    resumed = train(settings(tmp_path, steps=3, save_every=1, device=None, gradient_checkpointing=True,
                             resume=True), log=quiet)
    assert [row["step"] for row in resumed.history] == [3]


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    train(settings(tmp_path, steps=3, save_every=2), log=quiet)  # checkpoint-2, then step 3: "interrupted"
    run_dir = tmp_path / "run"
    assert metric_steps(run_dir) == [1, 2, 3]
    resumed = train(settings(tmp_path, steps=4, save_every=2, resume=True), log=quiet)
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[2:] == resumed.history  # steps 3 and 4 are the resumed run's
    assert (run_dir / "loss.png").read_bytes()[:8] == PNG


def test_checkpoints_and_latest_are_renamed_into_place(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def recording_replace(source, target):
        renames.append((os.path.basename(source), os.path.basename(target)))
        real_replace(source, target)

    monkeypatch.setattr(checkpoints.os, "replace", recording_replace)
    train(settings(tmp_path, steps=2, save_every=2), log=quiet)
    assert ("checkpoint-2.tmp", "checkpoint-2") in renames and ("latest.partial", "latest") in renames
    assert renames.index(("checkpoint-2.tmp", "checkpoint-2")) < renames.index(("latest.partial", "latest"))


def test_an_interrupted_checkpoint_leaves_the_previous_one_and_resume_tolerates_its_tmp(tmp_path, monkeypatch):
    real_write = checkpoints._write_trainer_state

    def dies_at_step_4(optimizer, step, directory):
        if step == 4:
            raise OSError("disk full")  # the save dies while checkpoint-4.tmp/ is half-written
        real_write(optimizer, step, directory)

    monkeypatch.setattr(checkpoints, "_write_trainer_state", dies_at_step_4)
    with pytest.raises(OSError, match="disk full"):
        train(settings(tmp_path, steps=4, save_every=2), log=quiet)
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoint-4.tmp" / "adapter").is_dir() and not (run_dir / "checkpoint-4").exists()
    assert (run_dir / "latest").read_text().strip() == "checkpoint-2"

    monkeypatch.setattr(checkpoints, "_write_trainer_state", real_write)
    lines = []
    resumed = train(settings(tmp_path, steps=4, save_every=2, resume=True), log=lines.append)
    assert [row["step"] for row in resumed.history] == [3, 4]
    assert any("removed unfinished checkpoint-4.tmp" in line for line in lines)
    assert not (run_dir / "checkpoint-4.tmp").exists()
    assert (run_dir / "latest").read_text().strip() == "checkpoint-4"
    assert metric_steps(run_dir) == [1, 2, 3, 4]


def test_resume_with_nothing_left_to_train_is_refused(tmp_path):
    train(settings(tmp_path, steps=2, save_every=2), log=quiet)
    with pytest.raises(TrainError, match="nothing is left to train; raise --steps"):
        train(settings(tmp_path, steps=2, resume=True), log=quiet)
