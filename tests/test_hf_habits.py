"""Hugging Face habits on the adapter model: Trainer (adapter-only checkpoints with tied embeddings, resuming, the
loss terms in its logs), generate, print_trainable_parameters, save_pretrained / from_pretrained, PEFT's loader
and ours refusing each other's adapters with one clear line, and the shared model loader."""

import dataclasses
import json
import math
import pathlib
import re

import pytest
import torch
from safetensors.torch import load_file

from sparsedoctor_kernels.model import SparseDoctorConfig, SparseDoctorModel, apply_sparsedoctor, load_adapter
from sparsedoctor_kernels.model.adapter import PEFT_TYPE_MARKER, read_adapter_config, save_adapter
from sparsedoctor_kernels.model.layer import LoraMoELinear
from sparsedoctor_kernels.model.tiny import tiny_qwen3

CONFIG = SparseDoctorConfig(num_experts=4, top_k=2, r=2, proj_dim=8, queue_size=8, contrastive_tokens=16,
                            lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
VOCAB = 512


def adapted(seed: int = 0, config: SparseDoctorConfig = CONFIG) -> SparseDoctorModel:
    torch.manual_seed(seed)
    return apply_sparsedoctor(tiny_qwen3(VOCAB), config)


def adapter_state(model: SparseDoctorModel) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach().clone() for name, module in model.adapted_modules().items()
            for key, value in module.state_dict().items() if not key.startswith("base.")}


class TokenRows(torch.utils.data.Dataset):
    """Random token sequences of varied length whose first two tokens are not learned."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.rows = []
        for index in range(count):
            ids = torch.randint(0, VOCAB, (6 + index % 5,), generator=generator)
            labels = ids.clone()
            labels[:2] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def pad_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    length = max(len(row["input_ids"]) for row in rows)
    batch = {"input_ids": torch.zeros(len(rows), length, dtype=torch.long),
             "labels": torch.full((len(rows), length), -100), "attention_mask": torch.zeros(len(rows), length,
                                                                                           dtype=torch.long)}
    for index, row in enumerate(rows):
        size = len(row["input_ids"])
        batch["input_ids"][index, :size] = row["input_ids"]
        batch["labels"][index, :size] = row["labels"]
        batch["attention_mask"][index, :size] = 1
    return batch


# One optimizer step is the whole data set (2 micro-batches of 4): the first step's LM term is then the base
# model's token-weighted loss over all of it, whatever order the sampler draws.
TRAIN_ROWS = TokenRows(8, seed=1)


def make_trainer(output_dir, steps: int = 2):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from sparsedoctor_kernels.hf_trainer import SparseDoctorTrainer

    args = TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_steps=1,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return SparseDoctorTrainer(model=adapted(), args=args, train_dataset=TRAIN_ROWS, data_collator=pad_rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trainer, output dir) after 2 steps with checkpoints at steps 1 and 2."""
    output = tmp_path_factory.mktemp("hf-trainer") / "run"
    trainer = make_trainer(output)
    base = trainer.model.base_model
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied: what Trainer's own save refuses
    trainer.train()
    return trainer, output


def test_trainer_checkpoints_hold_the_adapter_only(trained):
    trainer, output = trained
    checkpoint = output / "checkpoint-1"
    names = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    tensors = load_file(checkpoint / "adapter_model.safetensors")
    assert set(tensors) == set(adapter_state(trainer.model))
    assert not any("embed_tokens" in key or "lm_head" in key or key.endswith("base.weight") for key in tensors)
    # The last checkpoint's adapter is what the model holds at the end.
    final = load_file(output / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.equal(final[key], value) for key, value in adapter_state(trainer.model).items())


def test_trainer_logs_the_loss_terms(trained):
    trainer, _ = trained
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        weighted = (row["lm_loss"] + CONFIG.balance_coef * row["balance_loss"]
                    + CONFIG.contrastive_coef * row["contrastive_loss"])
        assert math.isclose(row["loss"], weighted, rel_tol=1e-5), row
        assert row["balance_loss"] >= 1.0 - 1e-6 and row["contrastive_loss"] > 0
    # At step 1 the adapter adds nothing (B = 0): the LM term is the base model's mean over every learned token.
    base = tiny_qwen3(VOCAB)
    batch = pad_rows(TRAIN_ROWS.rows)
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100)
    assert math.isclose(rows[0]["lm_loss"], float(expected), rel_tol=1e-4)


def test_resuming_a_trainer_checkpoint_loads_the_adapter_and_continues_identically(trained, tmp_path):
    trainer, output = trained
    resumed = make_trainer(tmp_path / "resumed")
    loaded = []
    original = resumed._load_from_checkpoint
    resumed._load_from_checkpoint = lambda path, model=None: (loaded.append(path), original(path, model))
    resumed.train(resume_from_checkpoint=str(output / "checkpoint-1"))
    assert loaded == [str(output / "checkpoint-1")]
    expected = adapter_state(trainer.model)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(resumed.model).items())


