"""Specialisation you can see during training: every step's load entropy over real tokens, and at each eval the
held-out router and load entropy, plus MI(domain; top-1 expert) when the records name their domain."""

import json

import pytest
import torch
from train_helpers import quiet, settings

from sparsedoctor_kernels.experiments.domains import synthetic_domain_records
from sparsedoctor_kernels.train.data import write_jsonl
from sparsedoctor_kernels.train.held_out import held_out_metrics
from sparsedoctor_kernels.train.loop import train
from sparsedoctor_kernels.train.specialisation import load_entropy


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_eval_rows_carry_routing_statistics_and_mi_when_records_name_a_domain(tmp_path):
    data = write_jsonl(synthetic_domain_records(records_per_domain=8, seed=0), tmp_path / "domains.jsonl")
    train(settings(tmp_path, data=[str(data)], steps=3, eval_split=0.25, eval_every=2), log=quiet)
    rows = rows_of(tmp_path / "run")
    assert all(0 < row["load_entropy"] <= 1 for row in rows)
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [2, 3]
    for row in evals:
        assert 0 < row["eval_router_entropy"] <= 1 and 0 < row["eval_load_entropy"] <= 1
        assert 0 <= row["eval_mi_domain_top1_bits"] <= 2 and "eval_mi_domain_top1_given_token_bits" in row


def test_the_step_load_entropy_is_the_mean_over_modules_of_the_last_forwards_load(tmp_path):
    result = train(settings(tmp_path, steps=2), log=quiet)  # no eval: the last forward is the last step's
    loads = [load_entropy(c.double()) for c in result.model.expert_load().values()]
    assert abs(rows_of(tmp_path / "run")[-1]["load_entropy"] - sum(loads) / len(loads)) < 1e-9


@pytest.mark.slow
def test_without_domains_the_eval_has_no_mutual_information(tmp_path):
    train(settings(tmp_path, steps=2, eval_split=0.2, eval_every=0), log=quiet)
    (row,) = [row for row in rows_of(tmp_path / "run") if "eval_loss" in row]
    assert "eval_router_entropy" in row and not any(key.startswith("eval_mi") for key in row)


def test_last_load_counts_real_tokens_only(tmp_path):
    result = train(settings(tmp_path, steps=1), log=quiet)
    model = result.model
    model.train()
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # 3 padding tokens
    model(input_ids=ids, attention_mask=mask)
    top_k = next(iter(model.adapted_modules().values())).config.top_k
    assert all(int(counts.sum()) == top_k * 11 for counts in model.expert_load().values())


def test_held_out_eval_loss_matches_the_training_eval_loss(tmp_path):
    from sparsedoctor_kernels.train.data import encode
    from sparsedoctor_kernels.train.metrics import eval_loss

    result = train(settings(tmp_path, steps=1), log=quiet)
    records = [{"instruction": "头痛怎么办", "response": "多休息"}, {"instruction": "发热", "response": "补液"}]
    examples = encode(records, result.tokenizer, 48)
    pad = result.tokenizer.pad_token_id
    measured = held_out_metrics(result.model, examples, None, 0, pad, batch_size=1, device="cpu")
    want = eval_loss(result.model, examples, pad, 2, torch.device("cpu"), False)
    assert abs(measured["eval_lm_loss"] - want) < 1e-5 and measured["tokens"] > 0
