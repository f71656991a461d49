"""Specialisation metrics: mutual information (plain and conditional) against hand-computed cases and a float64
brute force, routing and load entropies, the per-module accumulator and the averaging over modules."""

import math

import pytest
import torch

from sparsedoctor_kernels.train.specialisation import (
    SpecialisationStats,
    average_metrics,
    conditional_mutual_information,
    layer_of,
    load_entropy,
    mutual_information,
    mutual_information_from_table,
    routing_entropy,
)


def brute_conditional_mi(a, b, c) -> float:
    """I(A; B | C) in bits by summing over the full joint table in float64."""
    a, b, c = (torch.as_tensor(x).long() for x in (a, b, c))
    na, nb, nc = int(a.max()) + 1, int(b.max()) + 1, int(c.max()) + 1
    joint = torch.zeros(na, nb, nc, dtype=torch.float64)
    for x, y, z in zip(a.tolist(), b.tolist(), c.tolist()):
        joint[x, y, z] += 1
    joint /= joint.sum()
    p_c, p_ac, p_bc = joint.sum((0, 1)), joint.sum(1), joint.sum(0)
    total = 0.0
    for x in range(na):
        for y in range(nb):
            for z in range(nc):
                p = float(joint[x, y, z])
                if p > 0:
                    total += p * math.log2(p * float(p_c[z]) / (float(p_ac[x, z]) * float(p_bc[y, z])))
    return total


# --- mutual information ---------------------------------------------------------------------------------------

def test_independent_labels_have_zero_mutual_information():
    # Every (a, b) combination exactly twice: the table is the product of its marginals.
    a = torch.arange(3).repeat_interleave(8)
    b = torch.arange(4).repeat(6)
    assert mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("classes", [2, 3, 4, 8])
def test_identical_uniform_labels_give_log2_of_the_class_count(classes):
    labels = torch.arange(classes).repeat(5)
    assert mutual_information(labels, labels) == pytest.approx(math.log2(classes), abs=1e-12)
    relabelled = (labels * 3 + 1) % classes if classes % 3 else labels.flip(0)  # a bijection of the labels
    assert mutual_information(labels, relabelled) == pytest.approx(math.log2(classes), abs=1e-12)


def test_two_by_two_table_by_hand():
    # counts [[3, 1], [1, 3]] of 8: p(a, b) = 3/8 on the diagonal, 1/8 off it, marginals 1/2, so
    # I = 2 * 3/8 * log2(3/8 / 1/4) + 2 * 1/8 * log2(1/8 / 1/4) = 3/4 log2(3/2) - 1/4.
    a = [0, 0, 0, 0, 1, 1, 1, 1]
    b = [0, 0, 0, 1, 1, 1, 1, 0]
    expected = 0.75 * math.log2(1.5) - 0.25
    assert mutual_information(a, b) == pytest.approx(expected, abs=1e-12)
    assert mutual_information(b, a) == pytest.approx(expected, abs=1e-12)
    assert mutual_information_from_table(torch.tensor([[3, 1], [1, 3]])) == pytest.approx(expected, abs=1e-12)
    assert mutual_information(a, b, num_a=5, num_b=7) == pytest.approx(expected, abs=1e-12)  # unused classes


def test_mutual_information_matches_a_brute_force_on_random_labels(gen):
    a = torch.randint(0, 4, (300,), generator=gen)
    b = (a + torch.randint(0, 3, (300,), generator=gen)) % 5  # dependent on a
    constant = torch.zeros(300, dtype=torch.long)
    assert mutual_information(a, b) == pytest.approx(brute_conditional_mi(a, b, constant), abs=1e-12)
    assert mutual_information(a, b) > 0.1


@pytest.mark.parametrize("bad, error", [
    (dict(labels_a=[0, 1], labels_b=[0]), "one length"),
    (dict(labels_a=[], labels_b=[]), "no labels"),
    (dict(labels_a=[0.0, 1.0], labels_b=[0, 1]), "integer labels"),
    (dict(labels_a=[0, -1], labels_b=[0, 1]), ">= 0"),
    (dict(labels_a=[0, 3], labels_b=[0, 1], num_a=3), r"\[0, 3\)"),
])
def test_mutual_information_refuses_bad_labels(bad, error):
    with pytest.raises((ValueError, TypeError), match=error):
        mutual_information(**bad)


