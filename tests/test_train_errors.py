"""`sparsedoctor train` user errors: one line on stderr naming the file, line or flag, exit code 2, no
traceback, nothing written, and found before any long work. Also truncation and non-finite losses."""

import json
import math
import os

import pytest

pytest.importorskip("transformers")

from train_helpers import SMALL_FLAGS, metric_steps, one_error_line, quiet, settings, snapshot  # noqa: E402

from sparsedoctor_kernels import cli  # noqa: E402
from sparsedoctor_kernels.model.wrapper import SparseDoctorModel  # noqa: E402
from sparsedoctor_kernels.train import loop as training  # noqa: E402
from sparsedoctor_kernels.train import run_dir  # noqa: E402
from sparsedoctor_kernels.train.data import demo_records, load_jsonl, write_jsonl  # noqa: E402
from sparsedoctor_kernels.train.loop import train  # noqa: E402
from sparsedoctor_kernels.train.settings import TrainError  # noqa: E402

GOOD_LINE = json.dumps({"instruction": "头痛怎么办？", "response": "休息并就医。"}, ensure_ascii=False)


def _train_cli(tmp_path, *flags: str) -> list[str]:
    return ["train", "--output-dir", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2",
            "--max-length", "48", "--no-progress", *SMALL_FLAGS, *flags]


def _fails_cleanly(argv: list[str], capsys, watched) -> str:
    """Runs the command, asserts the error contract and returns the message."""
    before = snapshot(watched)
    code = cli.main(argv)
    assert code == 2
    line = one_error_line(capsys)
    assert snapshot(watched) == before  # nothing new, nothing half-written
    return line


