"""The contrastive objective's modes: `sequence` positives against a brute force, and each mode trains."""

import pytest
import torch

import sparsedoctor_kernels as sdk
from sparsedoctor_kernels.model import SparseDoctorConfig
from sparsedoctor_kernels.model.layer import ForwardContext, LoraMoELinear

from conftest import cpu_backends


def brute_sequence_positive(fused, picked, padding, sequence_length):
    positives, weights = torch.zeros_like(fused), torch.zeros(len(picked), dtype=torch.float64)
    for i in range(len(picked)):
        if padding[i]:
            continue
        partners = [j for j in range(len(picked)) if j != i and not padding[j]
                    and picked[j] // sequence_length == picked[i] // sequence_length]
        if partners:
            positives[i] = fused[partners].mean(0)
            weights[i] = 1.0
    return positives, weights / max(weights.sum(), 1.0)


@pytest.mark.parametrize("sequence_length, num_tokens", [(5, 20), (7, 21), (21, 21), (1, 6)])
def test_sequence_positive_is_the_leave_one_out_mean_of_the_sequence(sequence_length, num_tokens, gen):
    count = min(9, num_tokens)
    picked = torch.randperm(num_tokens, generator=gen)[:count]
    padding = torch.arange(count) >= count - 2  # the last rows are padding, as the layer draws them
    fused = torch.randn(count, 6, generator=gen, dtype=torch.float64)
    fused[padding] = float("nan")  # padding rows must not leak into anyone's positive
    got, weights = LoraMoELinear._sequence_positive(fused, picked, padding, sequence_length, num_tokens)
    want, want_weights = brute_sequence_positive(fused, picked, padding, sequence_length)
    has_partner = want_weights > 0
    torch.testing.assert_close(got[has_partner], want[has_partner])
    torch.testing.assert_close(weights.double(), want_weights)


@pytest.mark.parametrize("backend", cpu_backends("group_infonce"))
@pytest.mark.parametrize("sequence_length, num_tokens", [(5, 20), (7, 21), (21, 21)])
def test_the_router_term_against_a_brute_force(sequence_length, num_tokens, backend, gen):
    """What the layer computes in the router mode (group_infonce over the picked tokens, sequences as groups,
    padding in none), against the formula written out with cosines, row by row."""
    count, experts, temperature = min(10, num_tokens), 5, 0.3
    picked = torch.randperm(num_tokens, generator=gen)[:count]
    padding = torch.arange(count) >= count - 2
    probs = torch.softmax(torch.randn(count, experts, generator=gen, dtype=torch.float64), -1)
    groups = torch.div(picked, sequence_length, rounding_mode="floor").masked_fill(padding, -1)
    got = sdk.group_infonce(probs, groups, -(-num_tokens // sequence_length), temperature=temperature,
                            backend=backend)
    sequence = [int(i) // sequence_length for i in picked]
    real = [i for i in range(count) if not padding[i]]
    cosine = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    rows = []
    for i in real:
        partners = [j for j in real if j != i and sequence[j] == sequence[i]]
        if not partners:
            continue
        own = cosine(probs[i], probs[partners].mean(0)) / temperature
        others = [cosine(probs[i], probs[[j for j in real if sequence[j] == s]].mean(0)) / temperature
                  for s in sorted({sequence[j] for j in real} - {sequence[i]})]
        rows.append(torch.logsumexp(torch.tensor([own, *others], dtype=torch.float64), 0) - own)
    want = torch.stack(rows).mean() if rows else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", cpu_backends("group_infonce"))
@pytest.mark.parametrize("masked", [False, True])
def test_every_modules_router_term_at_once_is_each_modules_own(masked, backend, monkeypatch):
    """The context computes the router terms of all recorded modules in one batched call: module m's term is
    group_infonce over its own random subset (row m of one draw, real tokens first), its logits' softmax and
    the sequences as groups; the subsets differ between modules; a group's batched logits recorded whole give
    the same terms as its rows recorded one by one."""
    from sparsedoctor_kernels.model.loss import Row

    monkeypatch.setenv("SPARSEDOCTOR_BACKEND", backend)
    gen = torch.Generator().manual_seed(4)
    num_tokens, sequence_length, experts, count, temperature = 21, 7, 5, 9, 0.3
    logits = [torch.randn(num_tokens, experts, generator=gen, dtype=torch.float64) for _ in range(4)]
    batch = torch.stack(logits[1:])  # a sibling group's [S, T, E]
    mask = torch.rand(num_tokens, generator=gen) < 0.6 if masked else None
    context = ForwardContext()
    context.start(mask)
    records = [(Row(logits[0]), sequence_length, count, temperature),
               *[(Row(batch, s), sequence_length, count, temperature) for s in range(3)]]
    torch.manual_seed(9)
    (got,) = context.router_terms(records)
    torch.manual_seed(9)
    picked = (torch.rand(4, num_tokens) + (mask if masked else 0)).topk(count, sorted=True).indices
    real = int(mask.sum()) if masked else num_tokens
    padding = torch.arange(count) >= real
    assert not all(torch.equal(picked[0], row) for row in picked[1:])  # independent subsets
    for m in range(4):
        if masked:  # real tokens first
            assert mask[picked[m][~padding]].all()
        groups = torch.div(picked[m], sequence_length, rounding_mode="floor").masked_fill(padding, -1)
        want = sdk.group_infonce(torch.softmax(logits[m][picked[m]], -1), groups, 3, temperature=temperature,
                                 backend=backend)
        torch.testing.assert_close(got[m], want)
    torch.manual_seed(9)
    (one_by_one,) = context.router_terms([(Row(t), sequence_length, count, temperature) for t in logits])
    assert torch.equal(one_by_one, got)


def test_a_sequence_with_one_picked_token_has_no_positive():
    fused = torch.randn(3, 4, dtype=torch.float64)
    picked = torch.tensor([0, 5, 6])  # sequences of length 5: token 0 alone in sequence 0
    _, weights = LoraMoELinear._sequence_positive(fused, picked, torch.zeros(3, dtype=torch.bool), 5, 10)
    assert weights.tolist() == [0.0, 0.5, 0.5]


def test_contrastive_mode_and_updates_are_checked():
    with pytest.raises(ValueError, match="contrastive_mode must be one of paper, sequence, router"):
        SparseDoctorConfig(contrastive_mode="batch")
    with pytest.raises(ValueError, match="contrastive_updates must be one of all, router"):
        SparseDoctorConfig(contrastive_updates="experts")
    defaults = SparseDoctorConfig.from_dict({})
    assert (defaults.contrastive_mode, defaults.contrastive_updates, defaults.contrastive_coef) == ("router", "all",
                                                                                                   0.03)


@pytest.mark.parametrize("updates", ["all", "router"])
@pytest.mark.parametrize("mode", ["paper", "sequence", "router"])
def test_every_mode_trains_the_router_through_the_term(mode, updates):
    from sparsedoctor_kernels.model import apply_sparsedoctor
    from sparsedoctor_kernels.model.tiny import tiny_qwen3

    torch.manual_seed(0)
    model = apply_sparsedoctor(tiny_qwen3(64, hidden_size=32, num_layers=1),
                               SparseDoctorConfig(num_experts=4, r=4, contrastive_tokens=64, queue_size=16,
                                                  contrastive_mode=mode, contrastive_updates=updates,
                                                  lora_dropout=0.0,
                                                  # one adapted module: no expert upstream of its router
                                                  target_modules=("down_proj",)))
    for module in model.adapted_modules().values():
        torch.nn.init.normal_(module.lora_b)
    model.train()
    ids = torch.randint(0, 64, (3, 9))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # fills the queues
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    contrastive = out.aux_losses["contrastive"]
    assert contrastive > 0
    contrastive.backward()
    modules = model.adapted_modules().values()
    assert all(m.router.grad is not None and m.router.grad.abs().sum() > 0 for m in modules)
    expert_grads = [m.lora_b.grad for m in modules]
    if mode == "router":  # routing distributions only: no heads, no experts
        assert all(m.head.weight.grad is None for m in modules)
        assert all(g is None or g.abs().sum() == 0 for g in expert_grads)
        return
    assert all(m.head.weight.grad.abs().sum() > 0 for m in modules)
    if updates == "router":  # the experts learn nothing from the term
        assert all(g is None or g.abs().sum() == 0 for g in expert_grads)
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in expert_grads)


def test_the_router_mode_needs_no_queue_and_takes_top_k_1():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseDoctorConfig(contrastive_mode="router", queue_size=0, top_k=1)
    with pytest.raises(ValueError, match="queue_size=0 leaves the contrastive term without negatives"):
        SparseDoctorConfig(contrastive_mode="sequence", queue_size=0)


@pytest.mark.parametrize("overrides", [dict(contrastive_mode="router"), dict(contrastive_mode="paper"),
                                       dict(contrastive_mode="paper", contrastive_tokens=0),
                                       dict(contrastive_mode="paper", contrastive_coef=0.0)])
def test_every_trainable_parameter_gets_a_gradient(overrides):
    """What DDP requires of a training step (it refuses unused parameters): the heads are trainable only where
    there are views to project."""
    from sparsedoctor_kernels.model import apply_sparsedoctor
    from sparsedoctor_kernels.model.tiny import tiny_qwen3

    torch.manual_seed(0)
    model = apply_sparsedoctor(tiny_qwen3(64, hidden_size=32, num_layers=1),
                               SparseDoctorConfig(num_experts=4, r=4, queue_size=16, **overrides))
    model.train()
    ids = torch.randint(0, 64, (2, 9))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)  # fills the queues (paper mode)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    heads_train = (overrides.get("contrastive_mode") == "paper" and overrides.get("contrastive_tokens", 1) > 0
                   and overrides.get("contrastive_coef", 1) > 0)
    assert all(m.head.weight.requires_grad == heads_train for m in model.adapted_modules().values())


