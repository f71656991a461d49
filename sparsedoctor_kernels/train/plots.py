"""PNG plots of a training run a person reads: the loss terms and learning rate, and the expert load per layer.

Each `*_figure` function builds and returns the matplotlib Figure (tests read its titles, labels and legends);
each `plot_*` function writes the PNG and closes the figure.
"""

from __future__ import annotations

import math
import pathlib

from sparsedoctor_kernels._util.plotting import pyplot, save_figure

# (metrics key, panel title, y label). `loss` = lm + balance_coef * balance + contrastive_coef * contrastive.
LOSS_PANELS = [
    ("lm", "language model", "cross-entropy (nats / token)"),
    ("balance", "load balance", "E·Σ f·P  (1 = uniform routing)"),
    ("contrastive", "contrastive (InfoNCE)", "InfoNCE (nats)"),
    ("loss", "total", "lm + c_bal·balance + c_con·contrastive"),
]
LR_PANEL = ("lr", "learning rate", "learning rate")
# Held-out routing statistics (training's eval rows, train.held_out), each over real response tokens.
SPECIALISATION_PANELS = [
    ("load_entropy", "expert load entropy (training batch)", "entropy / log E  (1 = balanced)"),
    ("eval_router_entropy", "held-out router entropy", "mean entropy / log E  (1 = uniform)"),
    ("eval_mi_domain_top1_bits", "held-out I(domain; top-1 expert)", "mutual information (bits)"),
]
SPECIALISATION_KEYS = {key for key, _, _ in SPECIALISATION_PANELS}
EVAL_KEY = "eval_loss"  # drawn on the language-model panel


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
    plt = pyplot()
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
    return save_figure(loss_figure(history), path, dpi=120)


# --- expert load ----------------------------------------------------------------------------------------------


def expert_load_figure(load: dict[str, list[float]]):
    """Rows: layers; columns: experts; colour: the share of routed (token, slot) pairs, centred on the uniform
    share 1/E (red above, blue below). Cells are annotated only while the grid is small enough to read."""
    from matplotlib.colors import TwoSlopeNorm

    plt = pyplot()
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
    return save_figure(expert_load_figure(load), path, dpi=120)
