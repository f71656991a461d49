"""Kernel launches of one LoraMoELinear training forward + backward (Triton backend; the interpreter on CPU):
the host overhead a GPU waits on, measured without one. `python -m sparsedoctor_kernels.bench.layer_launches`.

Three figures per E: the module's forward without the contrastive term (the frozen GEMM and the per-forward
constants every module shares, such as the real-token count, left out), the contrastive term's extra launches,
and a whole training step (queue commit, forward with the contrastive term, backward). Then what the adapter adds
to a whole Qwen3 decoder layer (seven adapted projections), forward and backward, for E in {4, 16, 64}."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparsedoctor_kernels.launches import LaunchCounts

# The frozen layer's own GEMM (nn.Linear with a bias): one launch of every module forward that is not the adapter's.
FROZEN_GEMM = "aten.addmm"


@contextlib.contextmanager
def _backend(backend: str):
    previous = os.environ.get("SPARSEDOCTOR_BACKEND")
    os.environ["SPARSEDOCTOR_BACKEND"] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SPARSEDOCTOR_BACKEND", None)
        else:
            os.environ["SPARSEDOCTOR_BACKEND"] = previous


def _layer(num_experts, top_k, rank, d_in, d_out, contrastive_tokens, seed, contrastive_mode, contrastive_coef=None):
    from sparsedoctor_kernels.model import SparseDoctorConfig
    from sparsedoctor_kernels.model.layer import ForwardContext, LoraMoELinear

    torch.manual_seed(seed)
    config = SparseDoctorConfig(num_experts=num_experts, top_k=top_k, r=rank, proj_dim=16, queue_size=32,
                                contrastive_tokens=contrastive_tokens, lora_dropout=0.0,
                                contrastive_mode=contrastive_mode, contrastive_coef=contrastive_coef)
    context = ForwardContext()
    layer = LoraMoELinear(torch.nn.Linear(d_in, d_out), config, context).train()
    with torch.no_grad():
        layer.lora_b.normal_()
    return layer, context


def layer_step(num_experts: int = 8, top_k: int = 2, rank: int = 4, tokens: int = 24, d_in: int = 32,
               d_out: int = 40, backend: str = "triton", seed: int = 0, contrastive_mode: str = "router"):
    """A closure running one training forward + backward of a LoraMoELinear wrapped alone (no model), with the
    contrastive term on, a quarter of the tokens padding and a queue committed once before, so every op of a
    training step runs."""
    layer, context = _layer(num_experts, top_k, rank, d_in, d_out, 8, seed, contrastive_mode)
    x = torch.randn(tokens, d_in, requires_grad=True)
    real_tokens = torch.arange(tokens) < tokens - tokens // 4

    def step():
        with _backend(backend):
            layer.commit_queue()
            context.start(real_tokens)
            out = layer(x)
            _, contrastive = context.stop()
            (out.square().mean() + sum(term.sum() for term in contrastive)).backward()

    step()  # warm: the queue holds views, lazy imports are done
    return step


def layer_forward(num_experts: int = 8, top_k: int = 2, rank: int = 4, tokens: int = 24, d_in: int = 32,
                  d_out: int = 40, backend: str = "triton", contrastive_tokens: int = 0, seed: int = 0,
                  contrastive_mode: str = "router", contrastive_coef: float | None = None):
    """A closure running one training-mode forward of a LoraMoELinear (balance loss recorded, a quarter of the
    tokens padding), after the context's per-forward constants are made: what one module adds to a model's
    forward."""
    layer, context = _layer(num_experts, top_k, rank, d_in, d_out, contrastive_tokens, seed, contrastive_mode,
                            contrastive_coef)
    x = torch.randn(tokens, d_in)
    real_tokens = torch.arange(tokens) < tokens - tokens // 4

    def forward():
        with _backend(backend):
            layer(x)
            context.stop()

    def prepared():
        with _backend(backend):
            layer.commit_queue()
            context.start(real_tokens)
            if contrastive_tokens:
                context.picked_weights(tokens, min(contrastive_tokens, tokens), x.device)
        return forward

    with torch.no_grad():  # warm: a queue to contrast against, lazy imports done
        layer.commit_queue()
        context.start(real_tokens)
        layer(x)
        context.stop()
    return prepared


def module_forward_launches(**kwargs):
    """Launches of one module's training forward, without the frozen GEMM and the shared per-forward constants."""
    from sparsedoctor_kernels.launches import count_launches

    prepare = layer_forward(**kwargs)
    counts = count_launches(prepare())
    counts[FROZEN_GEMM] -= 1
    if counts[FROZEN_GEMM] <= 0:
        del counts[FROZEN_GEMM]
    return counts


