"""Held-out measurements of a SparseDoctor model: the LM loss of the response tokens and how its routers specialise,
in one eval-mode pass (no dropout, no contrastive sampling, the queues untouched).

`held_out_metrics(model, examples, domains, ...)` -> {"eval_lm_loss", "router_entropy", "load_entropy", "max_load",
"tokens"} plus, when every example has a domain, "mi_domain_top1_bits" and "mi_domain_top1_given_token_bits"
(`sparsedoctor_kernels.train.specialisation`), each averaged over the adapted modules; the statistics count the response
tokens only (those the LM loss is on), never the prompt or padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsedoctor_kernels.train.data import collate
from sparsedoctor_kernels.train.specialisation import SpecialisationStats, average_metrics


@torch.no_grad()
def held_out_metrics(model, examples: list, domains: list[int] | None, num_domains: int, pad_id: int, *,
                     batch_size: int = 16, device=None, bf16: bool = False) -> dict:
    """`examples`: encoded (input_ids, labels) pairs; `domains`: a domain id per example (or None)."""
    if domains is not None and len(domains) != len(examples):
        raise ValueError(f"{len(domains)} domains for {len(examples)} examples")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    modules = model.adapted_modules()
    config = next(iter(modules.values())).config
    stats = {name: SpecialisationStats(config.num_experts, num_domains if domains is not None else 1)
             for name in modules}
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    model.context.collect_routing = True
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id)
            for module in modules.values():
                module.collected_routing.clear()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device))
            logits = out.logits[:, :-1].float()
            targets = batch["labels"][:, 1:].to(device)
            total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=-100, reduction="sum"))
            total_tokens += int((targets != -100).sum())
            response = (batch["labels"] != -100).reshape(-1)
            chunk_domains = domains[start:start + batch_size] if domains is not None else [0] * len(batch["labels"])
            token_domains = torch.tensor(chunk_domains)[:, None].expand_as(batch["labels"]).reshape(-1)
            for name, module in modules.items():
                (probs, top1), = module.collected_routing
                stats[name].update(top1.cpu(), token_domains, batch["input_ids"].reshape(-1), probs.cpu(),
                                   token_mask=response)
    finally:
        model.context.collect_routing = False
        for module in modules.values():
            module.collected_routing.clear()
        model.train(was_training)
    metrics = average_metrics({name: s.result() for name, s in stats.items()})
    if domains is None:  # one pseudo-domain: the mutual informations are 0 by construction, not a measurement
        metrics = {k: v for k, v in metrics.items() if not k.startswith("mi_")}
    return {"eval_lm_loss": total_nll / max(total_tokens, 1), **metrics}
