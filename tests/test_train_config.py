"""`sparsedoctor train` settings: the parser generated from TrainSettings (help with defaults), --config files
(YAML, JSON) under the flags, gradient accumulation, --epochs, the eval split and eval_loss, weight decay,
TensorBoard, resuming a run recorded before the newer settings, and the bare `sparsedoctor` command."""

import dataclasses
import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from train_helpers import SMALL, SMALL_FLAGS, one_error_line, quiet, settings, snapshot  # noqa: E402

from sparsedoctor_kernels import __version__, cli  # noqa: E402
from sparsedoctor_kernels.model import SparseDoctorConfig  # noqa: E402
from sparsedoctor_kernels.train import loop as training  # noqa: E402
from sparsedoctor_kernels.train.data import demo_records, trainable_examples, write_jsonl  # noqa: E402
from sparsedoctor_kernels.train.loop import train  # noqa: E402
from sparsedoctor_kernels.train.run_dir import run_record  # noqa: E402
from sparsedoctor_kernels.train.settings import (  # noqa: E402
    ADAPTER_HELP,
    TrainError,  # noqa: E402
    TrainSettings,
    validate_settings,
)

# Only the LM term and no randomness in the forward: what gradient accumulation must reproduce exactly.
LM_ONLY = dataclasses.replace(SMALL, lora_dropout=0.0, balance_coef=0.0, contrastive_coef=0.0, contrastive_tokens=0)


@pytest.fixture
def small_data(tmp_path) -> str:
    """48 records: a smaller tiny tokenizer to train, and shorter epochs."""
    return str(write_jsonl(demo_records()[:48], tmp_path / "small.jsonl"))


def _train_parser():
    return cli.build_parser()._subparsers._group_actions[0].choices["train"]


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trainable(result) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in result.model.named_parameters() if p.requires_grad}


# --- the parser -----------------------------------------------------------------------------------------------

def test_every_setting_carries_a_type_and_help_and_every_adapter_field_has_help():
    for f in dataclasses.fields(TrainSettings):
        assert f.metadata["type"] in (int, float, str, bool, list, SparseDoctorConfig), f.name
        assert f.metadata["help"].strip(), f.name
    assert set(ADAPTER_HELP) == set(SparseDoctorConfig.field_names())


def test_help_shows_every_default():
    defaults = TrainSettings()
    helps = {a.dest: a.help for a in _train_parser()._actions if a.dest != "help"}
    assert set(helps) >= {f.name for f in dataclasses.fields(TrainSettings)} - {"adapter"}
    assert set(helps) >= set(SparseDoctorConfig.field_names())
    for dest, text in helps.items():
        assert "(default: " in text, dest
    assert f"(default: {defaults.learning_rate})" in helps["learning_rate"]
    assert f"(default: {defaults.max_length})" in helps["max_length"]
    assert f"(default: {SparseDoctorConfig().r})" in helps["r"]


def test_parser_defaults_are_the_settings_defaults():
    args = _train_parser().parse_args([])
    defaults = TrainSettings()
    for f in dataclasses.fields(TrainSettings):
        if f.name != "adapter":
            assert getattr(args, f.name) == getattr(defaults, f.name), f.name
    assert args.given_settings == frozenset()
    assert _train_parser().parse_args(["--no-progress", "--lr", "1"]).given_settings == {"progress",
                                                                                          "learning_rate"}


def test_the_default_learning_rate_is_a_lora_rate():
    assert 1e-4 <= TrainSettings().learning_rate <= 1e-3


def test_no_command_prints_the_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sparsedoctor") and "train" in out and "--version" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparsedoctor_kernels {__version__}"


# --- config files ---------------------------------------------------------------------------------------------

def _settings_from_argv(argv: list[str]) -> TrainSettings:
    return cli._settings_from(cli.build_parser().parse_args(["train", *argv]))