def _forward_and_backward_launches(model, ids, mask) -> tuple[int, int]:
    from sparsedoctor_kernels.launches import count_launches

    # A training step starts from no gradients (optimizers' zero_grad sets them to None): the backward assigns
    # each parameter's gradient rather than adding into the last step's (one launch a parameter).
    model.zero_grad(set_to_none=True)
    losses = []
    forward = count_launches(lambda: losses.append(model(input_ids=ids, attention_mask=mask, labels=ids).loss))
    backward = count_launches(lambda: losses[0].backward())
    return forward.total, backward.total


def decoder_layer_launches(num_experts: int = 4, top_k: int = 2, rank: int = 16, backend: str = "triton",
                           contrastive_mode: str = "router", batch: int = 2, sequence: int = 16,
                           hidden_size: int = 64, layers: int = 1, queue_size: int | None = None) -> tuple[int, int]:
    """(forward, backward) launches the adapter adds to a `layers`-layer tiny Qwen3 in training: the model with
    all seven projections of each layer adapted (the library's default adapter but E, k, r and, when given,
    queue_size) minus the same frozen model without adapters, both with the token embedding trainable so that
    the backward crosses every layer, from no gradients as a training step starts (before 2026-12-07 the model
    without adapters was left trainable and gradients were added into the last step's, which put the backward
    figures a few launches a layer off). Everything the adapter costs counts, the model's per-forward constants
    (real-token mask, the router term of all modules at once, the loss's sums) included: with one layer, what
    issue 23 counts per decoder layer."""
    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor
    from sparsedoctor_kernels.model.tiny import tiny_qwen3

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (batch, sequence))
    mask = torch.ones_like(ids)
    queue = {} if queue_size is None else {"queue_size": queue_size}
    adapter = SparseDoctorConfig(num_experts=num_experts, top_k=top_k, r=rank, contrastive_mode=contrastive_mode,
                                 **queue)
    bases = [tiny_qwen3(128, hidden_size=hidden_size, num_layers=layers) for _ in range(2)]
    models = {"base": bases[0], "adapted": apply_sparsedoctor(bases[1], adapter)}  # wrapping freezes its base
    bases[0].requires_grad_(False)  # frozen as the wrapper froze the other's (its adapters stay trainable)
    for base in bases:  # the embedding trainable in both, so that the backward crosses every layer
        base.get_input_embeddings().weight.requires_grad_(True)
    counts = {}
    with _backend(backend):
        for name, model in models.items():
            model.train()
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()  # warm: queues, lazy imports
            counts[name] = _forward_and_backward_launches(model, ids, mask)
    return tuple(adapted - base for adapted, base in zip(counts["adapted"], counts["base"]))


def each_layer_and_per_forward_launches(num_experts: int = 4, **kwargs) -> tuple[tuple[int, int], tuple[int, int]]:
    """((forward, backward) launches the adapter adds with each further decoder layer, (forward, backward) it
    adds once per model forward whatever the layers): the slope and intercept between one and two layers."""
    one, two = (decoder_layer_launches(num_experts, layers=layers, **kwargs) for layers in (1, 2))
    each = tuple(b - a for a, b in zip(one, two))
    return each, tuple(a - e for a, e in zip(one, each))


