"""File writes shared by the commands: a text file is replaced whole or not at all."""

from __future__ import annotations

import os
import pathlib

PARTIAL = ".partial"  # the suffix of a file being written by write_atomically


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Write `text` to `path` through `<path>.partial` (synced, then renamed), so readers see the old file or
    the new one, never half of one; a failed write leaves no partial file. An ordinary open gives the file the
    umask's permissions."""
    path = pathlib.Path(path)
    partial = path.with_name(path.name + PARTIAL)
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
