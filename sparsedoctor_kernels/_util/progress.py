"""One progress bar for every long loop (training, encoding, evaluation, ablation): tqdm when shown, else the
iterable itself."""

from __future__ import annotations


def progress(iterable, enabled: bool, desc: str, unit: str = "it", total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, dynamic_ncols=True)
