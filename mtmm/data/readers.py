"""Manifest files -> lists of records (dicts), each remembering the file and line it came from for error messages.

A file is read whole and checked as it is parsed, so that input which would otherwise be misread in silence
stops with its file, line, column and value: text that is not UTF-8, a quote left open (it would swallow the
following lines into one cell), a row with more or fewer cells than the header, a column named twice.
"""

import csv
import io
import json
import logging
from pathlib import Path

from mtmm.errors import UserError

log = logging.getLogger(__name__)

LINE = "_line"  # key added to every record: its (first) line number in the file (1-based)
FILE = "_file"  # key added to every record: the file it came from
HIDDEN = (LINE, FILE)  # bookkeeping keys, not columns of the file
CONTEXT = 40  # characters of a faulty cell quoted in a message


def read_manifest(path: Path) -> list[dict]:
    """A JSONL (.jsonl/.json), CSV (.csv) or TSV (.tsv/.tab) manifest; the format follows the suffix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        records = read_jsonl(path)
    elif suffix in (".csv", ".tsv", ".tab"):
        records = read_table(path, delimiter="," if suffix == ".csv" else "\t")
    else:
        raise UserError(f"manifest {path}: unknown format {suffix!r}; use .jsonl, .csv or .tsv")
    if not records:
        raise UserError(f"manifest {path} holds no samples")
    for record in records:
        record[FILE] = path
    return records


def read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without the byte-order mark Excel writes (it must not end up in the
    first column's name)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(not_utf8(path, data, error)) from None


def not_utf8(path: Path, data: bytes, error: UnicodeDecodeError) -> str:
    """Where the first undecodable byte is, as a line and a position in it (a byte offset is hard to find)."""
    line = data.count(b"\n", 0, error.start) + 1
    position = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    bad = data[error.start: error.end]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        hint = "it looks like UTF-16 (Excel's 'Unicode Text'); save it as 'CSV UTF-8' or UTF-8 text"
    else:
        hint = "save it as UTF-8 (Excel: 'CSV UTF-8')"
    return (f"{path}, line {line}: not UTF-8 text (byte {bad.hex(' ', 1)} at position {position} of the line: "
            f"{error.reason}); {hint}")


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line; blank lines are skipped, a malformed line is an error naming file and line."""
    records = []
    # StringIO splits lines as reading the file did (\n, \r\n, \r); str.splitlines would also split at
    # characters such as U+2028 that JSON strings may hold.
    for number, line in enumerate(io.StringIO(read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}, line {number}: not valid JSON ({error.msg}): {line.strip()[:80]!r}") from None
        except DuplicateKey as error:
            raise UserError(f"{path}, line {number}: key {error.args[0]!r} appears twice in one object (JSON keeps "
                            f"only the last one); remove or rename one") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {number}: expected a JSON object, got {line.strip()[:80]!r}")
        record[LINE] = number
        records.append(record)
    return records


class DuplicateKey(Exception):
    """A JSON object names a key twice (json.loads would silently keep the last value)."""


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return record


def read_table(path: Path, delimiter: str) -> list[dict]:
    """CSV/TSV with a header row; empty cells become None (no label / absent modality), blank lines are skipped.
    Every row must have exactly the header's number of cells."""
    # Lines split as the csv module splits them (\n, \r\n, \r), for messages about where a row starts.
    lines = io.StringIO(read_text(path), newline="").readlines()
    # strict: a quote left open fails at the end of the file, and one closed in the middle of a cell fails
    # there, instead of the lines in between silently becoming one cell.
    rows = csv.reader(lines, delimiter=delimiter, strict=True)
    header: list[str] | None = None
    records, merged, start = [], [], 1  # start: the line the next row begins on
    while True:
        try:
            cells = next(rows, None)
        except csv.Error as error:
            raise UserError(unreadable_row(path, lines, start, delimiter, header, error)) from None
        if cells is None:
            break
        if any(cell.strip() for cell in cells):
            if header is None:
                header = check_header(path, start, cells)
            else:
                if len(cells) != len(header):
                    raise UserError(wrong_cell_count(path, start, cells, header, delimiter))
                if rows.line_num > start and looks_merged(lines[start - 1: rows.line_num], len(header), delimiter):
                    merged.append(start)
                record = {name: (cell if cell != "" else None) for name, cell in zip(header, cells)}
                record[LINE] = start
                records.append(record)
        start = rows.line_num + 1
    if merged:
        log.warning("%s, line %d: a quoted cell runs over several lines, each of which would be a whole row by "
                    "itself: if its opening quote is a stray one, rows were merged into one (%d such row(s); "
                    "the lines are read as one multi-line cell)", path, merged[0], len(merged))
    return records


def looks_merged(lines: list[str], columns: int, delimiter: str) -> bool:
    """A row over several lines is valid CSV (a quoted cell with line breaks), but when every one of those lines
    alone has the header's number of cells, a stray quote that closes further down is the likelier reading."""
    return columns > 1 and all(len(line.split(delimiter)) == columns for line in lines)


def check_header(path: Path, line: int, names: list[str]) -> list[str]:
    """A column named twice would leave one of them unreadable (a dict keeps the last)."""
    first: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if name in first:
            raise UserError(f"{path}, line {line}: the header names column {name!r} twice (columns {first[name]} "
                            f"and {number}); rename one")
        first[name] = number
    return names


def wrong_cell_count(path: Path, line: int, cells: list[str], header: list[str], delimiter: str) -> str:
    message = f"{path}, line {line}: {len(cells)} cells but the header has {len(header)} columns"
    # A quoted cell running over several lines is valid CSV, but with a wrong count it is most likely a quote
    # left open that swallowed the lines after it.
    for index, cell in enumerate(cells):
        if "\n" in cell or "\r" in cell:
            opened = line + sum(line_breaks(earlier) for earlier in cells[:index])
            return (f"{message}; the quoted cell in {column_name(header, index)} opens on line {opened} and runs "
                    f"on to line {opened + line_breaks(cell)}: is a quote left open there? ({clip(cell)!r})")
    if len(cells) > len(header):
        return f"{message}; quote cells that contain {delimiter_name(delimiter)}"
    return f"{message}; every row needs all {len(header)} cells (empty ones as empty cells)"


def unreadable_row(path: Path, lines: list[str], start: int, delimiter: str, header: list[str] | None,
                   error: csv.Error) -> str:
    """The csv module's error says only where it gave up; name the line and column where the faulty quote opens."""
    rest = "".join(lines[start - 1:])
    found = faulty_quote(rest, delimiter)
    if found is None:
        return f"{path}, line {start}: cannot be read as {delimiter_name(delimiter)}-separated text ({error})"
    position, index, closed = found
    line = start + line_breaks(rest[:position])
    value = clip(rest[position:].splitlines()[0])
    if closed is None:
        problem = "is never closed, so every later line would be read into this cell"
    else:
        problem = f"closes on line {start + closed} with more text after it instead of {delimiter_name(delimiter)}"
    return (f"{path}, line {line}, {column_name(header, index)}: the quote that opens the cell {value!r} {problem}; "
            f"close it, or write a quote inside a quoted cell as two (\"\")")


def faulty_quote(rest: str, delimiter: str) -> tuple[int, int, int | None] | None:
    """In the text from a row's first line on: (position, cell index) of the quote that opens a cell and is never
    closed or is closed with more text after it, and the line (counted from the row's first) where it closes,
    None if never; None when the row has no such quote. The rules are the csv module's (strict, default dialect)."""
    line = cell = 0
    i, at_cell_start = 0, True
    while i < len(rest):
        char = rest[i]
        if char == '"' and at_cell_start:
            opened = i
            i += 1
            while True:  # inside the quotes: "" is a literal quote
                close = rest.find('"', i)
                if close < 0:
                    return opened, cell, None
                line += line_breaks(rest[i:close])
                if rest.startswith('""', close):
                    i = close + 2
                    continue
                i = close + 1
                break
            if i < len(rest) and rest[i] not in (delimiter, "\r", "\n"):
                return opened, cell, line
            at_cell_start = False
            continue
        if char == delimiter:
            cell, at_cell_start = cell + 1, True
        elif char in "\r\n":
            return None  # the row ended without a faulty quote
        else:
            at_cell_start = False
        i += 1
    return None


def line_breaks(text: str) -> int:
    """Line breaks as the csv module counts them: \n, \r\n and a lone \r."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def column_name(header: list[str] | None, index: int) -> str:
    if header is not None and index < len(header):
        return f"column {header[index]!r}"
    return f"column {index + 1}"


def delimiter_name(delimiter: str) -> str:
    return {",": "comma", "\t": "tab"}.get(delimiter, repr(delimiter))


def clip(text: str) -> str:
    return text if len(text) <= CONTEXT else text[:CONTEXT] + "..."


def columns_of(records: list[dict]) -> set[str]:
    """The column names the records have (without the bookkeeping keys)."""
    return set().union(*(record.keys() for record in records)) - set(HIDDEN)


def source_of(records: list[dict], fallback: str = "the training split") -> str:
    """The file the records came from, for messages; `fallback` when they came from several (or none is known)."""
    files = {record.get(FILE) for record in records}
    return str(files.pop()) if len(files) == 1 and None not in files else fallback
