"""`sparsedoctor demo`: train a SparseDoctor adapter on a tiny random Qwen3 with the bundled Chinese medical QA
set, show the loss terms falling, save the adapter, reload it into a fresh model and check it gives the same
logits, print the expert load and write the plots."""

from __future__ import annotations

import pathlib
import time

import torch

from sparsedoctor_kernels.data import demo_records, write_jsonl
from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor, load_adapter
from sparsedoctor_kernels.training import TrainSettings, check_output_dir, collate, encode, load_base, train

# Sized for two CPU cores: about a second a step. The method's structure is the default's, at toy sizes.
DEMO_ADAPTER = SparseDoctorConfig(num_experts=8, top_k=2, r=8, lora_alpha=16, proj_dim=32, queue_size=256,
                                  balance_coef=0.1, contrastive_tokens=64)


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def run_demo(output_dir: str = "sparsedoctor-demo", steps: int = 100, device: str | None = None,
             progress: bool = True, log=print) -> int:
    began = time.perf_counter()
    output = pathlib.Path(output_dir)
    # The demo owns its directory and is meant to be run again and again: each run starts over in it.
    check_output_dir(output)
    again = (output / "demo_data.jsonl").exists()
    log(f"sparsedoctor demo: {'starting over' if again else 'writing'} in {output}/"
        + (" (the previous demo run there is replaced)" if again else ""))
    data_path = write_jsonl(demo_records(), output / "demo_data.jsonl")
    log(f"bundled data: {data_path} ({len(demo_records())} Chinese medical QA records)")
    settings = TrainSettings(output_dir=str(output), data=[str(data_path)], steps=steps, batch_size=8,
                             learning_rate=1e-2, warmup_steps=10, max_length=80, device=device,
                             save_every=max(1, steps // 2), overwrite=True, progress=progress,
                             adapter=DEMO_ADAPTER)
    result = train(settings, log=log)
    window = max(1, min(10, steps // 4))
    first, last = result.history[:window], result.history[-window:]
    log(f"\nloss terms, mean of the first and last {window} steps:")
    log(f"{'term':<12}{'first':>10}{'last':>10}")
    for key in ("lm", "balance", "contrastive", "loss"):
        log(f"{key:<12}{_mean(first, key):>10.4f}{_mean(last, key):>10.4f}")
    log("(balance is 1.0 for perfectly even routing and E at worst; it starts even and balance_coef bounds it)")

    # Reload the saved adapter into a fresh model and compare logits on a few examples.
    trained = result.model.eval()
    records = demo_records()[:4]
    base, _ = load_base(settings, demo_records())
    fresh = apply_sparsedoctor(base, DEMO_ADAPTER).to(next(trained.parameters()).device).eval()
    load_adapter(fresh, output / "adapter")
    batch = {k: v.to(next(trained.parameters()).device)
             for k, v in collate(encode(records, result.tokenizer, settings.max_length),
                                 result.tokenizer.pad_token_id).items()}
    with torch.no_grad():
        same = torch.equal(trained(**batch).logits, fresh(**batch).logits)
    log(f"\nadapter reloaded from {output / 'adapter'}: logits {'identical' if same else 'DIFFERENT'}")

    log("\nexpert load (share of routed pairs per expert, all steps):")
    for layer, shares in result.expert_load.items():
        log(f"  {layer:<9}" + " ".join(f"{s:5.2f}" for s in shares))
    log(f"\nplots: {output / 'loss.png'}, {output / 'expert_load.png'}")
    log(f"demo finished in {time.perf_counter() - began:.0f} s")
    return 0 if same else 1
