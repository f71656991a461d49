"""PNG plots a person reads: the loss terms and learning rate of a training run, the expert load per layer, and
the benchmark speed-ups and times.

Each `*_figure` function builds and returns the matplotlib Figure (tests read its titles, labels and legends);
each `plot_*` function writes the PNG and closes the figure.
"""

from __future__ import annotations

import math
import pathlib

# (metrics key, panel title, y label). `loss` = lm + balance_coef * balance + contrastive_coef * contrastive.
LOSS_PANELS = [
    ("lm", "language model", "cross-entropy (nats / token)"),
    ("balance", "load balance", "E·Σ f·P  (1 = uniform routing)"),
    ("contrastive", "contrastive (InfoNCE)", "InfoNCE (nats)"),
    ("loss", "total", "lm + c_bal·balance + c_con·contrastive"),
]
LR_PANEL = ("lr", "learning rate", "learning rate")
# Held-out routing statistics (training's eval rows, sparsedoctor_kernels.measure), each over real response tokens.
SPECIALISATION_PANELS = [
    ("load_entropy", "expert load entropy (training batch)", "entropy / log E  (1 = balanced)"),
    ("eval_router_entropy", "held-out router entropy", "mean entropy / log E  (1 = uniform)"),
    ("eval_mi_domain_top1_bits", "held-out I(domain; top-1 expert)", "mutual information (bits)"),
]
SPECIALISATION_KEYS = {key for key, _, _ in SPECIALISATION_PANELS}
EVAL_KEY = "eval_loss"  # drawn on the language-model panel
# Implementations the benchmarks time for scale, not as alternatives to the op: drawn as reference lines.
REFERENCES = {"base": "base (frozen, no adapter)", "lora": "lora (plain LoRA)"}
_REFERENCE_STYLES = [("black", "--"), ("dimgrey", ":"), ("saddlebrown", "-.")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path, dpi: int) -> pathlib.Path:
    path = pathlib.Path(path)
    figure.savefig(path, dpi=dpi)
    _pyplot().close(figure)
    return path


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what exists so far)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


# --- training curves -------------------------------------------------------------------------------------------


def _series(history: list[dict], key: str) -> tuple[list, list[float], int]:
    """(steps, values) of the rows that carry `key`, in step order (a step logged twice, as after a resume,
    keeps its last row), and how many rows carried a value that is not a finite number."""
    by_step, bad = {}, 0
    for row in history:
        if key not in row or "step" not in row:
            continue
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad += 1
            continue
        by_step[row["step"]] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps], bad


