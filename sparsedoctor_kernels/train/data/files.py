"""Data files: JSON Lines (one record a line) or one JSON array of records. The kind is read from the file, not
its name: a file whose first non-space character is `[` is a JSON array (Hugging Face's `to_json` writes JSON
Lines under a `.json` name, so the name cannot decide), except a `.jsonl` file whose first line is a whole JSON
value on its own: that is JSON Lines whose first record is an array, and is refused by line. Every error names the
file and line (and, in an array, the element's index) in one line."""

from __future__ import annotations

import json
import pathlib

from sparsedoctor_kernels.train.data.formats import DataError, json_kind, to_conversation

UTF8_BOM = b"\xef\xbb\xbf"
JSON_SPACE = " \t\r\n"


class SourcedRecord(dict):
    """A record as read from a file; `source` ('file:line') lets a later error (a chat template's) name it."""

    source: str = ""


def _open(path: pathlib.Path):
    try:
        return path.open("rb")  # bytes, so that a decoding error can name its line
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not a data file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None


def _decode(raw: bytes, path: pathlib.Path, first_line: int = 1) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + raw.count(b"\n", 0, error.start)
        column = error.start - raw.rfind(b"\n", 0, error.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x} at column {column})") from None


def _text_lines(path: pathlib.Path):
    """(line number, text) of a UTF-8 file. A BOM at the start is dropped (editors on Windows write one); bytes
    that are not UTF-8, and a file that cannot be read, raise DataError naming the file (and line)."""
    with _open(path) as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            yield number, _decode(raw, path, number)


def iter_jsonl(path: str | pathlib.Path):
    """(line number, object) for every non-empty line; malformed JSON, bytes that are not UTF-8 and an unreadable
    file raise DataError naming the file (and line). A leading UTF-8 BOM is accepted."""
    path = pathlib.Path(path)
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: malformed JSON ({error.msg})") from None


def is_json_array(path: str | pathlib.Path) -> bool:
    """Whether the file is one JSON array (see the module's docstring) rather than JSON Lines."""
    path = pathlib.Path(path)
    for _, line in _text_lines(path):
        stripped = line.lstrip(JSON_SPACE)
        if not stripped:
            continue
        if not stripped.startswith("["):
            return False
        if path.suffix.lower() != ".jsonl":
            return True
        try:
            json.loads(line)
        except json.JSONDecodeError:
            return True  # a pretty-printed array
        return False
    return False


def iter_json_array(path: str | pathlib.Path):
    """(line number, element index, element) for each element of a file that is one JSON array; the line is the
    one where the element begins."""
    path = pathlib.Path(path)
    with _open(path) as handle:
        raw = handle.read()
    text = _decode(raw[len(UTF8_BOM):] if raw.startswith(UTF8_BOM) else raw, path)
    decoder, size = json.JSONDecoder(), len(text)

    def skip_space(position: int) -> int:
        while position < size and text[position] in JSON_SPACE:
            position += 1
        return position

    def malformed(position: int, why: str) -> DataError:
        line = text.count("\n", 0, position) + 1
        return DataError(f"{path}:{line}: malformed JSON ({why})")

    position = skip_space(0)
    if not text.startswith("[", position):
        raise malformed(position, "expected a JSON array of records")
    position = skip_space(position + 1)
    if position < size and text[position] == "]":
        position += 1
    else:
        index, line, counted = 0, 1, 0
        while True:
            line += text.count("\n", counted, position)
            counted = position
            try:
                element, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
            yield line, index, element
            position = skip_space(position)
            if position >= size:
                raise malformed(position, "the array is not closed with ']'")
            if text[position] == "]":
                position += 1
                break
            if text[position] != ",":
                raise malformed(position, f"expected ',' or ']' after element {index}")
            position, index = skip_space(position + 1), index + 1
    if skip_space(position) < size:
        raise malformed(skip_space(position), "text after the array's closing ']'")


def iter_records(path: str | pathlib.Path):
    """(where, object) for each record of a JSON Lines or JSON array file; `where` is 'file:line' (and, in an
    array, ': element N'), what an error about the record starts with."""
    path = pathlib.Path(path)
    if is_json_array(path):
        for line, index, element in iter_json_array(path):
            yield f"{path}:{line}: element {index}", element
    else:
        for number, record in iter_jsonl(path):
            yield f"{path}:{number}", record


def read_records(path: str | pathlib.Path) -> list[SourcedRecord]:
    """The records of a data file, each checked to be one of the formats in `formats`; DataError names the file
    and line of the first bad one, the format keys it expected and the keys it found."""
    array = is_json_array(path)
    records = []
    for where, record in iter_records(path):
        if not isinstance(record, dict):
            hint = "" if array or not isinstance(record, list) else \
                "; a file that is one JSON array of records must not be named .jsonl"
            raise DataError(f"{where}: expected a JSON object (one record {'an element' if array else 'a line'}), "
                            f"got {json_kind(record)}{hint}")
        try:
            to_conversation(record)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
        record = SourcedRecord(record)
        record.source = where
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def write_jsonl(records: list[dict], path: str | pathlib.Path) -> pathlib.Path:
    """Atomically (readers see the old file or the new one, never half of one)."""
    from sparsedoctor_kernels._util.files import write_atomically

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path
