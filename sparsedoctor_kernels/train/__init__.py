"""The training application behind `sparsedoctor train`: `settings` (TrainSettings, their checks and config files,
TrainError), `loop` (train), `run_dir` and `checkpoints` (the run directory, resume), `metrics`, `held_out` and
`specialisation` (what a run logs), `loading` (base models and tokenizers), `data` (record formats, rendering,
the bundled demo set) and `plots`.

    from sparsedoctor_kernels.train import TrainSettings, train

Those names are imported on first use, so that `import sparsedoctor_kernels.train.settings` (the command line's
help) does not import the loop and everything under it."""

_LAZY = {"train": "loop", "TrainResult": "loop", "TrainSettings": "settings", "TrainError": "settings"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