@pytest.mark.slow
def test_config_file_and_the_same_flags_write_the_same_run_config(tmp_path, small_data):
    run_dir = tmp_path / "run"
    flags = ["--output-dir", str(run_dir), "--data", small_data, "--steps", "1", "--batch-size", "2",
             "--max-length", "48", "--no-progress", "--lr", "0.001", "--weight-decay", "0.01",
             "--tiny-vocab-size", "600", "--eval-split", "0.1", "--seed", "3", *SMALL_FLAGS,
             "--target-modules", "q_proj", "v_proj"]
    assert cli.main(["train", *flags]) == 0
    from_flags = (run_dir / "run_config.json").read_text()
    shutil.rmtree(run_dir)
    config = tmp_path / "run.yaml"
    config.write_text(f"""\
output_dir: {run_dir}
data: {small_data}   # one path: a list of one
steps: 1
batch_size: 2
max_length: 48
progress: false
learning_rate: 1e-3   # YAML reads this as a string (no dot): a float setting takes it
weight_decay: 0.01
tiny_vocab_size: 600
eval_split: 0.1
seed: 3
adapter:
  num_experts: 4
  top_k: 2
  r: 4
  lora_alpha: 8
  proj_dim: 16
  queue_size: 32
  contrastive_tokens: 16
  target_modules: [q_proj, v_proj]
""")
    assert cli.main(["train", "--config", str(config)]) == 0
    assert json.loads((run_dir / "run_config.json").read_text()) == json.loads(from_flags)
    # The same file as JSON: the same settings.
    as_json = tmp_path / "run.json"
    values = json.loads(from_flags)
    values.pop("data_sha256")
    as_json.write_text(json.dumps(values))
    assert run_record(_settings_from_argv(["--config", str(as_json)])) == json.loads(from_flags)


def test_flags_given_override_the_file_and_the_rest_keep_its_values(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"learning_rate": 0.001, "batch_size": 4, "warmup_steps": 3, "progress": True,
                                  "steps": 7, "adapter": {"num_experts": 4, "top_k": 1, "r": 4}}))
    got = _settings_from_argv(["--config", str(config), "--lr", "0.002", "--no-progress", "--epochs", "2",
                               "--top-k", "2", "--batch-size", "8"])
    assert got.learning_rate == 0.002 and got.progress is False
    assert got.batch_size == 8  # given, though it is the default: the flag wins
    assert got.warmup_steps == 3 and got.adapter.num_experts == 4 and got.adapter.r == 4  # from the file
    assert got.adapter.top_k == 2
    assert got.epochs == 2 and got.steps is None  # a given --epochs replaces the file's steps
    assert got.seed == TrainSettings().seed and got.adapter.temperature == SparseDoctorConfig().temperature


def test_json_config_needs_no_pyyaml_and_yaml_says_what_it_needs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"batch_size": 2}))
    assert _settings_from_argv(["--config", str(config)]).batch_size == 2
    (tmp_path / "run.yml").write_text("batch_size: 2\n")
    with pytest.raises(TrainError, match=r"reading YAML needs PyYAML .*\.json file"):
        _settings_from_argv(["--config", str(tmp_path / "run.yml")])


