"""Data, tokenizer, the training loop (checkpoints, resume, plots, metrics), and the train/demo commands.
Multi-process training under torchrun is in test_distributed.py; errors in test_train_errors.py; run
directories (fresh, --overwrite, --resume) in test_train_run_dir.py."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from train_helpers import PNG, one_error_line, quiet, settings, snapshot  # noqa: E402

from sparsedoctor_kernels import cli  # noqa: E402
from sparsedoctor_kernels.experiments.demo import run_demo  # noqa: E402
from sparsedoctor_kernels.train.data import (  # noqa: E402
    DataError,
    build_tokenizer,
    corpus,
    demo_records,
    encode,  # noqa: E402
    format_example,
    load_jsonl,
    write_jsonl,
)
from sparsedoctor_kernels.train.loop import train  # noqa: E402
from sparsedoctor_kernels.train.settings import TrainSettings  # noqa: E402

from conftest import SHARED  # noqa: E402


def test_demo_records_are_valid_and_answers_point_at_the_truth():
    records = demo_records()
    assert len(records) == 300 and records == demo_records()  # deterministic
    multiple_choice = [r for r in records if "question" in r]
    assert len(multiple_choice) == 100
    for record in multiple_choice:
        prompt, response = format_example(record)
        assert response.startswith(record["answer"] + ". ")
        assert len(set(record["options"].values())) == 4  # distinct options
    prompt, response = format_example(records[0])
    assert prompt.startswith("问题：") and prompt.endswith("回答：") and "缺铁性贫血" in response


def test_load_jsonl_names_the_bad_line(tmp_path):
    path = write_jsonl(demo_records()[:3], tmp_path / "ok.jsonl")
    assert len(load_jsonl(path)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "response": "y"}) + "\n" + json.dumps({"text": "z"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: a record needs"):
        load_jsonl(bad)
    bad.write_text(json.dumps({"question": "q", "options": ["a", "b"], "answer": "C"}) + "\n")
    with pytest.raises(DataError, match=r"answer 'C' is not one of the options \['A', 'B'\]"):
        load_jsonl(bad)


def test_tokenizer_round_trips_and_labels_cover_only_the_response():
    records = demo_records()
    tokenizer = build_tokenizer(corpus(records), vocab_size=600)
    text = "".join(format_example(records[5]))
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    (ids, labels), = encode(records[5:6], tokenizer, max_length=512)
    prompt, response = format_example(records[5])
    supervised = [t for t, label in zip(ids, labels) if label != -100]
    assert tokenizer.decode(supervised) == response + "<eos>"
    assert labels[: len(tokenizer(prompt)["input_ids"])] == [-100] * len(tokenizer(prompt)["input_ids"])


@pytest.mark.skipif(not (SHARED / "tokenizers" / "qwen2").is_dir(), reason="../shared/tokenizers/qwen2 not present")
def test_prompts_with_the_real_qwen_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2")
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = "<|endoftext|>"
    records = demo_records()
    examples = encode(records[:10], tokenizer, max_length=512, chat_template="plain")
    for record, (ids, labels) in zip(records[:10], examples):
        prompt, response = format_example(record)
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + response
        supervised = [t for t, label in zip(ids, labels) if label != -100]
        assert tokenizer.decode(supervised, skip_special_tokens=True) == response


def test_training_writes_metrics_plots_checkpoints_and_adapter(tmp_path):
    run = settings(tmp_path, steps=6, save_every=3)
    result = train(run, log=lambda *_: None)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert set(rows[0]) >= {"loss", "lm", "balance", "contrastive", "lr", "seconds"}
    for png in ("loss.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == PNG
    for directory in ("checkpoint-3/adapter", "checkpoint-6/adapter", "adapter"):
        assert (out / directory / "adapter_model.safetensors").is_file()
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))  # no pickle anywhere
    assert (out / "latest").read_text().strip() == "checkpoint-6"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert set(result.expert_load) == {"layer 0", "layer 1"}
    assert all(abs(sum(shares) - 1) < 1e-6 for shares in result.expert_load.values())


@pytest.mark.slow
def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    straight = train(settings(tmp_path, "straight", steps=6, save_every=3), log=lambda *_: None)
    train(settings(tmp_path, "resumed", steps=3, save_every=3), log=lambda *_: None)
    resumed = train(settings(tmp_path, "resumed", steps=6, save_every=3, resume=True), log=lambda *_: None)
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    for got, want in zip(resumed.history, straight.history[3:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    straight_params = dict(straight.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, straight_params[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(settings(tmp_path, "empty", resume=True), log=lambda *_: None)


def test_train_command(tmp_path, capsys):
    code = cli.main(["train", "--output-dir", str(tmp_path / "cli"), "--steps", "2", "--batch-size", "2",
                     "--max-length", "40", "--no-progress", "--num-experts", "3", "--lora-r", "2", "--proj-dim", "8",
                     "--queue-size", "16", "--target-modules", "q_proj", "down_proj"])
    assert code == 0
    assert "final step: loss" in capsys.readouterr().out
    config = json.loads((tmp_path / "cli" / "adapter" / "adapter_config.json").read_text())
    assert config["sparsedoctor"]["num_experts"] == 3 and config["sparsedoctor"]["target_modules"] == ["q_proj",
                                                                                                      "down_proj"]


@pytest.mark.slow
def test_demo_runs_end_to_end_and_again_in_the_same_directory(tmp_path):
    for attempt in range(2):  # `sparsedoctor demo` is run again and again in one checkout
        lines = []
        assert run_demo(str(tmp_path / "demo"), steps=4, progress=False, log=lines.append) == 0, attempt
        text = "\n".join(lines)
        assert "logits identical" in text and "expert load" in text
        assert ("starting over in" in text) == (attempt == 1)
        assert (tmp_path / "demo" / "loss.png").read_bytes()[:8] == PNG
    assert "--overwrite: removed the previous run" in text and "checkpoint-4" in text
    assert [json.loads(line)["step"] for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4]


def test_max_length_default_is_the_settings_default_and_every_train_default_matches():
    train_parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    args = train_parser.parse_args([])
    defaults = TrainSettings()
    assert defaults.max_length == 512 and args.max_length == defaults.max_length
    names = ("steps", "batch_size", "learning_rate", "warmup_steps", "seed", "save_every", "output_dir", "model")
    assert [getattr(args, name) for name in names] == [getattr(defaults, name) for name in names]
    max_length_help = next(a.help for a in train_parser._actions if a.dest == "max_length")
    assert f"default: {defaults.max_length}" in max_length_help


def test_options_that_collapse_or_overflow_the_letters_are_refused():
    from sparsedoctor_kernels.train.data import DataError, normalize_options

    with pytest.raises(DataError, match="same letter twice"):
        normalize_options({"a": "x", "A": "y"})
    with pytest.raises(DataError, match="at most 10"):
        normalize_options([str(i) for i in range(11)])
    assert normalize_options({"b": "x", " a ": "y"}) == {"B": "x", "A": "y"}


def _demo_error(argv, capsys) -> str:
    assert cli.main(["demo", "--no-progress", *argv]) == 2
    return one_error_line(capsys, "demo")


def test_demo_refuses_a_directory_holding_a_real_train_run(tmp_path, capsys):
    train(settings(tmp_path, steps=2, save_every=2), log=quiet)
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    message = _demo_error(["--output-dir", str(run_dir), "--steps", "2"], capsys)
    assert "not a previous demo" in message
    assert snapshot(run_dir) == before  # the run is intact, and no demo_data.jsonl was written


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "0"], "--steps must be an integer >= 1"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_demo_checks_its_settings_before_writing_anything(tmp_path, capsys, flags, expected):
    message = _demo_error(["--output-dir", str(tmp_path / "demo"), *flags], capsys)
    assert expected in message
    assert not (tmp_path / "demo").exists()