def _tiny_model(**overrides):
    from sparsedoctor_kernels.model import apply_sparsedoctor
    from sparsedoctor_kernels.model.tiny import tiny_qwen3

    torch.manual_seed(0)
    return apply_sparsedoctor(tiny_qwen3(64, hidden_size=32, num_layers=1),
                              SparseDoctorConfig(**{"num_experts": 4, "r": 4, "queue_size": 16, "contrastive_tokens": 8,
                                                    **overrides}))


@pytest.mark.parametrize("mode", ["paper", "sequence", "router"])
def test_a_zero_weight_computes_no_contrastive_term(mode, monkeypatch):
    """Off means off: at contrastive_coef=0 no token is sampled, no view or head is computed, nothing is queued,
    and the random stream is the one of contrastive_tokens=0; contrastive_at_zero_weight asks for the term."""
    off = _tiny_model(contrastive_mode=mode, contrastive_coef=0.0)
    assert not off.sparsedoctor_config.computes_contrastive
    sampled = []
    real_pick = ForwardContext.pick
    monkeypatch.setattr(ForwardContext, "pick", lambda self, *a, **k: sampled.append(1) or real_pick(self, *a, **k))
    ids = torch.randint(0, 64, (2, 9))
    off.train()
    for _ in range(2):
        out = off(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert not sampled and out.aux_losses["contrastive"] == 0
    assert all(int(m.queue.size.sum()) == 0 and not m.head.weight.requires_grad for m in off.adapted_modules().values())
    without_tokens = _tiny_model(contrastive_mode=mode, contrastive_coef=0.0, contrastive_tokens=0)
    without_tokens.train()
    torch.manual_seed(1)
    a = off(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    torch.manual_seed(1)
    b = without_tokens(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    assert torch.equal(a, b)  # the same random draws (dropout), so the same loss to the bit

    control = _tiny_model(contrastive_mode=mode, contrastive_coef=0.0, contrastive_at_zero_weight=True)
    assert control.sparsedoctor_config.computes_contrastive
    control.train()
    for _ in range(2):
        out = control(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert sampled and out.aux_losses["contrastive"] > 0
    assert torch.equal(out.loss, out.aux_losses["lm"] + 0.01 * out.aux_losses["balance"])  # weighted 0
    if mode != "router":
        assert all(int(m.queue.size.sum()) > 0 for m in control.adapted_modules().values())


def test_a_zero_weight_costs_the_launches_of_no_term():
    from sparsedoctor_kernels.bench.layer_launches import module_forward_launches

    def launches(**overrides):
        return module_forward_launches(backend="torch", **overrides)

    plain = launches()
    for mode in ("router", "paper"):
        assert launches(contrastive_tokens=8, contrastive_mode=mode, contrastive_coef=0.0) == plain
        assert launches(contrastive_tokens=8, contrastive_mode=mode).total > plain.total


def test_contrastive_at_zero_weight_is_a_bool_and_old_adapters_keep_computing_the_term():
    from sparsedoctor_kernels.model.adapter import with_fields_added_later

    with pytest.raises(ValueError, match="contrastive_at_zero_weight must be True or False"):
        SparseDoctorConfig(contrastive_at_zero_weight=1)
    assert SparseDoctorConfig().contrastive_at_zero_weight is False
    # Written before the field existed, an adapter computed the term at weight 0: it reads so; at another weight
    # the field changes nothing and reads as today's default (so such a run resumes with today's flags).
    old = {k: v for k, v in SparseDoctorConfig(contrastive_mode="paper").to_dict().items()
           if k != "contrastive_at_zero_weight"}
    assert with_fields_added_later(old)["contrastive_at_zero_weight"] is False
    assert with_fields_added_later({**old, "contrastive_coef": 0.0})["contrastive_at_zero_weight"] is True
    assert with_fields_added_later({**old, "contrastive_at_zero_weight": False, "contrastive_coef": 0.0}) == {
        **old, "contrastive_at_zero_weight": False, "contrastive_coef": 0.0}
