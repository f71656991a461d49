"""File handling of `sparsedoctor eval`: reading UTF-8 text with errors that name the file and line, and an
output directory checked before any work (writes go through `sparsedoctor_kernels._util.files`)."""

from __future__ import annotations

import contextlib
import pathlib
import tempfile

from sparsedoctor_kernels.eval.items import EvalDataError


def read_text(path, flag: str = "") -> str:
    """The file's text; a UTF-8 BOM is dropped (Windows tools write one). Errors name the file (and the flag
    that gave it, when known) and, for bytes that are not UTF-8, the line."""
    path = pathlib.Path(path)
    named = f"{flag} {path}" if flag else str(path)
    if not path.exists():
        raise EvalDataError(f"{named} does not exist")
    if not path.is_file():
        raise EvalDataError(f"{named} is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise EvalDataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                            f"save it as UTF-8") from None


def _prepare_output_dir(path: pathlib.Path) -> None:
    if path.exists() and not path.is_dir():
        raise EvalDataError(f"--output-dir {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Probe with a real file: os.access says yes to root on read-only directories and mounts.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise EvalDataError(f"--output-dir {path}: cannot write there ({error.strerror or error})") from None


@contextlib.contextmanager
def output_directory(path):
    """Create and probe the output directory before any work, so a bad --output-dir fails at once rather than
    after the whole run; if the run then fails, a directory created here and still empty is removed again."""
    path = pathlib.Path(path)
    created = not path.exists()
    _prepare_output_dir(path)
    try:
        yield path
    except BaseException:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise
