"""Kernel launches of one LoraMoELinear training forward + backward (Triton backend; the interpreter on CPU):
the host overhead a GPU waits on, measured without one. `python -m sparsedoctor_kernels.bench.launches`."""

from __future__ import annotations

import os
import sys

import torch


def layer_step(num_experts: int = 8, top_k: int = 2, rank: int = 4, tokens: int = 24, d_in: int = 32,
               d_out: int = 40, backend: str = "triton", seed: int = 0):
    """A closure running one training forward + backward of a LoraMoELinear wrapped alone (no model), with the
    contrastive term on, a quarter of the tokens padding and a queue committed once before, so every op of a
    training step runs."""
    from sparsedoctor_kernels.model import SparseDoctorConfig
    from sparsedoctor_kernels.model.layer import ForwardContext, LoraMoELinear

    torch.manual_seed(seed)
    config = SparseDoctorConfig(num_experts=num_experts, top_k=top_k, r=rank, proj_dim=16, queue_size=32,
                                contrastive_tokens=8, lora_dropout=0.0)
    context = ForwardContext()
    layer = LoraMoELinear(torch.nn.Linear(d_in, d_out), config, context).train()
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(tokens, d_in, requires_grad=True)
    real_tokens = torch.arange(tokens) < tokens - tokens // 4
    previous = os.environ.get("SPARSEDOCTOR_BACKEND")

    def step():
        os.environ["SPARSEDOCTOR_BACKEND"] = backend
        try:
            layer.commit_queue()
            context.start(real_tokens)
            out = layer(x)
            _, contrastive = context.stop()
            (out.square().mean() + sum(contrastive)).backward()
        finally:
            if previous is None:
                os.environ.pop("SPARSEDOCTOR_BACKEND", None)
            else:
                os.environ["SPARSEDOCTOR_BACKEND"] = previous

    step()  # warm: the queue holds views, lazy imports are done
    return step


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    from sparsedoctor_kernels.launches import count_launches, report

    for experts in (8, 64):
        print(f"LoraMoELinear forward + backward, training, backend triton, E={experts}:")
        print(report(count_launches(layer_step(num_experts=experts, top_k=2))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
