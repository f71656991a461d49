"""The SparseDoctor layer on a tiny random Qwen3 (CPU): the public API, equivalence with a layer written from
the naive loop, the fused backends, checkpointing, adapters and Trainer."""

import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import sparsedoctor_kernels as sdk  # noqa: E402
from sparsedoctor_kernels.model import (  # noqa: E402
    LoraMoELinear,
    SparseDoctorConfig,
    apply_sparsedoctor,
    load_adapter,
    save_adapter,
)
from sparsedoctor_kernels.model.tiny import tiny_qwen3  # noqa: E402
from sparsedoctor_kernels.testing import baselines  # noqa: E402

from conftest import cpu_backends  # noqa: E402

# The paper mode by default here: it exercises every piece (the two views, the heads, the queue and its
# staging); the tests that matter for every mode take `contrastive_mode` (the library's default is "router").
SMALL = dict(num_experts=4, top_k=2, r=4, lora_alpha=8, proj_dim=16, queue_size=32, contrastive_tokens=8,
             contrastive_mode="paper")


def make_model(seed=0, num_layers=2, **overrides):
    """The same base and the same adapter initialisation for the same seed."""
    base = tiny_qwen3(seed=seed, num_layers=num_layers)
    torch.manual_seed(seed)
    return apply_sparsedoctor(base, SparseDoctorConfig(**{**SMALL, **overrides}))