def test_a_trainer_checkpoint_reloads_with_from_pretrained(trained):
    trainer, output = trained
    model = SparseDoctorModel.from_pretrained(tiny_qwen3(VOCAB), output / "checkpoint-2")
    expected = adapter_state(trainer.model)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(model).items())
    assert not model.training and model.trainable_parameter_counts()[0] == 0


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(trained, tmp_path):
    _, output = trained
    other = make_trainer(tmp_path / "other")
    other.state.best_model_checkpoint = str(output / "checkpoint-1")
    other._load_best_model()
    expected = load_file(output / "checkpoint-1" / "adapter_model.safetensors")
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(other.model).items())


def test_evaluate_and_predict_give_the_loss_and_the_logits(trained):
    trainer, _ = trained
    rows = TokenRows(4, seed=2)
    assert math.isfinite(trainer.evaluate(rows)["eval_loss"])
    predictions = trainer.predict(rows).predictions  # the logits alone, not the loss terms beside them
    assert predictions.shape == (4, max(len(row["input_ids"]) for row in rows.rows), VOCAB)


def test_generate_at_initialisation_is_the_base_models_generate():
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ours = adapted().eval().generate(prompt, **options)
    assert torch.equal(ours, tiny_qwen3(VOCAB).eval().generate(prompt, **options))


def test_generate_applies_the_adapter_and_records_nothing():
    model = adapted()
    with torch.no_grad():
        for module in model.adapted_modules().values():
            module.lora_b.normal_(generator=torch.Generator().manual_seed(4))
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    model.train()  # the layers compute their contrastive views: only a recording forward would stage them
    generated = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not any(module._staged for module in model.adapted_modules().values())
    assert not model.context.recording and not model.context.balance_terms and not model.context.contrastive_terms
    # The same tokens as greedy decoding through the wrapper's own forward (no cache), unlike the base model's.
    model.eval()
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            sequence = torch.cat([sequence, model(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, sequence)
    assert not torch.equal(generated, tiny_qwen3(VOCAB).eval().generate(prompt, max_new_tokens=6, do_sample=False,
                                                                        pad_token_id=0))


def test_print_trainable_parameters_counts_the_adapter_and_a_tied_embedding_once(capsys):
    model = adapted()
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    trainable, total = (int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?=\D)", printed)[:2])
    expected, heads = 0, 0
    for module in model.adapted_modules().values():
        d_in, d_out, experts = module.base.in_features, module.base.out_features, CONFIG.num_experts
        expected += experts * d_in + experts * CONFIG.r * (d_in + d_out)
        heads += CONFIG.proj_dim * d_out + CONFIG.proj_dim  # frozen in the default (router) mode: no views
    base_count = tiny_qwen3(VOCAB).num_parameters()
    assert CONFIG.contrastive_mode == "router"
    assert (trainable, total) == (expected, base_count + expected + heads)
    assert (trainable, total) == model.trainable_parameter_counts()
    percent = float(re.search(r"\(([\d.]+)%\)", printed).group(1))
    assert math.isclose(percent, 100 * expected / (base_count + expected + heads), abs_tol=1e-4)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    model = adapted(seed=5)
    with torch.no_grad():
        for module in model.adapted_modules().values():
            module.lora_b.normal_()
    model.save_pretrained(tmp_path / "adapter")
    state = torch.get_rng_state()
    loaded = SparseDoctorModel.from_pretrained(tiny_qwen3(VOCAB), tmp_path / "adapter", is_trainable=True)
    assert torch.equal(torch.get_rng_state(), state)  # the overwritten initialisation drew nothing from it
    assert loaded.sparsedoctor_config == CONFIG and loaded.trainable_parameter_counts()[0] > 0
    expected = adapter_state(model)
    assert all(torch.equal(value, expected[key]) for key, value in adapter_state(loaded).items())


def test_from_pretrained_leaves_the_base_as_it_was_on_a_bad_adapter(tmp_path):
    save_adapter(adapted(), tmp_path / "adapter")
    smaller = tiny_qwen3(VOCAB, hidden_size=32)
    with pytest.raises(ValueError, match="other modules or sizes"):
        SparseDoctorModel.from_pretrained(smaller, tmp_path / "adapter")
    assert not any(isinstance(m, LoraMoELinear) for m in smaller.modules())
    assert all(p.requires_grad for p in smaller.parameters())
    with pytest.raises(TypeError, match="not a SparseDoctorModel"):
        SparseDoctorModel.from_pretrained(adapted(), tmp_path / "adapter")


def test_saving_beside_other_files_keeps_them(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="replace_directory=False"):
        save_adapter(adapted(), target)
    save_adapter(adapted(), target, replace_directory=False)
    assert (target / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "notes.txt"]
    load_adapter(adapted(seed=1), target)


def test_adapters_written_before_peft_type_still_load_and_a_wrong_one_is_named(tmp_path):
    model = adapted()
    save_adapter(model, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    assert saved["peft_type"] == PEFT_TYPE_MARKER
    del saved["peft_type"]
    config_path.write_text(json.dumps(saved))
    load_adapter(adapted(seed=1), tmp_path / "adapter")
    config_path.write_text(json.dumps({**saved, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="field 'peft_type' must be"):
        load_adapter(adapted(seed=1), tmp_path / "adapter")


def test_an_adapter_written_before_contrastive_mode_existed_loads_as_the_paper_mode(tmp_path):
    if "contrastive_mode" not in SparseDoctorConfig.field_names():
        pytest.skip("SparseDoctorConfig has no contrastive_mode")
    # Such an adapter was trained in the paper mode (then the only one), and its file holds its weight.
    paper = dataclasses.replace(CONFIG, contrastive_mode="paper", contrastive_coef=0.1)
    save_adapter(adapted(config=paper), tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    del saved["sparsedoctor"]["contrastive_mode"], saved["peft_type"]
    config_path.write_text(json.dumps(saved))
    assert read_adapter_config(tmp_path / "adapter")["sparsedoctor"]["contrastive_mode"] == "paper"
    loaded = SparseDoctorModel.from_pretrained(tiny_qwen3(VOCAB), tmp_path / "adapter")
    assert loaded.sparsedoctor_config == paper
    del saved["sparsedoctor"]["r"]
    config_path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"field 'sparsedoctor' lacks \['r'\]"):
        read_adapter_config(tmp_path / "adapter")


def _hand_written_peft_dir(directory: pathlib.Path, weights: str = "adapter_model.safetensors") -> pathlib.Path:
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type":
         "CAUSAL_LM", "base_model_name_or_path": "Qwen/Qwen3-0.6B"}))
    (directory / weights).write_bytes(b"\x80\x04 not read")
    return directory


@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "adapter_model.bin"])
def test_our_loaders_name_a_peft_adapter_in_one_line(tmp_path, weights):
    peft_dir = _hand_written_peft_dir(tmp_path / "peft", weights)
    for load in (lambda: load_adapter(adapted(), peft_dir), lambda: read_adapter_config(peft_dir),
                 lambda: SparseDoctorModel.from_pretrained(tiny_qwen3(VOCAB), peft_dir)):
        with pytest.raises(ValueError) as raised:
            load()
        message = str(raised.value)
        assert "a PEFT LoRA adapter" in message and "peft.PeftModel.from_pretrained" in message
        assert "\n" not in message


