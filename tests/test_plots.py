"""The plots carry what a reader needs (y labels, legends naming raw vs averaged values, the learning rate, the
device and versions, speed-ups against real alternatives only), read from the matplotlib figures rather than by
comparing images; each `plot_*` writes a PNG."""

import math

import pytest
import torch

from sparsedoctor_kernels._util.plotting import pyplot
from sparsedoctor_kernels.bench import harness
from sparsedoctor_kernels.bench import plots as bench_plots
from sparsedoctor_kernels.train import plots

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    pyplot().close("all")


def _train_row(step):
    lm = 3.0 - 0.02 * step
    return {"step": step, "loss": lm + 0.01 + 0.1 * 2.0, "lm": lm, "balance": 1.0 + 0.01 * (step % 3),
            "contrastive": 2.0 - 0.01 * step, "lr": 1e-4 * min(1.0, step / 10), "seconds": 0.1}


def _panels(figure):
    """Panel title (first line) -> axis, for the axes that have a title."""
    return {axis.get_title().split("\n")[0]: axis for axis in figure.axes if axis.get_title()}


def _legend(axis):
    legend = axis.get_legend()
    return [text.get_text() for text in legend.get_texts()] if legend else []


def test_loss_figure_labels_legends_lr_and_interleaved_eval_rows():
    history = []
    for step in range(1, 61):
        history.append(_train_row(step))
        if step % 20 == 0:  # an eval row carries the step and eval_loss only
            history.append({"step": step, "eval_loss": 2.5 - step / 100})
    panels = _panels(plots.loss_figure(history))
    assert set(panels) == {"language model", "load balance", "contrastive (InfoNCE)", "total", "learning rate"}
    lm = panels["language model"]
    assert "nats" in lm.get_ylabel()
    assert _legend(lm) == ["train, per step", "moving average (3 steps)", "eval loss"]
    (raw, _, eval_line) = lm.get_lines()
    assert list(raw.get_xdata()) == list(range(1, 61))  # the eval rows did not break the training series
    assert list(eval_line.get_xdata()) == [20, 40, 60]
    assert list(eval_line.get_ydata()) == pytest.approx([2.3, 2.1, 1.9])
    for title in ("load balance", "contrastive (InfoNCE)", "total"):
        assert panels[title].get_ylabel() and _legend(panels[title]) == ["per step", "moving average (3 steps)"]
    lr = panels["learning rate"]
    assert lr.get_ylabel() == "learning rate"
    assert list(lr.get_lines()[0].get_ydata()) == pytest.approx([row["lr"] for row in history if "lr" in row])


def test_loss_figure_tolerates_missing_keys_single_rows_and_adds_specialisation_panels(tmp_path):
    single = plots.loss_figure([{"step": 1, "lm": 2.0, "loss": 2.1}])
    panels = _panels(single)
    assert set(panels) == {"language model", "total"}  # absent keys: no panel
    assert _legend(panels["language model"]) == ["per step"]
    history = [_train_row(1), {"step": 2, "lm": 2.9}, {"step": 2, "eval_loss": 2.8},
               {"step": 3, "lm": float("nan"), "eval_router_entropy": 0.5, "eval_mi_domain_top1_bits": 0.2},
               {"step": 4, "eval_router_entropy": 0.4, "eval_mi_domain_top1_bits": 0.4}, {"note": "no step"}]
    figure = plots.loss_figure(history)
    panels = _panels(figure)
    assert {"held-out router entropy", "held-out I(domain; top-1 expert)"} <= set(panels)
    assert "bits" in panels["held-out I(domain; top-1 expert)"].get_ylabel()
    assert list(panels["held-out router entropy"].get_lines()[0].get_ydata()) == [0.5, 0.4]
    lm = panels["language model"]
    assert "1 non-finite lm skipped" in lm.get_title() and list(lm.get_lines()[0].get_xdata()) == [1, 2]
    assert "1 rows without a 'step' not drawn" in figure._suptitle.get_text()
    assert plots.plot_losses(history, tmp_path / "loss.png").read_bytes()[:8] == PNG
    assert plots.plot_losses([], tmp_path / "empty.png").read_bytes()[:8] == PNG


