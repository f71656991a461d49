"""A run directory holds one run: a fresh run refuses another run's directory, --overwrite starts over,
--resume continues only a compatible run, checkpoints are written atomically and metrics hold each step once."""

import dataclasses
import json
import os
import re

import pytest
import torch

pytest.importorskip("transformers")

from train_helpers import PNG, SMALL, SMALL_FLAGS, metric_steps, one_error_line, quiet, settings, snapshot  # noqa: E402

from sparsedoctor_kernels import cli  # noqa: E402
from sparsedoctor_kernels.model import SparseDoctorConfig  # noqa: E402
from sparsedoctor_kernels.train import checkpoints  # noqa: E402
from sparsedoctor_kernels.train.loop import train  # noqa: E402
from sparsedoctor_kernels.train.settings import TrainError, TrainSettings  # noqa: E402


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path, capsys):
    train(settings(tmp_path, steps=2, save_every=2), log=quiet)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    code = cli.main(["train", "--output-dir", str(run_dir), "--steps", "2", "--batch-size", "4", "--no-progress",
                     *SMALL_FLAGS])
    assert code == 2
    message = one_error_line(capsys)
    assert "already holds a training run" in message and "--resume" in message and "--overwrite" in message
    assert "checkpoint-2" in message
    assert snapshot(run_dir) == before


def test_a_directory_with_only_other_files_is_fine_for_a_fresh_run(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    train(settings(tmp_path, steps=1), log=quiet)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
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
    message = one_error_line(capsys)
    assert "batch_size: 4 in the run, 2 now" in message
    assert f"learning_rate: {TrainSettings().learning_rate!r} in the run, 0.01 now" in message
    assert "tiny_vocab_size" in message  # 600 in the test's run, the CLI's 1500 now
    assert not re.search(r"\bsteps:", message)  # steps may change on a resume
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_a_run_from_before_the_contrastive_mode_existed_resumes_only_as_the_paper_mode(tmp_path, capsys):
    """Such a run trained the paper mode: resuming it with today's default (router) is refused by name, and
    with the paper mode it is accepted."""
    train(settings(tmp_path, steps=2, save_every=2, adapter=dataclasses.replace(
        SMALL, contrastive_mode="paper", contrastive_coef=0.1)), log=quiet)
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "run_config.json").read_text())
    del record["adapter"]["contrastive_mode"], record["adapter"]["contrastive_updates"]
    (run_dir / "run_config.json").write_text(json.dumps(record))
    flags = ["train", "--output-dir", str(run_dir), "--resume", "--steps", "3", "--batch-size", "4",
             "--max-length", "48", "--tiny-vocab-size", "600", "--no-progress", *SMALL_FLAGS]
    assert cli.main(flags) == 2
    assert "contrastive_mode: 'paper' in the run, 'router' now" in one_error_line(capsys)
    assert cli.main([*flags, "--contrastive-mode", "paper"]) == 0
    assert metric_steps(run_dir) == [1, 2, 3]


@pytest.mark.slow
def test_resume_accepts_the_fields_that_may_change(tmp_path):
    train(settings(tmp_path, steps=2, save_every=2, device="cpu"), log=quiet)
    resumed = train(settings(tmp_path, steps=3, save_every=1, device=None, gradient_checkpointing=True,
                             resume=True), log=quiet)
    assert [row["step"] for row in resumed.history] == [3]


@pytest.mark.slow
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

    def dies_at_step_4(optimizer, step, directory, *rest):
        if step == 4:
            raise OSError("disk full")  # the save dies while checkpoint-4.tmp/ is half-written
        real_write(optimizer, step, directory, *rest)

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


# A fast run through the command line.
FAST = ["--model", "tiny", "--batch-size", "2", "--no-progress", "--num-experts", "3", "--top-k", "2",
        "--lora-r", "2", "--proj-dim", "8", "--queue-size", "16", "--contrastive-tokens", "8", "--max-length", "48"]


def _fast_cli(run_dir, *flags: str) -> list[str]:
    return ["train", "--output-dir", str(run_dir), *FAST, *flags]


