"""Sibling groups: q/k/v and gate/up of each decoder layer computed from one pass over their shared input give
the ungrouped model's outputs and losses bit for bit on the torch backend, and its gradients up to rounding."""

import pytest
import torch
from test_model import batch, perturb_lora_b

from sparsedoctor_kernels.cost import ENV_STRATEGY
from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor
from sparsedoctor_kernels.model.tiny import tiny_qwen3

from conftest import cpu_backends

ADAPTER = dict(num_experts=4, top_k=2, r=4, lora_alpha=8, proj_dim=16, queue_size=32, contrastive_tokens=8,
               lora_dropout=0.1)


def make(grouped: bool, num_layers=2, **overrides):
    torch.manual_seed(0)
    model = apply_sparsedoctor(tiny_qwen3(seed=0, num_layers=num_layers), SparseDoctorConfig(**{**ADAPTER,
                                                                                                **overrides}))
    perturb_lora_b(model)
    return model.group_siblings(grouped).train()


def step(model, checkpointing=False):
    if checkpointing:
        model.gradient_checkpointing_enable()
    torch.manual_seed(7)  # dropout and the contrastive subsets draw from it
    model(**batch(seed=1))  # stages views (paper modes)
    out = model(**batch(seed=2))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_groups_are_each_layers_qkv_and_gate_up():
    model = make(True)
    names = {id(m): n for n, m in model.adapted_modules().items()}
    groups = [[names[id(m)].split("layers.")[1] for m in g.members] for g in model.sibling_groups]
    assert groups == [["0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"],
                      ["0.mlp.gate_proj", "0.mlp.up_proj"],
                      ["1.self_attn.q_proj", "1.self_attn.k_proj", "1.self_attn.v_proj"],
                      ["1.mlp.gate_proj", "1.mlp.up_proj"]]
    plain = apply_sparsedoctor(tiny_qwen3(seed=0, num_layers=2), SparseDoctorConfig(**ADAPTER))
    assert model.state_dict().keys() == plain.state_dict().keys()  # nothing of the groups is saved


def test_a_projection_alone_forms_no_sibling_group():
    model = apply_sparsedoctor(tiny_qwen3(seed=0, num_layers=1),
                               SparseDoctorConfig(**ADAPTER, target_modules=("q_proj", "o_proj", "up_proj")))
    assert model.sibling_groups == []


@pytest.mark.parametrize("overrides", [dict(contrastive_mode="router"),
                                       dict(contrastive_mode="paper", contrastive_updates="router"),
                                       dict(contrastive_mode="router", contrastive_coef=0.0),
                                       dict(contrastive_mode="paper")])
def test_grouped_equals_ungrouped_bit_for_bit(monkeypatch, overrides):
    """Outputs and every loss term bit for bit (the dense strategy on both sides: the group's shared shrink is
    dense); gradients to rounding, since the group sums its members' input gradients inside one matmul."""
    monkeypatch.setenv(ENV_STRATEGY, "dense")
    (grouped, grouped_grads), (alone, alone_grads) = (step(make(g, **overrides)) for g in (True, False))
    assert torch.equal(grouped.logits, alone.logits)
    for key in ("lm", "balance", "contrastive"):
        assert torch.equal(grouped.aux_losses[key], alone.aux_losses[key]), key
    assert grouped_grads.keys() == alone_grads.keys()
    for name in alone_grads:
        torch.testing.assert_close(grouped_grads[name], alone_grads[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_grouped_on_the_default_strategy_matches_to_rounding():
    (grouped, grouped_grads), (alone, alone_grads) = (step(make(g)) for g in (True, False))
    torch.testing.assert_close(grouped.logits, alone.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.loss, alone.loss)
    for name in alone_grads:
        torch.testing.assert_close(grouped_grads[name], alone_grads[name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_replays_the_groups():
    (plain, plain_grads), (checkpointed, checkpointed_grads) = (step(make(True), c) for c in (False, True))
    assert torch.equal(plain.loss, checkpointed.loss)
    for name in plain_grads:
        torch.testing.assert_close(checkpointed_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)


def test_a_member_called_on_another_tensor_computes_afresh():
    """Only calls on the very tensor the group computed take its results: a member called alone, or on a
    tensor modified in place since, gets its own output."""
    grouped, alone = make(True, num_layers=1).eval(), make(False, num_layers=1).eval()
    name = "model.layers.0.self_attn.k_proj"
    k_grouped, k_alone = grouped.adapted_modules()[name], alone.adapted_modules()[name]
    q_grouped = grouped.adapted_modules()["model.layers.0.self_attn.q_proj"]
    x = torch.randn(2, 5, 64)
    with torch.enable_grad():  # not the fused inference path
        q_grouped(x)
        other = torch.randn(2, 5, 64)
        torch.testing.assert_close(k_grouped(other), k_alone(other))
        q_grouped(x)
        x.mul_(2)
        torch.testing.assert_close(k_grouped(x), k_alone(x))


@pytest.mark.skipif("triton" not in cpu_backends("sibling_lora_moe"), reason="Triton cannot run here")
@pytest.mark.slow
def test_triton_groups_give_the_torch_model(monkeypatch):
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SPARSEDOCTOR_BACKEND", backend)
        results.append(step(make(True, num_layers=1, lora_dropout=0.0)))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for key in ("lm", "balance", "contrastive"):
        torch.testing.assert_close(got.aux_losses[key], ref.aux_losses[key], rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif("triton" not in cpu_backends("sibling_lora_moe"), reason="Triton cannot run here")
@pytest.mark.slow
def test_triton_dropout_replays_under_gradient_checkpointing(monkeypatch):
    """The fused groups draw their dropout seed from torch's generator inside the layer: a checkpointed layer's
    recomputation restores the generator and redraws the same seed, so loss and gradients equal the plain
    run's (Triton, dropout 0.1, the kernels' Philox masks)."""
    monkeypatch.setenv("SPARSEDOCTOR_BACKEND", "triton")
    (plain, plain_grads), (checkpointed, checkpointed_grads) = (step(make(True, num_layers=1), c)
                                                                for c in (False, True))
    assert torch.equal(plain.loss, checkpointed.loss)
    for name in plain_grads:
        torch.testing.assert_close(checkpointed_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)
    # Dropout really drew a mask: the same model without it gives another loss.
    no_dropout, _ = step(make(True, num_layers=1, lora_dropout=0.0))
    assert not torch.equal(no_dropout.loss, plain.loss)