def _decode_step_launches(model, prompt) -> LaunchCounts:
    """Launches of one greedy decoding step (one new token, the prompt's KV cache), grad mode off."""
    from sparsedoctor_kernels.launches import count_launches

    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        new_token = prompt[:, -1:]
        return count_launches(lambda: model(input_ids=new_token, past_key_values=cache, use_cache=True))


def decode_layer_launches(num_experts: int = 4, top_k: int = 2, rank: int = 16, backend: str = "triton",
                          hidden_size: int = 64, prompt_tokens: int = 8) -> tuple[int, int]:
    """(launches the adapter adds to one Qwen3 decoder layer at a decoding step of one token, launches of the
    frozen decoder layer itself): one-layer tiny Qwen3s with and without the library's default adapter (but E,
    k, r), and a zero-layer one for the base layer's own, eval mode, batch 1."""
    from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor
    from sparsedoctor_kernels.model.tiny import tiny_qwen3

    torch.manual_seed(0)
    prompt = torch.randint(0, 128, (1, prompt_tokens))
    adapter = SparseDoctorConfig(num_experts=num_experts, top_k=top_k, r=rank)
    models = {"empty": tiny_qwen3(128, hidden_size=hidden_size, num_layers=0),
              "base": tiny_qwen3(128, hidden_size=hidden_size, num_layers=1),
              "adapted": apply_sparsedoctor(tiny_qwen3(128, hidden_size=hidden_size, num_layers=1), adapter)}
    counts = {}
    with _backend(backend):
        for name, model in models.items():
            model.eval()
            _decode_step_launches(model, prompt)  # warm: lazy imports, compiled kernels
            counts[name] = _decode_step_launches(model, prompt).total
    return counts["adapted"] - counts["base"], counts["base"] - counts["empty"]


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    from sparsedoctor_kernels.launches import count_launches, report

    for experts in (8, 32, 64):
        print(f"E={experts}, k=2, backend triton, a quarter of the tokens padding:")
        plain = module_forward_launches(num_experts=experts)
        print(f"  module forward, no contrastive term (frozen GEMM excluded): {report(plain, top=0)}")
        for mode in ("router", "paper"):  # the default, and the paper's two views with the queue
            contrastive = module_forward_launches(num_experts=experts, contrastive_tokens=8, contrastive_mode=mode)
            print(f"  {mode} mode: the contrastive term adds {contrastive.total - plain.total} launches; "
                  f"training step (commit + forward + backward): "
                  f"{report(count_launches(layer_step(num_experts=experts, top_k=2, contrastive_mode=mode)))}")
    print("\nadapter launches per Qwen3 decoder layer, training (all seven projections adapted, k=2, r=16, "
          "the model minus the same model without adapters):")
    print("one-layer model: each decoder layer's own + the per-forward constants")
    print("| E | mode | backend | forward | backward |\n| --- | --- | --- | --- | --- |")
    for experts in (4, 16, 64):
        for mode in ("router", "paper"):
            for backend in ("triton", "torch"):
                each, once = each_layer_and_per_forward_launches(experts, contrastive_mode=mode, backend=backend)
                print(f"| {experts} | {mode} | {backend} | {each[0] + once[0]} ({each[0]} + {once[0]}) | "
                      f"{each[1] + once[1]} ({each[1]} + {once[1]}) |")
    print("\nat a decoding step (one token, batch 1, KV cache): the adapter's launches per decoder layer against "
          "the frozen layer's own:")
    print("| E | backend | adapter | frozen layer |\n| --- | --- | --- | --- |")
    for experts in (4, 16, 64):
        for backend in ("triton", "torch"):
            adapter, layer = decode_layer_launches(experts, backend=backend)
            print(f"| {experts} | {backend} | {adapter} | {layer} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
