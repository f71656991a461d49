"""PNG plots of the benchmark results: speed-ups and times per op, mode and dtype, peak memory, titled with the
device and versions the rows were measured with.
"""

from __future__ import annotations

import math
import pathlib

from sparsedoctor_kernels._util.plotting import pyplot, save_figure

# Implementations the benchmarks time for scale, not as alternatives to the op: drawn as reference lines.
REFERENCES = {"base": "base (frozen, no adapter)", "lora": "lora (plain LoRA)"}
_REFERENCE_STYLES = [("black", "--"), ("dimgrey", ":"), ("saddlebrown", "-.")]


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
    plt = pyplot()
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
    return [save_figure(figure, directory / name, dpi=110)
            for name, figure in bench_figures(rows, baseline, device_label, references).items()]


def plot_versus_lora(table: list[list], path, device_label: str) -> pathlib.Path:
    """`versus_lora.png`: each figure of `bench.versus_lora.ratios` as a bar of ours / PEFT LoRA's (1 = PEFT's),
    one colour per contrastive mode, its goal a marker on the bar (lower is better except for decoding)."""
    plt = pyplot()
    if not table:
        raise ValueError("no versus_lora rows to plot")
    labels = list(dict.fromkeys(f"{op}\n{shape}" for op, shape, *_ in table))
    modes = list(dict.fromkeys(row[2] for row in table))
    figure, axis = plt.subplots(figsize=(max(8, 1.6 * len(labels) * len(modes)), 4.5), constrained_layout=True)
    width = 0.8 / len(modes)
    labelled = set()
    for op, shape, mode, ratio, goal, _ in table:
        index = modes.index(mode)
        x = labels.index(f"{op}\n{shape}") + (index - (len(modes) - 1) / 2) * width
        axis.bar(x, ratio, width, color=f"C{index}", label=None if mode in labelled else mode)
        labelled.add(mode)
        axis.text(x, ratio, f"{ratio:.2f}", ha="center", va="bottom", fontsize=7)
        if goal is not None:
            axis.plot([x - width / 2, x + width / 2], [goal, goal], color="black", linewidth=2)
    axis.axhline(1.0, color="dimgrey", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_ylabel("ours / PEFT LoRA r16 (black: goal)")
    axis.set_ylim(0, max(max(row[3] for row in table), 1.0) * 1.12)
    axis.legend(fontsize=8, title="contrastive mode")
    axis.set_title(f"SparseDoctor against PEFT LoRA r16 on {device_label} (decode: higher is better; the rest: "
                   "lower)", fontsize=10)
    return save_figure(figure, path, dpi=110)
