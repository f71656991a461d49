"""`sparsedoctor demo`: train a SparseDoctor adapter on a tiny random Qwen3 with the bundled Chinese medical QA
set, show the loss terms falling, save the adapter, reload it into a fresh model and check it gives the same
logits, print the expert load and write the plots."""

from __future__ import annotations

import json
import os
import pathlib
import time

import torch

from sparsedoctor_kernels.model import SparseDoctorConfig, apply_sparsedoctor, load_adapter
from sparsedoctor_kernels.train.data import collate, demo_records, encode, write_jsonl
from sparsedoctor_kernels.train.loop import load_base, pick_device, train
from sparsedoctor_kernels.train.run_dir import RUN_FILE, check_output_dir, run_entries
from sparsedoctor_kernels.train.settings import TrainError, TrainSettings, validate_settings

# Sized for two CPU cores: about a second a step. The method's structure is the default's, at toy sizes.
DEMO_ADAPTER = SparseDoctorConfig(num_experts=8, top_k=2, r=8, lora_alpha=16, proj_dim=32, queue_size=256,
                                  balance_coef=0.1, contrastive_tokens=64)


def _holds_a_demo(output: pathlib.Path, data_path: pathlib.Path) -> bool:
    """A previous demo: its demo_data.jsonl, and a run_config.json whose data is that file."""
    if not data_path.is_file() or not (output / RUN_FILE).is_file():
        return False
    try:
        data = json.loads((output / RUN_FILE).read_text(encoding="utf-8")).get("data")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return (isinstance(data, list) and len(data) == 1 and isinstance(data[0], str)
            and os.path.abspath(data[0]) == os.path.abspath(data_path))


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def run_demo(output_dir: str = "sparsedoctor-demo", steps: int = 100, device: str | None = None,
             progress: bool = True, log=print) -> int:
    began = time.perf_counter()
    output = pathlib.Path(output_dir)
    data_path = output / "demo_data.jsonl"
    # The demo is meant to be run again and again: it starts over in a directory holding a previous demo (or
    # nothing of a run), and refuses any other run's directory. Everything is checked before anything is written.
    # 1e-2, fifty times the LoRA-scale default: a random tiny model must show its loss falling within 100 steps.
    settings = TrainSettings(output_dir=str(output), data=[str(data_path)], steps=steps, batch_size=8,
                             learning_rate=1e-2, warmup_steps=10, max_length=80, device=device,
                             save_every=max(1, steps // 2) if isinstance(steps, int) else 0,
                             progress=progress, adapter=DEMO_ADAPTER)
    validate_settings(settings)
    pick_device(device)
    check_output_dir(output)
    again = _holds_a_demo(output, data_path)
    if not again and run_entries(output):
        names = ", ".join(p.name for p in run_entries(output)[:6])
        raise TrainError(f"--output-dir {output} holds a run that is not a previous demo ({names}); the demo "
                         "starts over only in its own directory: choose another --output-dir")
    settings.overwrite = again
    log(f"sparsedoctor demo: {'starting over' if again else 'writing'} in {output}/"
        + (" (the previous demo run there is replaced)" if again else ""))
    write_jsonl(demo_records(), data_path)
    log(f"bundled data: {data_path} ({len(demo_records())} Chinese medical QA records)")
    result = train(settings, log=log)
    window = max(1, min(10, steps // 4))
    first, last = result.history[:window], result.history[-window:]
    log(f"\nloss terms, mean of the first and last {window} steps:")
    log(f"{'term':<12}{'first':>10}{'last':>10}")
    for key in ("lm", "balance", "contrastive", "loss"):
        log(f"{key:<12}{_mean(first, key):>10.4f}{_mean(last, key):>10.4f}")
    log("(lm should fall: the adapter learns the data. balance is 1.0 for perfectly even routing and E at worst;\n"
        " it starts even and may rise a little as experts specialise, balance_coef bounds it. contrastive is a\n"
        " regulariser on the routing, not a target: it need not fall. loss = lm + the weighted terms.)")

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
