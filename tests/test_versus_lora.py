"""The adapter against PEFT LoRA (`bench/versus_lora.py`): what it measures is measured right. Times are the
benchmark's business; bytes are not timed, so the memory goal is held here."""

import csv

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from sparsedoctor_kernels.bench import harness, versus_lora  # noqa: E402

# Issue 23's small Qwen3 (four decoder layers, hidden 512): the cost model picks the grouped strategy there.
SMALL = versus_lora.SMALL


def test_saved_bytes_count_each_storage_once_and_leave_parameters_out():
    linear = torch.nn.Linear(8, 8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = linear

        def forward(self, input_ids, **_):
            x = input_ids.float()
            y = self.linear(x)  # saves x (ours) and the weight (a parameter: left out)
            loss = (y * y).sum() + (x * x).sum()  # x saved twice more, one storage; y once
            return type("Out", (), {"loss": loss})()

    batch = {"input_ids": torch.ones(3, 8)}
    assert versus_lora.saved_bytes(Model(), batch) == 2 * 3 * 8 * 4


def _row(op, mode, **values):
    row = {c: "" for c in harness.CSV_COLUMNS}
    row.update(op=op, impl="peft" if mode == "lora" else "sparsedoctor", shape="s", mode=mode, **values)
    return row


def test_ratios_and_their_plot(tmp_path):
    """Each figure against PEFT's in its own direction (time and bytes: ours / PEFT's; decoding: tokens/s),
    with its goal; the plot holds the figures that have a goal."""
    from sparsedoctor_kernels.bench.plots import plot_versus_lora

    rows = [_row("step_vs_lora", "lora", ms_p50="100"), _row("step_vs_lora", "router", ms_p50="150"),
            _row("decode_vs_lora", "lora", tokens_per_s="80"), _row("decode_vs_lora", "router", tokens_per_s="60"),
            _row("saved_bytes", "lora", value="200"), _row("saved_bytes", "paper", value="180"),
            _row("saved_bytes_step", "lora", value="1"), _row("saved_bytes_step", "paper", value="9"),
            _row("launches", "router-fwd", value="184")]
    table = {(op, mode): (ratio, goal, better) for op, _, mode, ratio, goal, better in versus_lora.ratios(rows)}
    assert table == {("step_vs_lora", "router"): (1.5, 1.3, "<="), ("decode_vs_lora", "router"): (0.75, 0.8, ">="),
                     ("saved_bytes", "paper"): (0.9, 1.0, "<="), ("saved_bytes_step", "paper"): (9.0, None, "")}
    png = plot_versus_lora([r for r in versus_lora.ratios(rows) if r[4] is not None], tmp_path / "v.png", "cpu")
    assert png.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["router", "paper"])
def test_saved_activation_bytes_per_token_at_most_peft(mode):
    """Issue 23's memory goal: no more activation bytes per token than PEFT LoRA r16 in any contrastive mode
    (the q/k/v and gate/up siblings share one dropped-out input, and the experts keep rank-space rows)."""
    peft, _ = versus_lora.build("peft", SMALL, torch.float32, torch.device("cpu"))
    ours, _ = versus_lora.build(mode, SMALL, torch.float32, torch.device("cpu"))
    sizes = (SMALL["vocab_size"], SMALL["seq"], "cpu")
    peft_per_token, _ = versus_lora.saved_bytes_per_token(peft, *sizes)
    ours_per_token, _ = versus_lora.saved_bytes_per_token(ours, *sizes)
    assert peft_per_token > 0
    assert ours_per_token <= peft_per_token, (ours_per_token, peft_per_token)


@pytest.mark.slow
def test_the_benchmark_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "cpu.csv"
    assert versus_lora.main(["--out", str(out), "--layers", "1", "--reps", "1", "--figures", "step", "decode",
                             "--device", "cpu"]) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["op"], r["mode"]) for r in rows} == {(op, mode) for op in ("step_vs_lora", "decode_vs_lora")
                                                     for mode in ("lora", "router", "paper")}
    for row in rows:
        assert float(row["ms_p50"]) > 0 and float(row["tokens_per_s"]) > 0 and row["device"].startswith("cpu")
        assert "threads=1" in row["shape"]
    printed = capsys.readouterr().out
    assert "x PEFT" in printed and "<= 1.3" in printed and ">= 0.8" in printed
    assert list(rows[0]) == harness.CSV_COLUMNS