# --- conditional mutual information ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_conditions", [1, 7, 40])
def test_conditional_mutual_information_matches_a_brute_force(gen, num_conditions):
    c = torch.randint(0, num_conditions, (500,), generator=gen)
    a = torch.randint(0, 3, (500,), generator=gen)
    b = torch.where(torch.rand(500, generator=gen) < 0.6, (a + c) % 4, torch.randint(0, 4, (500,), generator=gen))
    got = conditional_mutual_information(a, b, c)
    assert got == pytest.approx(brute_conditional_mi(a, b, c), abs=1e-10)
    assert got > 0.05


def test_conditional_mutual_information_special_cases(gen):
    a = torch.randint(0, 4, (400,), generator=gen)
    b = torch.randint(0, 5, (400,), generator=gen)
    # A constant condition changes nothing.
    assert conditional_mutual_information(a, b, torch.zeros(400, dtype=torch.long)) == pytest.approx(
        mutual_information(a, b), abs=1e-12)
    # B a function of C: nothing about B is left to learn from A once C is known.
    c = torch.randint(0, 30, (400,), generator=gen)
    assert conditional_mutual_information(a, c % 5, c) == pytest.approx(0.0, abs=1e-12)
    # A = B, both a function of C only through a hidden bit: I(A; A | C) = H(A | C).
    c = torch.arange(400) % 10
    bit = torch.randint(0, 2, (400,), generator=gen)
    assert conditional_mutual_information(bit, bit, c) == pytest.approx(
        brute_conditional_mi(bit, bit, c), abs=1e-12)


# --- entropies ------------------------------------------------------------------------------------------------

def test_routing_entropy_by_hand():
    uniform = torch.full((5, 4), 0.25)
    one_hot = torch.eye(4)[[0, 2, 3]]
    assert routing_entropy(uniform) == pytest.approx(1.0, abs=1e-12)
    assert routing_entropy(one_hot) == pytest.approx(0.0, abs=1e-12)
    # (1/2, 1/2, 0, 0): log 2 / log 4 = 1/2; averaged with a one-hot token: 1/4.
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert routing_entropy(half) == pytest.approx(0.25, abs=1e-12)
    # Two experts, p = (0.9, 0.1): the binary entropy in bits.
    binary = -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))
    assert routing_entropy(torch.tensor([[0.9, 0.1]])) == pytest.approx(binary, abs=1e-7)


def test_routing_entropy_counts_only_masked_tokens():
    probs = torch.cat([torch.eye(4)[:3], torch.full((2, 4), 0.25)]).reshape(1, 5, 4)  # [batch, seq, E]
    mask = torch.tensor([[True, True, True, False, False]])
    assert routing_entropy(probs, mask) == pytest.approx(0.0, abs=1e-12)
    assert routing_entropy(probs) == pytest.approx(2 / 5, abs=1e-12)
    garbage = probs.clone()
    garbage[0, 3:] = float("nan")  # padding positions may hold anything
    assert routing_entropy(garbage, mask) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no real tokens"):
        routing_entropy(probs, torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="softmax"):
        routing_entropy(torch.randn(3, 4) * 3)  # logits, not probabilities
    with pytest.raises(ValueError, match="elements"):
        routing_entropy(probs, torch.ones(4, dtype=torch.bool))


def test_load_entropy_by_hand():
    assert load_entropy([5, 5, 5, 5]) == pytest.approx(1.0, abs=1e-12)
    assert load_entropy(torch.tensor([7, 0, 0, 0])) == pytest.approx(0.0, abs=1e-12)
    # loads (1/2, 1/4, 1/4): H = 1.5 bits, over log2(3).
    assert load_entropy([2, 1, 1]) == pytest.approx(1.5 / math.log2(3), abs=1e-12)
    for bad in ([0, 0], [1, -1], [3]):
        with pytest.raises(ValueError):
            load_entropy(bad)


