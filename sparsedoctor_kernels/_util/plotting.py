"""matplotlib for files, shared by the training and benchmark plots: the Agg backend (no display needed) and a
save that closes the figure."""

from __future__ import annotations

import pathlib


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: matplotlib is a training extra)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path, dpi: int) -> pathlib.Path:
    """Write `figure` to `path` and close it."""
    path = pathlib.Path(path)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path