def test_expert_load_small_grid_is_annotated_and_large_grid_stays_readable(tmp_path):
    small = {f"layer {i}": [0.5, 0.3, 0.2] for i in range(2)}
    figure = plots.expert_load_figure(small)
    heatmap, colorbar = figure.axes
    assert heatmap.get_xlabel() == "expert index" and heatmap.get_ylabel() == "layer"
    assert "share of routed" in colorbar.get_ylabel()
    assert sorted(t.get_text() for t in heatmap.texts) == sorted(["0.50", "0.30", "0.20"] * 2)
    generator = torch.Generator().manual_seed(0)
    big = {f"layer {i}": torch.rand(64, generator=generator).softmax(0).tolist() for i in range(36)}
    figure = plots.expert_load_figure(big)
    heatmap = figure.axes[0]
    assert not heatmap.texts  # 2,304 numbers would be unreadable
    width, height = figure.get_size_inches()
    assert width <= 18 and height <= 14
    assert 8 <= len(heatmap.get_xticks()) <= 32 and len(heatmap.get_yticks()) == 36
    assert "36 layers × 64 experts" in heatmap.get_title()
    assert plots.plot_expert_load(big, tmp_path / "load.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="same, non-zero number of experts"):
        plots.expert_load_figure({"layer 0": [1.0], "layer 1": [0.5, 0.5]})


def _bench_row(op, impl, ms, T=256, mode="full", device="NVIDIA H200", peak="nan", **extra):
    row = {column: "" for column in harness.CSV_COLUMNS}
    row.update(op=op, impl=impl, shape="gate_proj", T=str(T), E="8", k="2", r="16", dtype="bfloat16", mode=mode,
               ms_p20=str(ms * 0.9), ms_p50=str(ms), ms_p80=str(ms * 1.1), peak_mem_mb=peak, device=device,
               torch="2.13.0", triton="3.5.0", commit="abc1234", **extra)
    return row


def _bench_rows(**kwargs):
    times = {"naive": 10.0, "torch": 4.0, "triton": 1.0, "dense": 20.0, "base": 0.01, "lora": 0.5}
    return [_bench_row("lora_moe", impl, ms * T / 256, T=T, **kwargs) for T in (256, 1024)
            for impl, ms in times.items()]


def _bar_heights(axis):
    return [patch.get_y() + patch.get_height() for patch in axis.patches]  # speed-up bars start at 1x


def test_bench_speedups_are_against_real_alternatives_and_name_the_device(tmp_path):
    figures = bench_plots.bench_figures(_bench_rows(), {"lora_moe": "naive"})
    figure = figures["bench_speedup.png"]
    title = figure._suptitle.get_text()
    assert "NVIDIA H200" in title and "torch 2.13.0" in title and "triton 3.5.0" in title and "CPU run" not in title
    speedup, times = figure.axes
    assert "speed-up over naive" in speedup.get_ylabel()
    bars = [text for text in _legend(speedup) if not text.startswith("naive")]
    assert bars == ["torch", "triton", "dense"]  # base and lora are never speed-up bars
    assert sorted(_bar_heights(speedup)) == pytest.approx([0.5, 0.5, 2.5, 2.5, 10.0, 10.0])
    assert all(patch.get_y() == 1.0 for patch in speedup.patches)  # a slow-down points down from 1x
    assert max(_bar_heights(speedup)) < 100  # the frozen layer alone would read 1000x
    assert {bench_plots.REFERENCES["base"], bench_plots.REFERENCES["lora"]} <= set(_legend(times))
    base_line = next(c for c in times.collections if c.get_label() == bench_plots.REFERENCES["base"])
    assert base_line.get_segments()[0][0][1] == pytest.approx(0.01)  # the time of base alone, as a line
    assert "bench_memory.png" not in figures  # no memory measured (CPU rows hold NaN)
    written = bench_plots.plot_bench(_bench_rows(peak="12.5"), {"lora_moe": "naive"}, tmp_path)
    assert [path.name for path in written] == ["bench_speedup.png", "bench_memory.png"]
    assert all(path.read_bytes()[:8] == PNG for path in written)


def test_bench_device_label_falls_back_and_rejects_mixed_devices():
    rows = _bench_rows(device="cpu-x86_64")
    title = bench_plots.bench_figures(rows, {"lora_moe": "naive"})["bench_speedup.png"]._suptitle.get_text()
    assert "CPU (x86_64)" in title and "CPU run" in title
    unnamed = _bench_rows(device="")
    label = bench_plots.bench_figures(unnamed, {"lora_moe": "naive"}, device_label="my box")["bench_speedup.png"]
    assert "my box" in label._suptitle.get_text()
    runtime = bench_plots.bench_figures(unnamed, {"lora_moe": "naive"})["bench_speedup.png"]._suptitle.get_text()
    assert f"torch {torch.__version__}" in runtime
    with pytest.raises(ValueError, match="2 devices"):
        bench_plots.bench_figures(_bench_rows() + _bench_rows(device="NVIDIA H100"), {"lora_moe": "naive"})


def test_bench_single_row_and_missing_baseline_do_not_plot_zero_bars(tmp_path):
    (written,) = bench_plots.plot_bench([_bench_row("queue", "torch", 2.0, mode="fwd")], {"queue": "naive"}, tmp_path)
    assert written.read_bytes()[:8] == PNG
    rows = [_bench_row("step", impl, ms, mode="full") for impl, ms in (("base", 1.0), ("sparsedoctor", 3.0))]
    rows.append(_bench_row("step", "naive", 9.0, T=512))  # the baseline at another size only
    speedup, times = bench_plots.bench_figures(rows, {"step": "naive"})["bench_speedup.png"].axes
    heights = _bar_heights(speedup)
    assert all(math.isfinite(h) and h > 0 for h in heights) and not heights  # nothing to compare at T=256
    assert len(_bar_heights(times)) == 2  # sparsedoctor at T=256, naive at T=512; base is a line