def batch(seed=0, batch_size=2, length=12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (batch_size, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, length - 4:] = 0  # right padding in the last row
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def train_steps(model, steps, seed=0, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    history = []
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        out = model(**batch(seed=seed))  # one batch, memorised: the loss must fall
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({k: float(v.detach()) for k, v in out.aux_losses.items()})
    return history


def perturb_lora_b(model, seed=1):
    """Nonzero experts, so that the delta (and every gradient path) is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.adapted_modules().values():
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=gen) * 0.05)


def test_config_defaults_and_validation():
    config = SparseDoctorConfig()
    assert (config.num_experts, config.top_k, config.r, config.lora_alpha, config.lora_dropout) == (8, 2, 16, 32, 0.05)
    assert config.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (config.proj_dim, config.queue_size, config.temperature) == (64, 1024, 0.07)
    assert (config.balance_coef, config.contrastive_coef, config.contrastive_tokens) == (0.01, 0.03, 256)
    assert (config.contrastive_mode, config.contrastive_updates) == ("router", "all")
    # Each mode's measured weight when none is given; a given one (0 included) is kept.
    assert SparseDoctorConfig(contrastive_mode="paper").contrastive_coef == 0.1
    assert SparseDoctorConfig(contrastive_mode="sequence").contrastive_coef == 0.1
    assert SparseDoctorConfig(contrastive_mode="paper", contrastive_coef=0.0).contrastive_coef == 0.0
    assert config.scaling == 2.0
    assert SparseDoctorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="top_k"):
        SparseDoctorConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="lora_dropout"):
        SparseDoctorConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="unknown SparseDoctorConfig fields"):
        SparseDoctorConfig.from_dict({"experts": 3})


@pytest.mark.parametrize("field, value", [("lora_dropout", "0.05"), ("temperature", float("nan")),
                                          ("lora_alpha", None), ("balance_coef", True),
                                          ("target_modules", "q_proj"), ("r", 4.0)])
def test_config_rejects_wrong_types_naming_the_field(field, value):
    """A wrong type read from JSON is a ValueError naming the field, not a TypeError from a comparison (and a
    bare string is not taken for a tuple of one-letter module names)."""
    with pytest.raises(ValueError, match=f"SparseDoctorConfig.{field} must be"):
        SparseDoctorConfig(**{field: value})
    with pytest.raises(ValueError, match="a dict of fields, got list"):
        SparseDoctorConfig.from_dict([])


def test_wrapping_freezes_the_base_and_adapts_every_target():
    model = make_model()
    adapted = model.adapted_modules()
    assert len(adapted) == 2 * 7  # two decoder layers, seven projections each
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".head." in n or n.rsplit(".", 1)[-1] in ("router", "lora_a", "lora_b") for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n or "embed" in n)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        apply_sparsedoctor(tiny_qwen3(), SparseDoctorConfig(target_modules=("nothing",)))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_identical_logits_to_the_base_model_at_initialisation(mode):
    inputs = batch()
    base = tiny_qwen3(seed=3)
    with torch.no_grad():
        expected = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    model = apply_sparsedoctor(base, SparseDoctorConfig(**SMALL))
    getattr(model, mode)()
    with torch.no_grad():
        got = model(**inputs).logits
    assert torch.equal(got, expected)


def test_output_carries_every_loss_term_and_the_hybrid_sum():
    model = make_model(contrastive_coef=0.3, balance_coef=0.2)
    perturb_lora_b(model)
    model.train()
    out = model(**batch())
    assert set(out.aux_losses) == {"lm", "balance", "contrastive"}
    lm, balance, contrastive = (out.aux_losses[k] for k in ("lm", "balance", "contrastive"))
    assert balance > 0 and lm > 0
    torch.testing.assert_close(out.loss, lm + 0.2 * balance + 0.3 * contrastive)
    model.eval()
    out = model(**batch())
    assert out.aux_losses["contrastive"] == 0  # eval: no contrastive term
    assert model(input_ids=batch()["input_ids"]).loss is None  # no labels, no loss


def naive_layer_forward(module: LoraMoELinear, x):
    """The layer written the obvious way: torch softmax/top-k and the per-expert loop."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax((flat @ module.router.T).float(), dim=-1)
    top, experts = probs.topk(module.config.top_k, dim=-1)
    weights = top / top.sum(-1, keepdim=True)
    delta = baselines.naive_lora_moe(flat, module.lora_a, module.lora_b, weights, experts, module.config.scaling)
    return (module.base(flat) + delta).reshape(*x.shape[:-1], -1)


def test_layer_matches_the_naive_loop_with_gradients():
    model = make_model(lora_dropout=0.0)
    perturb_lora_b(model)
    module = model.adapted_modules()["model.layers.0.mlp.up_proj"]
    module.eval()
    x = torch.randn(3, 5, module.base.in_features, requires_grad=True)
    got = module(x)
    want = naive_layer_forward(module, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    params = [x, module.router, module.lora_a, module.lora_b]
    grads = torch.autograd.grad(got.square().sum(), params)
    expected = torch.autograd.grad(want.square().sum(), params)
    for name, g, e in zip(("x", "router", "lora_a", "lora_b"), grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif("triton" not in cpu_backends("lora_moe"), reason="Triton cannot run here")
@pytest.mark.parametrize("mode", ["paper", "router"])
@pytest.mark.slow
def test_triton_backends_give_the_reference_model(monkeypatch, mode):
    """The whole model on the Triton kernels (interpreter) against the torch reference ops: same loss terms
    and adapter gradients, and the same queues after a step."""
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SPARSEDOCTOR_BACKEND", backend)
        # The interpreter is slow: one decoder layer.
        model = make_model(lora_dropout=0.0, num_layers=1, contrastive_mode=mode)
        perturb_lora_b(model)
        model.train()
        torch.manual_seed(0)
        model(**batch(seed=5))  # stages views
        out = model(**batch(seed=6))  # commits them, then computes the contrastive term against them
        out.loss.backward()
        # The router mode uses no projection heads: they get no gradient there.
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        assert all(".head." in n for n, p in model.named_parameters() if p.requires_grad and n not in grads)
        queues = {n: m.queue.keys.clone() for n, m in model.adapted_modules().items()}
        results[backend] = (out, grads, queues)
    (ref, ref_grads, ref_queues), (got, got_grads, got_queues) = results["torch"], results["triton"]
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-4, atol=1e-4)
    for key in ("lm", "balance", "contrastive"):
        torch.testing.assert_close(got.aux_losses[key], ref.aux_losses[key], rtol=1e-4, atol=1e-5)
    assert ref.aux_losses["contrastive"] > 0
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name in ref_queues:
        torch.testing.assert_close(got_queues[name], ref_queues[name], rtol=1e-5, atol=1e-6)


def test_queues_fill_with_normalised_views_of_real_tokens_only():
    model = make_model(contrastive_tokens=100)  # more than the batch: every real token is picked
    perturb_lora_b(model)
    model.train()
    inputs = batch()
    model(**inputs)
    module = model.adapted_modules()["model.layers.1.self_attn.o_proj"]
    assert module.queue.size.sum() == 0  # staged, not yet committed
    model.commit_queues()
    real_tokens = int(inputs["attention_mask"].sum())
    assert int(module.queue.size.sum()) == min(real_tokens, 4 * 32)
    stored = module.queue.keys[0, : int(module.queue.size[0])]
    torch.testing.assert_close(stored.norm(dim=-1), torch.ones(len(stored)))
    model.eval()
    before = module.queue.keys.clone()
    model(**inputs)
    model.commit_queues()
    assert torch.equal(module.queue.keys, before)  # eval never stages


@pytest.mark.parametrize("mode", ["paper", "router"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    grads = []
    for checkpointing in (False, True):
        model = make_model(contrastive_mode=mode)
        perturb_lora_b(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        torch.manual_seed(11)  # dropout and the contrastive subsets draw from it
        model(**batch(seed=1))
        out = model(**batch(seed=2))
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        staged = [len(m._staged) for m in model.adapted_modules().values()]
        # The recomputation staged nothing twice (the router mode stages nothing: it has no queue).
        assert staged == [1 if mode == "paper" else 0] * len(staged)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_adapter_round_trip(tmp_path):
    model = make_model()
    train_steps(model, 3)
    model.eval()
    inputs = batch(seed=9)
    with torch.no_grad():
        expected = model(**inputs).logits
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    described = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert described["sparsedoctor"]["num_experts"] == 4 and len(described["modules"]) == 14

    fresh = make_model()
    load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)
    for name, module in model.adapted_modules().items():
        other = fresh.adapted_modules()[name]
        for buffer in ("keys", "ptr", "size"):
            assert torch.equal(getattr(other.queue, buffer), getattr(module.queue, buffer))
    assert int(next(iter(fresh.adapted_modules().values())).queue.size.sum()) > 0


def test_load_adapter_refuses_pickles_and_mismatches(tmp_path):
    model = make_model()
    save_adapter(model, tmp_path / "ok")
    with pytest.raises(ValueError, match="does not match the model's: num_experts: adapter 4 vs model 3"):
        load_adapter(make_model(num_experts=3), tmp_path / "ok")
    with pytest.raises(ValueError, match="other modules or sizes"):
        load_adapter(make_model(num_layers=1), tmp_path / "ok")
    (tmp_path / "ok" / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="refusing to load .* pickle files"):
        load_adapter(model, tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        (tmp_path / "empty").mkdir()
        load_adapter(model, tmp_path / "empty")


def test_training_lowers_the_loss():
    history = train_steps(make_model(), 12)
    assert history[-1]["lm"] < history[0]["lm"] - 0.5
    assert all(h["contrastive"] >= 0 for h in history)


def test_transformers_trainer_runs_a_few_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {k: v[0] for k, v in batch(seed=index, batch_size=1).items()}

    model = make_model()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, gradient_checkpointing=True)
    trainer = Trainer(model=model, args=args, train_dataset=Samples())
    result = trainer.train()
    assert result.global_step == 3 and result.training_loss > 0
    assert any(float(m.lora_b.detach().abs().sum()) > 0 for m in model.adapted_modules().values())


def test_public_ops_only():
    """The model layer reaches kernels only through the package's public names."""
    import pathlib

    source = "\n".join(p.read_text() for p in pathlib.Path(sdk.__file__).parent.joinpath("model").glob("*.py"))
    for private in ("sparsedoctor_kernels.ops", "sparsedoctor_kernels.triton", "sparsedoctor_kernels.reference",
                    "sparsedoctor_kernels.cuda", "_C"):
        assert private not in source


@pytest.mark.parametrize("mode", ["paper", "router"])
def test_bf16_autocast_training_step(mode):
    model = make_model(contrastive_mode=mode)
    perturb_lora_b(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch(seed=1))  # fills the queues (the first forward has no negatives yet)
        out = model(**batch())
    out.loss.backward()
    module = next(iter(model.adapted_modules().values()))
    assert module.lora_a.grad.dtype == torch.float32 and torch.isfinite(module.lora_a.grad).all()
    assert torch.isfinite(out.loss) and out.aux_losses["contrastive"] > 0
    if mode == "paper":
        # The head computes in bf16 under autocast; the views are staged in the float32 queue's dtype.
        assert module._staged and all(keys.dtype == torch.float32 for keys, _ in module._staged)
        model.commit_queues()
        assert module.queue.keys.dtype == torch.float32 and int(module.queue.size.sum()) > 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch())
    assert torch.isfinite(out.loss) and out.aux_losses["contrastive"] == 0


def cast_model_step(dtype, **overrides):
    """A training step (stage, then commit and contrast against the queue) on a model cast to `dtype`."""
    model = make_model(**overrides)
    perturb_lora_b(model)
    model.to(dtype)
    model.train()
    torch.manual_seed(0)  # dropout and the contrastive subsets draw from it
    model(**batch(seed=1))
    out = model(**batch())
    out.loss.backward()
    return model, out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_cast_to_another_dtype_trains_and_evaluates(dtype):
    """`.to(dtype)` casts the adapter with the base: router, experts, head and queue all follow (the torch
    backend runs bf16 on CPU; the Triton interpreter has no bf16)."""
    model, out = cast_model_step(dtype)
    module = next(iter(model.adapted_modules().values()))
    assert module.head.weight.dtype == module.queue.keys.dtype == dtype
    assert int(module.queue.size.sum()) > 0 and all(keys.dtype == dtype for keys, _ in module._staged)
    for param in (module.router, module.lora_a, module.lora_b, module.head.weight):
        assert param.grad.dtype == dtype and torch.isfinite(param.grad).all()
    assert torch.isfinite(out.loss) and out.aux_losses["contrastive"] > 0 and out.aux_losses["balance"] > 0
    model.commit_queues()
    model.eval()
    with torch.no_grad():
        out = model(**batch())
    assert out.logits.dtype == dtype and torch.isfinite(out.loss) and out.aux_losses["contrastive"] == 0


@pytest.mark.parametrize("mode", ["paper", "router"])
def test_a_float64_model_computes_the_float32_losses(mode):
    """Casting changes the precision, not the computation: same routing, subsets and losses."""
    _, want = cast_model_step(torch.float32, lora_dropout=0.0, contrastive_mode=mode)
    _, got = cast_model_step(torch.float64, lora_dropout=0.0, contrastive_mode=mode)
    assert got.aux_losses["balance"].dtype == got.aux_losses["contrastive"].dtype == torch.float64
    for key in ("lm", "balance", "contrastive"):
        torch.testing.assert_close(got.aux_losses[key].float(), want.aux_losses[key], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("triton" not in cpu_backends("lora_moe"), reason="Triton cannot run here")
@pytest.mark.slow
def test_fused_and_reference_training_curves_agree(monkeypatch):
    """A few optimizer steps on the Triton kernels (interpreter) follow the torch reference's curve."""
    curves = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SPARSEDOCTOR_BACKEND", backend)
        model = make_model(num_layers=1, lora_dropout=0.0, target_modules=("q_proj", "down_proj"))
        curves[backend] = train_steps(model, 4)
    for ref, got in zip(curves["torch"], curves["triton"]):
        for key in ("lm", "balance", "contrastive"):
            assert got[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-4), key
    assert curves["torch"][-1]["lm"] < curves["torch"][0]["lm"]


def test_a_contrastive_term_without_a_queue_is_refused_and_top1_warns():
    with pytest.raises(ValueError, match="queue_size=0 leaves the contrastive term without negatives"):
        SparseDoctorConfig(queue_size=0, contrastive_mode="paper")
    SparseDoctorConfig(queue_size=0, contrastive_mode="paper", contrastive_coef=0.0)  # the term is off
    SparseDoctorConfig(queue_size=0, contrastive_mode="paper", contrastive_tokens=0)
    with pytest.warns(UserWarning, match="top_k=1: the routed and fused views"):
        SparseDoctorConfig(top_k=1, contrastive_mode="paper")
    # The default (router) mode contrasts routing distributions in the batch: no queue, any top_k.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseDoctorConfig(queue_size=0, top_k=1)


@pytest.mark.parametrize("field", ["balance_coef", "contrastive_coef"])
def test_negative_loss_weights_are_refused(field):
    with pytest.raises(ValueError, match=f"{field} must be >= 0"):
        SparseDoctorConfig(**{field: -1.0})


def test_dropout_once_per_shared_input():
    """q/k/v read one tensor and gate/up another: each shared input is dropped out once (one mask, one copy
    kept for the backward), so a decoder layer draws four masks for its seven projections, and siblings feed
    their experts the same dropped rows."""
    from sparsedoctor_kernels.launches import count_launches

    model = make_model(num_layers=1, lora_dropout=0.3, contrastive_mode="router").train()
    counts = count_launches(lambda: model(**batch()))  # grouped siblings: one dropout per group
    assert sum(v for k, v in counts.items() if "bernoulli" in k or "native_dropout" in k) == 4, counts
    model.group_siblings(False)  # each projection's own call, watched below
    adapter_inputs = {}

    def recorder(module, projection):
        def record(x, *args, **kwargs):
            adapter_inputs[projection] = x
            return type(module)._experts(module, x, *args, **kwargs)

        return record

    for name, module in model.adapted_modules().items():
        module._experts = recorder(module, name.rsplit(".", 1)[-1])
    model.train()
    counts = count_launches(lambda: model(**batch()))
    masks = sum(v for k, v in counts.items() if "bernoulli" in k or "native_dropout" in k)
    assert masks == 4, counts
    assert adapter_inputs["q_proj"] is adapter_inputs["k_proj"] is adapter_inputs["v_proj"]
    assert adapter_inputs["gate_proj"] is adapter_inputs["up_proj"]
    assert adapter_inputs["o_proj"] is not adapter_inputs["q_proj"]
    dropped = adapter_inputs["q_proj"]
    assert 0 < (dropped == 0).float().mean() < 0.6  # dropped out, at about the rate asked


@pytest.mark.slow
def test_generation_with_a_static_cache_and_under_torch_compile():
    """Greedy decoding through the adapters (the ops' calls without autograd) gives the same tokens with
    the dynamic cache, a static cache, and the forward compiled by torch.compile over the static cache."""
    model = make_model(num_layers=2)
    perturb_lora_b(model, seed=3)
    model.eval()
    ids = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(4))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    dynamic = model.generate(input_ids=ids, **settings)
    assert dynamic.shape == (2, 14)
    assert torch.equal(model.generate(input_ids=ids, cache_implementation="static", **settings), dynamic)
    model.forward = torch.compile(model.forward, backend="aot_eager", dynamic=False)
    assert torch.equal(model.generate(input_ids=ids, cache_implementation="static", **settings), dynamic)


def test_a_forward_without_labels_in_eval_computes_the_output_alone():
    """Generation's forwards (eval, no grad, no labels) route and apply the experts in one fused call and skip
    the balance term; with labels the same forward records it. The logits agree either way."""
    model = make_model(num_layers=1)
    perturb_lora_b(model)
    model.eval()
    inputs = batch(seed=5)
    with torch.no_grad():
        plain = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        scored = model(**inputs)
    assert float(plain.aux_losses["balance"]) == 0.0 and float(scored.aux_losses["balance"]) > 0.0
    torch.testing.assert_close(plain.logits, scored.logits, rtol=1e-5, atol=1e-5)
    calls = []
    original = sdk.routed_lora_moe
    try:
        sdk.routed_lora_moe = lambda *a, **k: calls.append(1) or original(*a, **k)
        with torch.no_grad():
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    finally:
        sdk.routed_lora_moe = original
    assert len(calls) == len(model.adapted_modules())


def test_balance_loss_of_all_modules_is_the_mean_of_the_ops():
    """The wrapper's one expression for every module's balance term equals the mean of sdk.load_balance_loss."""
    from sparsedoctor_kernels.model.loss import balance_loss

    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(20, generator=gen) > 0.3
    routings = [sdk.route(torch.randn(20, 6, generator=gen, requires_grad=True), 2, token_mask=mask)
                for _ in range(5)]
    real = mask.sum()
    shared = balance_loss([(r.counts, r.probs_mean, real) for r in routings], top_k=2)
    expected = torch.stack([sdk.load_balance_loss(r, num_tokens=real) for r in routings]).mean()
    torch.testing.assert_close(shared, expected)
    per_module_tokens = [(r.counts, r.probs_mean, t) for r, t in zip(routings, (real, 20, 0, real, 7))]
    expected = torch.stack([sdk.load_balance_loss(r, num_tokens=t)
                            for r, t in zip(routings, (real, 20, 0, real, 7))]).mean()
    torch.testing.assert_close(balance_loss(per_module_tokens, top_k=2), expected)
    assert balance_loss([], top_k=2) == 0