# --- the accumulator ------------------------------------------------------------------------------------------

def random_module_tokens(gen, tokens=600, experts=4, domains=3, vocab=20):
    domain = torch.randint(0, domains, (tokens,), generator=gen)
    token = torch.randint(0, vocab, (tokens,), generator=gen)
    logits = torch.randn(tokens, experts, generator=gen) + 2.0 * torch.nn.functional.one_hot(
        (domain + token) % experts, experts)
    probs = logits.softmax(-1)
    return probs.argmax(-1), domain, token, probs


def test_stats_agree_with_the_functions_and_accumulate_over_batches(gen):
    top1, domain, token, probs = random_module_tokens(gen)
    mask = torch.rand(600, generator=gen) < 0.8
    whole = SpecialisationStats(4, 3)
    whole.update(top1, domain, token, probs, mask)
    batched = SpecialisationStats(4, 3)
    for part in torch.arange(600).split(128):
        batched.update(top1[part], domain[part], token[part], probs[part], mask[part])
    got, again = whole.result(), batched.result()
    for key in got:
        assert again[key] == pytest.approx(got[key], abs=1e-12), key
    kept = mask.nonzero().squeeze(1)
    load = torch.bincount(top1[kept], minlength=4).double()
    assert got["mi_domain_top1_bits"] == pytest.approx(mutual_information(domain[kept], top1[kept]), abs=1e-12)
    assert got["mi_domain_top1_given_token_bits"] == pytest.approx(
        brute_conditional_mi(domain[kept], top1[kept], token[kept]), abs=1e-10)
    assert got["router_entropy"] == pytest.approx(routing_entropy(probs, mask), abs=1e-12)
    assert got["load_entropy"] == pytest.approx(load_entropy(load), abs=1e-12)
    assert got["max_load"] == pytest.approx(float(load.max() / load.sum()), abs=1e-12)
    assert got["tokens"] == int(mask.sum())


