"""`sparsedoctor ablate`: the grid runs, resumes, refuses another grid's directory, and its table is the paired
arithmetic of its runs."""

import csv
import json

import pytest
import torch

from sparsedoctor_kernels.experiments import ablate
from sparsedoctor_kernels.experiments.ablate import AblateError, AblateSettings, run_ablation, summarise
from sparsedoctor_kernels.train import loop as training

pytestmark = pytest.mark.slow  # whole ablation grids of training runs


def tiny(tmp_path, **overrides) -> AblateSettings:
    fields = dict(output_dir=str(tmp_path / "grid"), variants=["full", "control"], seeds=[0, 1], steps=2,
                  batch_size=4, records_per_domain=6, hidden_size=32, num_layers=1, pretrain_steps=1,
                  progress=False, device="cpu")
    return AblateSettings(**{**fields, **overrides})


def test_summarise_pairs_runs_by_seed():
    results = [{"variant": v, "seed": s, **{m: value for m in ablate.METRICS}}
               for v, s, value in [("full", 0, 1.0), ("full", 1, 2.0), ("control", 0, 1.5), ("control", 1, 1.5),
                                   ("x", 0, 0.0), ("x", 1, 4.0)]]
    rows = {(r["variant"], r["metric"]): r for r in summarise(results, ["full", "control", "x"])}
    row = rows["x", "eval_lm_loss"]
    assert row["mean"] == 2.0 and row["sd"] == pytest.approx(2 ** 1.5) and row["per_seed"] == "0.0000 4.0000"
    # x - full per seed: -1, +2 -> mean 0.5, sd sqrt(4.5), positive on one seed of two.
    assert row["vs_full"] == f"+0.5000 ± {4.5 ** 0.5:.4f} (1/2 up)"
    assert row["vs_control"] == f"+0.5000 ± {8 ** 0.5:.4f} (1/2 up)"  # -1.5, +2.5
    assert rows["full", "mi_domain_top1_bits"]["vs_full"] == ""  # no difference against itself


def test_grid_runs_writes_the_table_and_resumes(tmp_path, monkeypatch):
    settings = tiny(tmp_path)
    results = run_ablation(settings, log=lambda *a: None)
    grid = tmp_path / "grid"
    assert {(r["variant"], r["seed"]) for r in results} == {("full", 0), ("full", 1), ("control", 0), ("control", 1)}
    for r in results:
        assert r["tokens"] > 0 and r["eval_lm_loss"] > 0 and 0 <= r["mi_domain_top1_bits"] <= 2
        assert 0 < r["router_entropy"] <= 1
    with (grid / "runs.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 4
    table = (grid / "table.md").read_text()
    assert "| eval_lm_loss |" in table and "Paired difference against `control`" in table
    assert (grid / "ablation.png").stat().st_size > 0
    # Resume: only the missing run trains again, and the table is the same.
    (grid / "runs" / "control" / "seed1" / "result.json").unlink()
    trained = []
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda s, **k: trained.append(s) or real_train(s, **k))
    run_ablation(settings, log=lambda *a: None)
    assert [s.seed for s in trained] == [1] and trained[0].adapter.contrastive_coef == 0.0
    assert (grid / "table.md").read_text() == table  # the retrained run is deterministic, the others reused


def test_control_differs_from_the_full_method_only_in_the_weight_of_the_term():
    full = ablate.VARIANTS["full"]
    control = ablate.VARIANTS["control"]
    assert control == {**full, "contrastive_coef": 0.0, "contrastive_at_zero_weight": True}
    assert AblateSettings().adapter.get("lora_dropout", 0.05) > 0  # else the random stream changes nothing


def test_another_grids_directory_is_refused(tmp_path):
    settings = tiny(tmp_path, variants=["full"], seeds=[0])
    run_ablation(settings, log=lambda *a: None)
    with pytest.raises(AblateError, match="holds a grid of other settings \\(steps\\)"):
        run_ablation(tiny(tmp_path, variants=["full"], seeds=[0], steps=3), log=lambda *a: None)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AblateError, match="not empty and holds no ablation grid"):
        run_ablation(tiny(tmp_path, output_dir=str(tmp_path / "other")), log=lambda *a: None)


@pytest.mark.parametrize("overrides, match", [
    ({"task": "nope"}, "--task must be one of"),
    ({"variants": ["full", "bogus"]}, "unknown \\['bogus'\\]"),
    ({"seeds": [1, 1]}, "--seeds must be distinct"),
    ({"steps": 0}, "--steps must be >= 1"),
    ({"eval_fraction": 1.0}, "--eval-fraction must be in"),
    ({"adapter": {"num_experts": 2, "top_k": 3}}, "variant full: SparseDoctorConfig.top_k"),
])
def test_bad_settings_are_one_line_errors(tmp_path, overrides, match):
    with pytest.raises(AblateError, match=match):
        ablate.check_settings(tiny(tmp_path, **overrides))


def test_evaluate_counts_response_tokens_only_and_matches_the_models_loss(tmp_path):
    from sparsedoctor_kernels.experiments.domains import synthetic_domain_records
    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor
    from sparsedoctor_kernels.model.tiny import tiny_qwen3
    from sparsedoctor_kernels.train.data import build_tokenizer, collate, corpus, encode

    records = synthetic_domain_records(records_per_domain=3, seed=0)
    tokenizer = build_tokenizer(corpus(records), vocab_size=300)
    model = apply_sparsedoctor(tiny_qwen3(len(tokenizer), hidden_size=32, num_layers=1),
                               SparseDoctorConfig(num_experts=4, r=4, contrastive_tokens=0))
    metrics = ablate.evaluate(model, tokenizer, records, torch.device("cpu"), batch_size=5)
    examples = encode(records, tokenizer, 512)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        want = model(**batch).aux_losses["lm"]  # Hugging Face's mean over the (shifted) response tokens
    response_tokens = sum(sum(label != -100 for label in labels) for _, labels in examples)
    assert metrics["tokens"] == response_tokens * len(model.adapted_modules())  # summed over modules
    assert metrics["eval_lm_loss"] == pytest.approx(float(want), rel=1e-5)
    assert not any(m.collected_routing for m in model.adapted_modules().values())  # nothing left behind
    json.dumps(metrics)  # the result file can hold it
