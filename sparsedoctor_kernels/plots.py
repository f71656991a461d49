"""PNG plots of a training run: the loss terms over steps, and the expert load per layer as a heatmap."""

from __future__ import annotations

import pathlib


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what exists so far)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_losses(history: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """One panel per term (lm, balance, contrastive, total), each with its own scale: raw values faint, a
    trailing moving average bold."""
    plt = _pyplot()
    window = max(1, len(history) // 20)
    terms = [("lm", "language model"), ("balance", "load balance"), ("contrastive", "contrastive (InfoNCE)"),
             ("loss", "total")]
    steps = [row["step"] for row in history]
    figure, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.2), constrained_layout=True)
    for axis, (key, title) in zip(axes, terms):
        values = [row[key] for row in history]
        axis.plot(steps, values, linewidth=0.8, alpha=0.35, color="tab:blue")
        axis.plot(steps, moving_average(values, window), linewidth=1.8, color="tab:blue",
                  label=f"mean of {window}" if window > 1 else None)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle("SparseDoctor training losses")
    path = pathlib.Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_expert_load(load: dict[str, list[float]], path: str | pathlib.Path) -> pathlib.Path:
    """Rows: layers; columns: experts; cells: the share of routed (token, slot) pairs, annotated."""
    plt = _pyplot()
    layers = list(load)
    matrix = [load[layer] for layer in layers]
    num_experts = len(matrix[0])
    figure, axis = plt.subplots(figsize=(1.0 + 0.8 * num_experts, 1.2 + 0.45 * len(layers)), constrained_layout=True)
    image = axis.imshow(matrix, cmap="viridis", aspect="auto", vmin=0.0)
    axis.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
    axis.set_yticks(range(len(layers)), layers)
    axis.set_xlabel("expert")
    axis.set_title(f"expert load (uniform = {1 / num_experts:.3f})")
    for row, values in enumerate(matrix):
        for column, value in enumerate(values):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if value < max(map(max, matrix)) * 0.6 else "black")
    figure.colorbar(image, ax=axis, label="share of routed pairs")
    path = pathlib.Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _size_label(row: dict) -> str:
    parts = [row["shape"]] if row["shape"] not in ("", "-") else []
    parts += [f"{key}={row[key]}" for key in ("T", "E", "k", "r") if row.get(key) not in ("", "-", None)]
    if row.get("mode") and row["op"] not in ("queue", "step"):
        parts.append(row["mode"])
    return " ".join(parts)


def plot_bench(rows: list[dict], baseline: dict[str, str], directory) -> list[pathlib.Path]:
    """bench_speedup.png (speedup of each implementation over the op's baseline, per size; log scale) and,
    when memory was measured, bench_memory.png (peak MB per implementation and size)."""
    plt = _pyplot()
    directory = pathlib.Path(directory)
    ops = list(dict.fromkeys(r["op"] for r in rows))
    written = []
    for metric, filename, ylabel in (("speedup", "bench_speedup.png", "speedup over baseline (x)"),
                                     ("peak_mem_mb", "bench_memory.png", "peak memory (MB)")):
        if metric == "peak_mem_mb" and not any(_number(r["peak_mem_mb"]) > 0 for r in rows):
            continue
        figure, axes = plt.subplots(len(ops), 1, figsize=(11, 3.2 * len(ops)), squeeze=False,
                                    constrained_layout=True)
        for axis, op in zip(axes[:, 0], ops):
            mine = [r for r in rows if r["op"] == op]
            sizes = list(dict.fromkeys(_size_label(r) for r in mine))
            impls = list(dict.fromkeys(r["impl"] for r in mine))
            width = 0.8 / max(1, len(impls))
            for index, impl in enumerate(impls):
                values = []
                for size in sizes:
                    row = next((r for r in mine if r["impl"] == impl and _size_label(r) == size), None)
                    base = next((r for r in mine if r["impl"] == baseline.get(op) and _size_label(r) == size), None)
                    if row is None:
                        values.append(0.0)
                    elif metric == "speedup":
                        values.append(_number(base["ms_p50"]) / _number(row["ms_p50"]) if base else 0.0)
                    else:
                        values.append(_number(row["peak_mem_mb"]))
                axis.bar([i + index * width for i in range(len(sizes))], values, width, label=impl)
            axis.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(sizes))], sizes, rotation=20,
                            ha="right", fontsize=7)
            axis.set_title(f"{op} (baseline: {baseline.get(op)})" if metric == "speedup" else op)
            axis.set_ylabel(ylabel)
            if metric == "speedup":
                axis.set_yscale("log")
                axis.axhline(1.0, color="grey", linewidth=0.8)
            axis.legend(fontsize=7, ncol=len(impls))
        path = directory / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