def test_routing_by_domain_versus_routing_by_token():
    # Every token id occurs in every domain. Expert = domain: the MI is log2 D with or without the token.
    tokens = torch.arange(10).repeat(4)
    domains = torch.arange(4).repeat_interleave(10)
    probs = torch.full((40, 4), 0.25)
    by_domain = SpecialisationStats(4, 4)
    by_domain.update(domains, domains, tokens, probs)
    result = by_domain.result()
    assert result["mi_domain_top1_bits"] == pytest.approx(2.0, abs=1e-12)
    assert result["mi_domain_top1_given_token_bits"] == pytest.approx(2.0, abs=1e-12)
    assert result["load_entropy"] == pytest.approx(1.0) and result["max_load"] == pytest.approx(0.25)
    assert result["router_entropy"] == pytest.approx(1.0)
    # Expert = token's block, tokens that differ between domains: MI without the token, none given it.
    tokens = torch.arange(40)
    by_token = SpecialisationStats(4, 4)
    by_token.update(tokens // 10, domains, tokens, torch.eye(4)[tokens // 10])
    result = by_token.result()
    assert result["mi_domain_top1_bits"] == pytest.approx(2.0, abs=1e-12)
    assert result["mi_domain_top1_given_token_bits"] == pytest.approx(0.0, abs=1e-12)
    assert result["router_entropy"] == pytest.approx(0.0, abs=1e-12)


def test_stats_take_batched_shapes_and_topk_experts(gen):
    top1, domain, token, probs = random_module_tokens(gen, tokens=60)
    flat = SpecialisationStats(4, 3)
    flat.update(top1, domain, token, probs)
    shaped = SpecialisationStats(4, 3)
    top2 = torch.stack([top1, (top1 + 1) % 4], dim=-1)  # [T, k]: slot 0 is the top-1
    shaped.update(top2.reshape(6, 10, 2), domain.reshape(6, 10), token.reshape(6, 10), probs.reshape(6, 10, 4))
    assert shaped.result() == pytest.approx(flat.result())


def test_stats_refuse_bad_input_and_nothing_counted(gen):
    top1, domain, token, probs = random_module_tokens(gen, tokens=10)
    stats = SpecialisationStats(4, 3)
    with pytest.raises(ValueError, match="no tokens"):
        stats.result()
    stats.update(top1, domain, token, probs, torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="no tokens"):
        stats.result()
    with pytest.raises(ValueError, match="E=4"):
        stats.update(top1, domain, token, probs[:, :3])
    with pytest.raises(ValueError, match="one entry per token"):
        stats.update(top1, domain[:9], token, probs)
    with pytest.raises(ValueError, match="domains labels"):
        stats.update(top1, domain + 3, token, probs)
    with pytest.raises(ValueError, match="num_experts"):
        SpecialisationStats(1, 3)


def test_null_baseline_is_the_plug_in_bias(gen):
    # Expert independent of domain: the observed MI is bias alone, about (D-1)(E-1)/(2 N ln 2) bits.
    count = 4000
    independent = SpecialisationStats(4, 4)
    experts = torch.randint(0, 4, (count,), generator=gen)
    independent.update(experts, torch.randint(0, 4, (count,), generator=gen),
                       torch.randint(0, 30, (count,), generator=gen), torch.eye(4)[experts])
    null = independent.null_baseline(samples=40, seed=1)
    assert null == independent.null_baseline(samples=40, seed=1)  # deterministic by seed
    expected = 9 / (2 * count * math.log(2))
    assert 0.5 * expected < null["mi_domain_top1_bits"] < 2 * expected
    assert 0.5 * 30 * expected < null["mi_domain_top1_given_token_bits"] < 2 * 30 * expected
    # Expert = domain: far above its null. Expert a function of the token: the within-token null is exactly 0.
    domains = torch.randint(0, 4, (count,), generator=gen)
    tokens = torch.randint(0, 30, (count,), generator=gen)
    by_domain = SpecialisationStats(4, 4)
    by_domain.update(domains, domains, tokens, torch.eye(4)[domains])
    assert by_domain.result()["mi_domain_top1_bits"] > 1.9 > 100 * by_domain.null_baseline(5)["mi_domain_top1_bits"]
    by_token = SpecialisationStats(4, 4)
    by_token.update(tokens % 4, domains, tokens, torch.eye(4)[tokens % 4])
    assert by_token.null_baseline(5)["mi_domain_top1_given_token_bits"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no tokens"):
        SpecialisationStats(4, 4).null_baseline()


# --- averaging ------------------------------------------------------------------------------------------------

def test_average_metrics_over_modules_and_per_layer():
    def metrics(mi, tokens):
        return {"mi_domain_top1_bits": mi, "router_entropy": mi / 10, "tokens": tokens}

    per_module = {
        "base_model.model.layers.0.self_attn.q_proj": metrics(1.0, 10),
        "base_model.model.layers.0.mlp.up_proj": metrics(0.0, 10),
        "base_model.model.layers.1.self_attn.q_proj": metrics(0.5, 10),
    }
    mean = average_metrics(per_module)
    assert mean == pytest.approx({"mi_domain_top1_bits": 0.5, "router_entropy": 0.05, "tokens": 30})
    per_layer = average_metrics(per_module, group_of=layer_of)
    assert list(per_layer) == ["layer 0", "layer 1"]
    assert per_layer["layer 0"] == pytest.approx({"mi_domain_top1_bits": 0.5, "router_entropy": 0.05, "tokens": 20})
    assert per_layer["layer 1"]["mi_domain_top1_bits"] == pytest.approx(0.5)
    by_kind = average_metrics(per_module, group_of=lambda name: name.rsplit(".", 1)[-1])
    assert by_kind["q_proj"]["mi_domain_top1_bits"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no modules"):
        average_metrics({})
    with pytest.raises(ValueError, match="has metrics"):
        average_metrics({"a": metrics(1.0, 1), "b": {"tokens": 1}})


def test_layer_of_names():
    assert layer_of("base_model.model.layers.12.mlp.down_proj") == "layer 12"
    assert layer_of("layers.3.q") == "layer 3"
    assert layer_of("lm_head") == "lm_head"
    assert layer_of("mylayers.2.x") == "mylayers.2.x"
