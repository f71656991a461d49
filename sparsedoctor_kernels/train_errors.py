"""The errors of `sparsedoctor train`, in a module of their own so that training and run_dir can both raise
them without importing each other."""


class TrainError(ValueError):
    """A user error (settings, data, model path, output directory, resume state), said in one line."""


class NoCheckpointError(TrainError, FileNotFoundError):
    """--resume where there is no checkpoint to resume from."""