def _draw_curve(axis, steps, values, color: str, name: str = "per step") -> None:
    """Raw values faint and a trailing moving average bold, the legend naming both (and the window)."""
    marker = "o" if len(steps) < 3 else None
    window = max(1, len(values) // 20)
    if window == 1:
        axis.plot(steps, values, linewidth=1.6, color=color, marker=marker, label=name)
        return
    axis.plot(steps, values, linewidth=0.8, alpha=0.35, color=color, label=name)
    axis.plot(steps, moving_average(values, window), linewidth=1.8, color=color,
              label=f"moving average ({window} steps)")


def loss_figure(history: list[dict]):
    """The figure `plot_losses` writes: one panel per loss term present in `history` (lm with the eval loss when
    rows carry `eval_loss`, balance, contrastive, total), the learning rate when rows carry `lr`, and the
    specialisation metrics when rows carry them. Each key is read only from the rows that have it."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    panels = []  # (key, title, ylabel, (steps, values, bad), the same for eval_loss on the lm panel)
    for key, title, ylabel in LOSS_PANELS + [LR_PANEL] + SPECIALISATION_PANELS:
        steps, values, bad = _series(history, key)
        eval_steps, eval_values, eval_bad = _series(history, EVAL_KEY) if key == "lm" else ([], [], 0)
        if steps or eval_steps or bad or eval_bad:
            panels.append((key, title, ylabel, (steps, values, bad), (eval_steps, eval_values, eval_bad)))
    stepless = sum("step" not in row for row in history)
    columns = 4 if len(panels) >= 7 else min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    figure = plt.figure(figsize=(4.8 * columns, 3.5 * rows), constrained_layout=True)
    if not panels:
        axis = figure.add_subplot(1, 1, 1)
        axis.text(0.5, 0.5, "no metrics rows with a step and a loss", ha="center", va="center")
        axis.set_axis_off()
    for index, (key, title, ylabel, (steps, values, bad), (eval_steps, eval_values, eval_bad)) in enumerate(panels):
        axis = figure.add_subplot(rows, columns, index + 1)
        color = "tab:green" if key == "lr" else "tab:purple" if key in SPECIALISATION_KEYS else "tab:blue"
        if steps and key == "lr":  # the schedule is exact: nothing to smooth
            axis.plot(steps, values, linewidth=1.6, color=color, marker="o" if len(steps) < 3 else None)
        elif steps:
            _draw_curve(axis, steps, values, color, name="train, per step" if eval_steps else "per step")
        if eval_steps:
            axis.plot(eval_steps, eval_values, color="tab:orange", marker="o", markersize=4, linewidth=1.4,
                      label="eval loss")
        notes = [f"{n} non-finite {k} skipped" for n, k in ((bad, key), (eval_bad, EVAL_KEY)) if n]
        axis.set_title(title + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        if key == "lr":
            axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))
        elif axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    all_steps = sorted({row["step"] for row in history if "step" in row})
    span = f"steps {all_steps[0]}–{all_steps[-1]}" if all_steps else "no steps"
    extra = f"; {stepless} rows without a 'step' not drawn" if stepless else ""
    figure.suptitle(f"SparseDoctor training ({span}{extra})")
    return figure


def plot_losses(history: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Write `loss_figure(history)` to `path` (PNG)."""
    return _save(loss_figure(history), path, dpi=120)


# --- expert load ----------------------------------------------------------------------------------------------


def expert_load_figure(load: dict[str, list[float]]):
    """Rows: layers; columns: experts; colour: the share of routed (token, slot) pairs, centred on the uniform
    share 1/E (red above, blue below). Cells are annotated only while the grid is small enough to read."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _pyplot()
    if not load:
        raise ValueError("expert load is empty: no layer to plot")
    layers = list(load)
    matrix = [list(map(float, load[layer])) for layer in layers]
    widths = {len(shares) for shares in matrix}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"expert load: every layer needs the same, non-zero number of experts; got {sorted(widths)}")
    num_experts, num_layers = widths.pop(), len(layers)
    uniform = 1 / num_experts
    peak = max(max(map(max, matrix)), 2 * uniform)
    annotate = num_experts <= 16 and num_layers <= 24
    cell = 0.55 if annotate else max(0.16, 12 / num_experts)
    figure, axis = plt.subplots(figsize=(min(18.0, 3.0 + cell * num_experts), min(14.0, 1.8 + 0.32 * num_layers)),
                                constrained_layout=True)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=peak)
    image = axis.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    x_every, y_every = math.ceil(num_experts / 32), math.ceil(num_layers / 40)
    axis.set_xticks(range(0, num_experts, x_every), [str(e) for e in range(0, num_experts, x_every)],
                    fontsize=8 if num_experts <= 32 else 6)
    axis.set_yticks(range(0, num_layers, y_every), layers[::y_every], fontsize=8 if num_layers <= 24 else 6)
    axis.set_xlabel("expert index")
    axis.set_ylabel("layer")
    axis.set_title(f"expert load: {num_layers} layers × {num_experts} experts (uniform share = {uniform:.3g})")
    if annotate:
        for row, values in enumerate(matrix):
            for column, value in enumerate(values):
                axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if abs(norm(value) - 0.5) > 0.3 else "black")
    colorbar = figure.colorbar(image, ax=axis)
    colorbar.set_label("share of routed (token, slot) pairs")
    colorbar.ax.axhline(uniform, color="black", linewidth=1.2)  # the uniform share, where the colours turn
    return figure


def plot_expert_load(load: dict[str, list[float]], path: str | pathlib.Path) -> pathlib.Path:
    """Write `expert_load_figure(load)` to `path` (PNG)."""
    return _save(expert_load_figure(load), path, dpi=120)


# --- benchmarks -----------------------------------------------------------------------------------------------


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _positive(value) -> float | None:
    number = _number(value)
    return number if math.isfinite(number) and number > 0 else None


def _size_label(row: dict) -> str:
    """The size a row was measured at (shape and T/E/k/r); the mode and dtype go in the panel title."""
    shape = row.get("shape", "")
    parts = [shape] if shape not in ("", "-", None) else []
    parts += [f"{key}={row[key]}" for key in ("T", "E", "k", "r") if row.get(key) not in ("", "-", None)]
    return " ".join(parts) or "-"


def _device_text(device: str) -> str:
    return f"CPU ({device.removeprefix('cpu-')})" if device.lower().startswith("cpu") else device


def _distinct(rows: list[dict], key: str) -> list[str]:
    return list(dict.fromkeys(str(r[key]) for r in rows if r.get(key) not in (None, "", "-")))


def runtime_device_label() -> str:
    """The GPU name (or "CPU"), torch and triton of this process: the fallback when rows name no device."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{device} · torch {torch.__version__} · triton {triton_version} (of the plotting process)"


def bench_device_label(rows: list[dict]) -> str | None:
    """"<device> · torch <v> · triton <v> · commit <c>" from the rows' environment columns (several values
    joined by " / "), or None when the rows carry no device."""
    devices = _distinct(rows, "device")
    if not devices:
        return None
    if len(devices) > 1:
        raise ValueError(f"benchmark rows come from {len(devices)} devices ({', '.join(devices)}); plot one device's "
                         "rows at a time (one results CSV per device)")
    parts = [_device_text(devices[0])]
    for key in ("torch", "triton", "commit"):
        values = _distinct(rows, key)
        parts.append(f"{key} {' / '.join(values)}" if values else f"{key} -")
    return " · ".join(parts)


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows per panel: (op, mode, dtype), in the order they first appear."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row.get("mode") or "-", row.get("dtype") or "-"), []).append(row)
    return groups


def _lookup(rows: list[dict], baseline: str | None, references) -> tuple[list[str], list[str], dict, dict]:
    """Sizes, impls (the baseline first), (impl, size) -> row, and one colour per non-reference impl, the same
    in every panel of the group."""
    sizes = list(dict.fromkeys(_size_label(r) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    impls.sort(key=lambda impl: impl != baseline)
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(i for i in impls if i not in references)}
    return sizes, impls, {(r["impl"], _size_label(r)): r for r in rows}, colors


def _bars(axis, sizes, series: dict[str, list], colors: dict, annotate: bool = False, errors: dict | None = None,
          bottom: float = 0.0) -> None:
    """Grouped bars from `bottom` (one group per size, one bar per series; None = not measured, not drawn)."""
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        drawn = [(i, v) for i, v in enumerate(values) if v is not None]
        if not drawn:
            continue
        xs, heights = [i + (index - (len(series) - 1) / 2) * width for i, _ in drawn], [v for _, v in drawn]
        yerr = None
        if errors is not None:
            yerr = [[max(0.0, h - lo) for h, (lo, _) in zip(heights, (errors[name][i] for i, _ in drawn))],
                    [max(0.0, hi - h) for h, (_, hi) in zip(heights, (errors[name][i] for i, _ in drawn))]]
        bars = axis.bar(xs, [h - bottom for h in heights], width, bottom=bottom, label=name, color=colors[name],
                        yerr=yerr, capsize=2 if yerr else 0)
        if annotate and len(sizes) * len(series) <= 48:
            axis.bar_label(bars, labels=[f"{h:.2g}×" for h in heights], fontsize=6, padding=1)
    axis.set_xticks(range(len(sizes)), sizes, rotation=20, ha="right", fontsize=7)
    axis.set_xlim(-0.6, len(sizes) - 0.4)


def _reference_lines(axis, sizes, values: dict[str, list], references: dict[str, str]) -> None:
    """One horizontal segment per size across its bar group, per reference implementation."""
    for (name, heights), (color, style) in zip(values.items(), _REFERENCE_STYLES * 3):
        label = references.get(name, name)
        for i, height in enumerate(heights):
            if height is not None:
                axis.hlines(height, i - 0.42, i + 0.42, colors=color, linestyles=style, linewidth=1.6, label=label)
                label = None  # one legend entry per reference


def _log_axis(axis, low: float, high: float, unit: str) -> None:
    """Log y axis with plain tick labels (1, 2, 5, 10, ...) and head room above the data for the legend."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_yscale("log")
    axis.set_ylim(low / 1.6, high * 6)
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}{unit}"))
    axis.yaxis.set_minor_formatter(NullFormatter())


def _speedup_panel(axis, rows, baseline: str | None, references) -> None:
    sizes, impls, index, colors = _lookup(rows, baseline, references)
    alternatives = [i for i in impls if i not in references and i != baseline]
    base_ms = [_positive(index[(baseline, s)]["ms_p50"]) if (baseline, s) in index else None for s in sizes]
    series = {}
    for impl in alternatives:
        values = []
        for size, reference_ms in zip(sizes, base_ms):
            ms = _positive(index[(impl, size)]["ms_p50"]) if (impl, size) in index else None
            values.append(reference_ms / ms if ms and reference_ms else None)
        series[impl] = values
    _bars(axis, sizes, series, colors, annotate=True, bottom=1.0)  # from 1x: a slow-down points down
    axis.set_ylabel(f"speed-up over {baseline} (×, log)")
    if baseline is None or not any(base_ms):
        axis.text(0.5, 0.5, f"no {baseline or 'baseline'} rows to compare with", transform=axis.transAxes,
                  ha="center", va="center")
    elif not any(v is not None for values in series.values() for v in values):
        axis.text(0.5, 0.5, f"no alternative to {baseline} measured", transform=axis.transAxes, ha="center",
                  va="center")
    else:
        heights = [v for values in series.values() for v in values if v is not None]
        _log_axis(axis, min(heights + [1.0]), max(heights + [1.0]), "×")
    axis.axhline(1.0, color="grey", linewidth=0.9, label=f"{baseline} (= 1×)")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=min(4, len(series) + 1), loc="upper left")


def _metric_panel(axis, rows, baseline, references, metric: str) -> bool:
    """Bars of `metric` (ms_p50 with p20-p80 whiskers, or peak_mem_mb) for the baseline and the alternatives,
    the references as lines; False when nothing was measured."""
    sizes, impls, index, colors = _lookup(rows, baseline, references)
    bars, lines, errors = {}, {}, {}
    for impl in impls:
        values = [_positive(index[(impl, s)].get(metric)) if (impl, s) in index else None for s in sizes]
        (lines if impl in references else bars)[impl] = values
        if metric == "ms_p50":
            errors[impl] = [(_number(index[(impl, s)].get("ms_p20")), _number(index[(impl, s)].get("ms_p80")))
                            if (impl, s) in index else (math.nan, math.nan) for s in sizes]
    if not any(v is not None for values in (*bars.values(), *lines.values()) for v in values):
        return False
    clean_errors = None
    if metric == "ms_p50" and all(math.isfinite(lo) and math.isfinite(hi) for e in errors.values() for lo, hi in e):
        clean_errors = errors
    _bars(axis, sizes, bars, colors, errors=clean_errors)
    _reference_lines(axis, sizes, lines, references)
    if metric == "ms_p50":
        drawn = [v for values in (*bars.values(), *lines.values()) for v in values if v is not None]
        if clean_errors:
            drawn += [hi for e in clean_errors.values() for _, hi in e]
        _log_axis(axis, min(drawn), max(drawn), "")
        axis.set_ylabel("median ms per call (log; whiskers p20–p80)")
    else:
        axis.set_ylabel("peak MB above what was held")
    axis.grid(axis="y", alpha=0.3)
    if metric != "ms_p50":
        axis.set_ylim(0, max(v for values in (*bars.values(), *lines.values()) for v in values if v) * 1.35)
    axis.legend(fontsize=7, ncol=min(4, len(bars) + len(lines)), loc="upper left")
    return True


def bench_figures(rows: list[dict], baseline: dict[str, str], device_label: str | None = None,
                  references: dict[str, str] | None = None) -> dict[str, object]:
    """{file name: Figure}: `bench_speedup.png` (per op, mode and dtype: speed-up bars of the real alternatives
    over the op's baseline, beside the median times with the references as lines) and, when memory was measured,
    `bench_memory.png`. `references` (default `REFERENCES`: base, lora) are impls timed for scale only: never
    bars of speed-up. The title names the device and versions from the rows' columns, else `device_label`,
    else this process's torch/GPU (`runtime_device_label`); an explicit `device_label` wins."""
    plt = _pyplot()
    if not rows:
        raise ValueError("no benchmark rows to plot")
    references = REFERENCES if references is None else references
    label = device_label or bench_device_label(rows) or runtime_device_label()
    on_cpu = label.lower().startswith("cpu")
    groups = _groups(rows)
    figures = {}
    speedup, axes = plt.subplots(len(groups), 2, figsize=(16, 3.8 * len(groups)), squeeze=False,
                                 constrained_layout=True)
    for (left, right), ((op, mode, dtype), group) in zip(axes, groups.items()):
        _speedup_panel(left, group, baseline.get(op), references)
        left.set_title(f"{op} · {mode} · {dtype}: speed-up over {baseline.get(op)}", fontsize=10)
        _metric_panel(right, group, baseline.get(op), references, "ms_p50")
        right.set_title(f"{op} · {mode} · {dtype}: time (lines: references)", fontsize=10)
    note = "\nCPU run: these numbers only show the suite works; the GPU numbers are the ones that count"
    speedup.suptitle(f"SparseDoctor benchmarks on {label}" + (note if on_cpu else ""))
    figures["bench_speedup.png"] = speedup
    if any(_positive(r.get("peak_mem_mb")) for r in rows):
        memory, axes = plt.subplots(len(groups), 1, figsize=(11, 3.4 * len(groups)), squeeze=False,
                                    constrained_layout=True)
        for axis, ((op, mode, dtype), group) in zip(axes[:, 0], groups.items()):
            if not _metric_panel(axis, group, baseline.get(op), references, "peak_mem_mb"):
                axis.text(0.5, 0.5, "memory not measured", transform=axis.transAxes, ha="center", va="center")
            axis.set_title(f"{op} · {mode} · {dtype}: peak memory (lines: references)", fontsize=10)
        memory.suptitle(f"SparseDoctor benchmark memory on {label}")
        figures["bench_memory.png"] = memory
    return figures


def plot_bench(rows: list[dict], baseline: dict[str, str], directory, device_label: str | None = None,
               references: dict[str, str] | None = None) -> list[pathlib.Path]:
    """Write `bench_figures(...)` into `directory`; the paths written."""
    directory = pathlib.Path(directory)
    return [_save(figure, directory / name, dpi=110)
            for name, figure in bench_figures(rows, baseline, device_label, references).items()]