@pytest.mark.parametrize("name, content, expected", [
    ("run.yaml", "learning_rat: 0.1\n", "{path}: unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("run.json", '{"adapter": {"rank": 4}}', "{path}: unknown key 'adapter.rank'"),
    ("run.json", '{"lr": 0.1}', "{path}: unknown key 'lr'"),
    ("run.yaml", "steps: ten\n", "{path}: steps must be an integer or null, got 'ten'"),
    ("run.yaml", "bf16: yes please\n", "{path}: bf16 must be true or false, got 'yes please'"),
    ("run.yaml", "adapter: [1, 2]\n", "{path}: adapter must be a mapping"),
    ("run.yaml", "- 1\n- 2\n", "{path}: expected a mapping of settings"),
    ("run.yaml", "steps: 2\n  bad: [\n", "{path}:2: malformed YAML"),
    ("run.json", '{\n"steps": 2,\n}', "{path}:3: malformed JSON"),
    ("run.toml", "steps = 2\n", "--config {path}: a config file is YAML (.yaml, .yml) or JSON (.json)"),
    ("run.yaml", "epochs: 1\nsteps: 3\n", "--steps (3) and --epochs (1) both say how long to train"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, capsys, name, content, expected):
    config = tmp_path / name
    config.write_text(content)
    assert cli.main(["train", "--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert expected.format(path=config) in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_is_named(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert f"--config {tmp_path / 'nope.yaml'}: cannot read it" in one_error_line(capsys)


# --- new settings ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gradient_accumulation_of_two_batches_of_four_equals_one_batch_of_eight(tmp_path, small_data,
                                                                               monkeypatch):
    """The accumulated step's gradient is one batch's: the LM term is the mean over all the step's supervised
    tokens (each micro-batch's mean weighted by its share of them). Exact equality needs the LM term alone and a
    forward without randomness: the balance term is per forward (a mean of two micro-batches' balance is not the
    balance of their union) and the contrastive term samples tokens per forward."""
    real_clip = torch.nn.utils.clip_grad_norm_
    gradients = []  # per optimizer step, what it is about to clip and apply

    def recording_clip(params, max_norm):
        gradients.append([torch.zeros(0) if p.grad is None else p.grad.clone() for p in params])
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    common = dict(steps=2, learning_rate=1e-3, warmup_steps=0, adapter=LM_ONLY, data=[small_data])
    accumulated = train(settings(tmp_path, "acc", batch_size=4, gradient_accumulation_steps=2, **common), log=quiet)
    one_batch = train(settings(tmp_path, "one", batch_size=8, **common), log=quiet)
    assert len(gradients) == 4
    for got, want in zip(gradients[0], gradients[2]):  # step 1: the same parameters, so the same gradient
        scale = float(want.abs().max()) if want.numel() else 0.0  # float32 sums: a tensor's own size sets the atol
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    assert any(g.numel() and float(g.abs().max()) > 0 for g in gradients[0])
    for got, want in zip(accumulated.history, one_batch.history):
        assert got["lm"] == pytest.approx(want["lm"], rel=1e-5)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    # AdamW's first steps move each weight by about the learning rate whatever the gradient's size, and the
    # sign of a near-zero gradient is rounding's: the adapters agree to a hundredth of a step.
    want = _trainable(one_batch)
    for name, param in _trainable(accumulated).items():
        torch.testing.assert_close(param, want[name], rtol=0, atol=1e-5, msg=name)


def test_epochs_give_the_steps_counting_accumulation(tmp_path, small_data):
    run = train(settings(tmp_path, data=[small_data], batch_size=4, gradient_accumulation_steps=2, steps=None,
                         epochs=0.5), log=quiet)
    examples = len(trainable_examples(demo_records()[:48], run.tokenizer, 48, quiet))
    assert run.settings.steps == math.ceil(0.5 * examples / 8) == len(run.history) >= 2
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert recorded["steps"] == run.settings.steps and recorded["epochs"] == 0.5
    with pytest.raises(TrainError, match=r"--steps \(4\) and --epochs \(1\).*pass one of them"):
        validate_settings(settings(tmp_path, steps=4, epochs=1))
    with pytest.raises(TrainError, match="--epochs must be a finite number > 0"):
        validate_settings(settings(tmp_path, steps=None, epochs=0))


def test_eval_loss_at_eval_every_equals_a_direct_computation(tmp_path):
    records = demo_records()[:60]
    data = str(write_jsonl(records, tmp_path / "data.jsonl"))
    run = train(settings(tmp_path, data=[data], steps=4, eval_split=0.1, eval_every=3), log=quiet)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 4]  # every 3 steps, and after the last
    assert rows == run.history
    kept, held = training.split_eval(records, 0.1, seed=0)
    assert len(held) == 6 and len(kept) == 54 and all(r in records for r in held)
    assert not any(r in held for r in kept)
    assert training.split_eval(records, 0.1, seed=0) == (kept, held)
    assert training.split_eval(records, 0.1, seed=1)[1] != held
    # Example by example, from the logits: no batching, no padding, not the model's own loss.
    model = run.model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids, labels in trainable_examples(held, run.tokenizer, 48, quiet):
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            target = torch.tensor(labels[1:])
            total += float(F.cross_entropy(logits[:-1].double(), target, ignore_index=-100, reduction="sum"))
            tokens += int((target != -100).sum())
    assert rows[-1]["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_weight_decay_reaches_the_optimizer(tmp_path, small_data):
    train(settings(tmp_path, data=[small_data], steps=1, save_every=1, weight_decay=0.05), log=quiet)
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())
    assert [group["weight_decay"] for group in state["param_groups"]] == [0.05]


def test_chat_template_and_enable_thinking_reach_the_data(tmp_path, small_data, monkeypatch):
    calls = []

    class Stop(Exception):
        pass

    def recording(records, tokenizer, max_length, log, **options):
        calls.append(options)
        raise Stop  # before the model loads: the rendering options are all this test is about

    monkeypatch.setattr(training, "trainable_examples", recording)
    with pytest.raises(Stop):
        train(settings(tmp_path, data=[small_data], chat_template="plain", enable_thinking=True), log=quiet)
    assert calls[0]["chat_template"] == "plain" and calls[0]["enable_thinking"] is True
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, expected", [
    (dict(eval_split=0.1, eval_data=["x.jsonl"]), "--eval-split holds part of --data out"),
    (dict(eval_split=1.0), "--eval-split must be a fraction in [0, 1)"),
    (dict(gradient_accumulation_steps=0), "--gradient-accumulation-steps must be an integer >= 1"),
    (dict(weight_decay=-0.1), "--weight-decay must be a finite number >= 0"),
    (dict(eval_every=-1), "--eval-every must be an integer >= 0"),
    (dict(chat_template="jinja"), "--chat-template must be one of auto, chat, plain, got 'jinja'"),
    (dict(enable_thinking="no"), "enable_thinking must be true or false"),
])
def test_bad_new_settings_name_the_flag(tmp_path, overrides, expected):
    with pytest.raises(TrainError, match=expected.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        validate_settings(settings(tmp_path, **overrides))


def test_tensorboard_writes_the_rows_and_eval_data_files_the_eval_loss(tmp_path, small_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    held = str(write_jsonl(demo_records()[100:105], tmp_path / "held.jsonl"))
    train(settings(tmp_path, data=[small_data], steps=2, tensorboard=True, eval_data=[held], eval_every=0),
          log=quiet)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]  # eval_every 0: after the last step only
    assert held in json.loads((tmp_path / "run" / "run_config.json").read_text())["data_sha256"]
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    board.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars("train/lm")] == \
        [(r["step"], r["lm"]) for r in rows]
    assert [e.step for e in board.Scalars("eval/loss")] == [2]


def test_tensorboard_without_the_package_is_one_line_saying_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert cli.main(["train", "--output-dir", str(tmp_path / "out"), "--tensorboard", "--no-progress"]) == 2
    assert "--tensorboard needs the tensorboard package: pip install tensorboard" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# --- resume ---------------------------------------------------------------------------------------------------

NEWER_FIELDS = ("epochs", "gradient_accumulation_steps", "weight_decay", "chat_template", "enable_thinking",
                "eval_split", "eval_data", "eval_every", "tensorboard")


@pytest.mark.slow
def test_a_run_recorded_before_the_newer_settings_resumes_with_their_defaults(tmp_path, small_data):
    train(settings(tmp_path, data=[small_data], steps=2, save_every=2), log=quiet)
    run_file = tmp_path / "run" / "run_config.json"
    old = {k: v for k, v in json.loads(run_file.read_text()).items() if k not in NEWER_FIELDS}
    run_file.write_text(json.dumps(old))
    before = snapshot(tmp_path / "run")
    with pytest.raises(TrainError, match=r"weight_decay: 0\.0 in the run, 0\.1 now"):  # the default filled in
        train(settings(tmp_path, data=[small_data], steps=3, resume=True, weight_decay=0.1), log=quiet)
    assert snapshot(tmp_path / "run") == before
    resumed = train(settings(tmp_path, data=[small_data], steps=3, resume=True, eval_every=1), log=quiet)
    assert [row["step"] for row in resumed.history] == [3]