@pytest.fixture
def no_long_work(monkeypatch):
    """Errors that need no tokenizer must be found before one is built (let alone a model loaded)."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("long work started before the settings, data and directory were checked")

    monkeypatch.setattr(training, "load_tokenizer", refuse)
    monkeypatch.setattr(training, "load_model", refuse)


@pytest.mark.parametrize("content, expected", [
    (GOOD_LINE + '\n{"instruction": "x", "response": \n', "bad.jsonl:2: malformed JSON"),
    (GOOD_LINE + "\n42\n", "bad.jsonl:2: expected a JSON object (one record a line), got a number"),
    ('"just a string"\n', "bad.jsonl:1: expected a JSON object (one record a line), got a string"),
    ("[1, 2]\n", "bad.jsonl:1: expected a JSON object (one record a line), got an array"),
    ('{"instruction": 7, "response": "y"}\n', "bad.jsonl:1: an instruction record needs a string 'instruction'"),
    ('{"text": "z"}\n', "bad.jsonl:1: a record needs"),
    ("\n\n", "bad.jsonl holds no records"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, capsys, no_long_work, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text(content, encoding="utf-8")
    message = _fails_cleanly(_train_cli(tmp_path, "--data", str(data)), capsys, tmp_path / "out")
    assert expected in message and str(data) in message
    assert not (tmp_path / "out").exists()


def test_bytes_that_are_not_utf8_name_the_line(tmp_path, capsys, no_long_work):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(GOOD_LINE.encode() + b"\n" + '{"instruction": "caf\xe9", "response": "y"}\n'.encode("latin-1"))
    message = _fails_cleanly(_train_cli(tmp_path, "--data", str(data)), capsys, tmp_path / "out")
    assert f"{data}:2: not UTF-8 text (byte 0xe9" in message


def test_a_missing_data_file_is_named(tmp_path, capsys, no_long_work):
    message = _fails_cleanly(_train_cli(tmp_path, "--data", str(tmp_path / "nope.jsonl")), capsys, tmp_path / "out")
    assert f"{tmp_path / 'nope.jsonl'}: cannot read it" in message


def test_a_utf8_bom_is_accepted(tmp_path):
    data = write_jsonl(demo_records()[:8], tmp_path / "bom.jsonl")
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    assert load_jsonl(data) == demo_records()[:8]
    assert cli.main(_train_cli(tmp_path, "--data", str(data), "--steps", "1")) == 0


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--steps", "-3"], "--steps must be an integer >= 1, got -3"),
    (["--max-length", "0"], "--max-length must be an integer >= 1, got 0"),
    (["--save-every", "-1"], "--save-every must be an integer >= 0, got -1"),
    (["--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0, got -1"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr", "-0.1"], "--lr must be a finite number > 0, got -0.1"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--top-k", "9", "--num-experts", "8"], "--top-k (9) must be <= --num-experts (8)"),
    (["--lora-r", "0"], "--lora-r must be an int >= 1, got 0"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1), got 1.5"),
    (["--resume", "--overwrite"], "pass one of them"),
    (["--model", "/no/such/model"], "--model must be 'tiny' or a local Hugging Face model directory"),
])
def test_bad_settings_are_one_line_naming_the_flag(tmp_path, capsys, no_long_work, flags, expected):
    message = _fails_cleanly(_train_cli(tmp_path, *flags), capsys, tmp_path / "out")
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_a_model_directory_without_a_model_is_refused(tmp_path, capsys, no_long_work):
    (tmp_path / "empty-model").mkdir()
    message = _fails_cleanly(_train_cli(tmp_path, "--model", str(tmp_path / "empty-model")), capsys, tmp_path)
    assert f"{tmp_path / 'empty-model'} is not one" in message


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused(tmp_path, capsys, no_long_work):
    message = _fails_cleanly(_train_cli(tmp_path, "--device", "cuda"), capsys, tmp_path)
    assert "--device cuda: CUDA is not available" in message


def test_an_output_dir_that_is_a_file_is_refused(tmp_path, capsys, no_long_work):
    target = tmp_path / "out"
    target.write_text("not a directory")
    message = _fails_cleanly(_train_cli(tmp_path), capsys, target)
    assert f"--output-dir {target} is a file, not a directory" in message
    message = _fails_cleanly(_train_cli(tmp_path, "--output-dir", str(target / "run")), capsys, target)
    assert f"{target} is a file" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_dir_is_refused(tmp_path, capsys, no_long_work):
    target = tmp_path / "out"
    target.mkdir()
    target.chmod(0o555)
    try:
        message = _fails_cleanly(_train_cli(tmp_path), capsys, target)
    finally:
        target.chmod(0o755)
    assert f"--output-dir {target}: cannot write in {target}" in message
    assert not list(target.iterdir())


def test_output_dir_writability_is_tried_not_guessed(tmp_path, monkeypatch):
    """What root sees on a read-only mount: creating the probe file fails."""
    def read_only(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(run_dir.tempfile, "mkstemp", read_only)
    with pytest.raises(TrainError, match="cannot write in .* \\(Permission denied\\)"):
        run_dir.check_output_dir(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- truncation and non-finite losses -----------------------------------------------------------------------

def test_truncation_is_reported_and_examples_without_a_supervised_token_left_out(tmp_path):
    lines = []
    run = train(settings(tmp_path, max_length=40, steps=3), log=lines.append)
    warning = next(line for line in lines if line.startswith("warning:"))
    # The 100 multiple-choice prompts are longer than 40 tokens: those lose their whole response.
    assert "examples are longer than --max-length 40 tokens and were truncated" in warning
    truncated, dropped = (int(n) for n in (warning.split()[1], warning.split("; ")[1].split()[0]))
    assert truncated >= dropped >= 100 and "lost every response token and are left out" in warning
    assert all(math.isfinite(row["lm"]) for row in run.history)


def test_nothing_left_to_learn_is_refused_before_anything_is_written(tmp_path, capsys):
    data = write_jsonl([r for r in demo_records() if "question" in r], tmp_path / "mc.jsonl")
    message = _fails_cleanly(_train_cli(tmp_path, "--data", str(data), "--max-length", "20"), capsys,
                             tmp_path / "out")
    assert "--max-length 20 cuts away the whole response of every one of the 100 examples" in message
    assert not (tmp_path / "out").exists()


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, capsys, monkeypatch):
    real_forward = SparseDoctorModel.forward
    calls = []

    def nan_on_the_second_step(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SparseDoctorModel, "forward", nan_on_the_second_step)
    assert cli.main(_train_cli(tmp_path, "--steps", "4")) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("sparsedoctor train: error: step 2: the loss is not finite; lower --lr or check "
                                    "the data")
    assert metric_steps(tmp_path / "out") == [1]  # the bad step is not recorded


def test_a_batch_without_a_supervised_token_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    real_collate = training.collate

    def unsupervised(examples, pad_id):
        batch = real_collate(examples, pad_id)
        batch["labels"].fill_(-100)
        return batch

    monkeypatch.setattr(training, "collate", unsupervised)
    with pytest.raises(TrainError, match="step 1: a batch has no supervised \\(response\\) token"):
        train(settings(tmp_path), log=quiet)


def test_unknown_target_modules_are_one_line_naming_the_flag(tmp_path, capsys):
    message = _fails_cleanly(_train_cli(tmp_path, "--target-modules", "foo_proj"), capsys, tmp_path / "out")
    assert "--target-modules foo_proj" in message and "no nn.Linear named one of ['foo_proj']" in message