@pytest.mark.parametrize("overwrite", [False, True])
def test_entries_named_like_a_run_but_without_one_are_refused_and_never_deleted(tmp_path, capsys, overwrite):
    run_dir = tmp_path / "u"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "README.md").write_text("mine")
    (run_dir / "loss.png").write_bytes(b"my plot")
    before = snapshot(run_dir)
    code = cli.main(_fast_cli(run_dir, "--steps", "1", *(["--overwrite"] if overwrite else [])))
    assert code == 2
    message = one_error_line(capsys)
    assert "adapter" in message and "loss.png" in message and "run_config.json" in message
    assert "not removed" in message
    assert snapshot(run_dir) == before


def test_resume_refuses_data_changed_at_the_same_path(tmp_path, capsys):
    from sparsedoctor_kernels.train.data import demo_records, write_jsonl

    data = write_jsonl(demo_records()[:40], tmp_path / "data.jsonl")
    run_dir = tmp_path / "run"
    assert cli.main(_fast_cli(run_dir, "--data", str(data), "--steps", "2", "--save-every", "2")) == 0
    capsys.readouterr()
    assert json.loads((run_dir / "run_config.json").read_text())["data_sha256"][str(data)]
    write_jsonl(demo_records()[40:80], data)
    before = snapshot(run_dir)
    assert cli.main(_fast_cli(run_dir, "--data", str(data), "--steps", "4", "--resume")) == 2
    message = one_error_line(capsys)
    assert f"the data file {data} changed" in message
    assert snapshot(run_dir) == before


def test_resume_checks_the_final_adapter_dir_can_be_written_before_training(tmp_path, capsys, monkeypatch):
    from sparsedoctor_kernels.train import loop as training

    run_dir = tmp_path / "run"
    assert cli.main(_fast_cli(run_dir, "--steps", "2", "--save-every", "2")) == 0
    capsys.readouterr()
    (run_dir / "adapter" / "notes.txt").write_text("mine")
    monkeypatch.setattr(training, "_loop", lambda *a, **k: pytest.fail("trained before checking adapter/"))
    before = snapshot(run_dir)
    assert cli.main(_fast_cli(run_dir, "--steps", "4", "--resume")) == 2
    message = one_error_line(capsys)
    assert f"{run_dir / 'adapter'} holds other files (notes.txt)" in message
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damaged", ["adapter/adapter_model.safetensors", "trainer_state.safetensors"])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, damaged):
    run_dir = tmp_path / "run"
    assert cli.main(_fast_cli(run_dir, "--steps", "2", "--save-every", "2")) == 0
    capsys.readouterr()
    path = run_dir / "checkpoint-2" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cli.main(_fast_cli(run_dir, "--steps", "4", "--resume")) == 2
    message = one_error_line(capsys)
    assert str(path) in message


@pytest.mark.slow
def test_resume_with_nothing_left_to_train_writes_missing_final_outputs(tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    assert cli.main(_fast_cli(run_dir, "--steps", "2", "--save-every", "2")) == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    expected = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for name in ("adapter", "tokenizer"):  # killed after its last checkpoint, before the final outputs
        shutil.rmtree(run_dir / name)
    (run_dir / "loss.png").unlink()
    assert cli.main(_fast_cli(run_dir, "--steps", "2", "--resume")) == 0
    out = capsys.readouterr().out
    assert "nothing is left to train; writing the final adapter" in out
    written = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    assert (run_dir / "tokenizer").is_dir() and (run_dir / "loss.png").read_bytes()[:8] == PNG
    assert metric_steps(run_dir) == [1, 2]
    assert cli.main(_fast_cli(run_dir, "--steps", "2", "--resume")) == 2  # now finished: refused again
    assert "nothing is left to train; raise --steps" in one_error_line(capsys)


@pytest.mark.slow
def test_the_optimizer_holds_every_adapter_parameter_in_every_mode(tmp_path):
    """Frozen (unused) heads stay in the optimizer's list, so a checkpoint's optimizer state has one layout
    whatever the contrastive mode, and checkpoints written while the heads were trainable still load."""
    counts = {}
    for mode in ("router", "paper"):
        adapter = SparseDoctorConfig(**{**SMALL.to_dict(), "contrastive_mode": mode, "contrastive_coef": None})
        train(settings(tmp_path, name=mode, steps=1, save_every=1, adapter=adapter), log=quiet)
        state = json.loads((tmp_path / mode / "checkpoint-1" / checkpoints.STATE_JSON).read_text())
        counts[mode] = sum(len(group["params"]) for group in state["param_groups"])
    assert counts["router"] == counts["paper"]