def test_peft_and_our_loader_refuse_each_others_adapters_clearly(tmp_path):
    peft = pytest.importorskip("peft")
    save_adapter(adapted(), tmp_path / "ours")
    for load in (lambda: peft.PeftModel.from_pretrained(tiny_qwen3(VOCAB), str(tmp_path / "ours")),
                 lambda: peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))):
        with pytest.raises(KeyError, match="not a PEFT adapter.*SparseDoctorModel.from_pretrained"):
            load()
    lora = peft.get_peft_model(tiny_qwen3(VOCAB), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="a PEFT LoRA adapter, not a sparsedoctor one"):
        SparseDoctorModel.from_pretrained(tiny_qwen3(VOCAB), tmp_path / "peft")


# --- the shared loader ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_tokenizer():
    from sparsedoctor_kernels.train.data import build_tokenizer

    return build_tokenizer(["患者 发热 咳嗽 三天", "治疗 以 休息 为主", "the patient has a fever"], vocab_size=300)


def test_the_dtype_rule_ignores_the_checkpoints_own_dtype(tmp_path, small_tokenizer):
    from sparsedoctor_kernels.train.loading import default_dtype, load_causal_lm

    assert default_dtype("cuda:1") == default_dtype("cuda") == torch.bfloat16
    assert default_dtype("cpu") == default_dtype(None) == torch.float32
    tiny_qwen3(len(small_tokenizer)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16-model")
    assert load_causal_lm(str(tmp_path / "bf16-model"), device="cpu").dtype == torch.float32
    assert load_causal_lm("tiny", small_tokenizer).dtype == torch.float32
    assert load_causal_lm("tiny", small_tokenizer, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs the tokenizer"):
        load_causal_lm("tiny")


def test_a_missing_pad_token_is_the_eos_token_and_reaches_generation(tmp_path, small_tokenizer):
    from sparsedoctor_kernels.train.loading import load_causal_lm, load_tokenizer

    small_tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer("tiny", tokenizer=str(tmp_path / "tokenizer"))
    assert tokenizer.pad_token == tokenizer.eos_token is not None
    model = load_causal_lm("tiny", tokenizer)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_train_and_eval_load_the_same_tiny_model():
    from sparsedoctor_kernels.eval import command
    from sparsedoctor_kernels.train import loop as training
    from sparsedoctor_kernels.train.settings import TrainSettings

    settings = TrainSettings()
    train_tokenizer = training.load_tokenizer(settings, training.load_records(settings))
    trained_base = training.load_model(settings, train_tokenizer)
    eval_base, eval_tokenizer = command.load_model("tiny", None, None, "cpu", seed=settings.seed)
    assert train_tokenizer.get_vocab() == eval_tokenizer.get_vocab()
    eval_state = eval_base.state_dict()
    assert all(torch.equal(value, eval_state[key]) for key, value in trained_base.state_dict().items())
