"""The manifest: a CSV table with one row per DICOM file or series folder.

Each row names a path (relative to the manifest, confined to the allowed folders), a label and a
patient, and optionally a split. Rows are checked one by one with Python's ``csv`` module, so
that every problem names its line: a bad row becomes a :class:`Problem`, a bad table a
:class:`ManifestError`. Rows that are entirely empty (a spreadsheet's ``,,,``) are skipped; a
row with more fields than the header (empty ones included) is reported, never shifted into the
wrong columns. The separator (comma, semicolon, tab or bar) is taken from the header line. A
field longer than the CSV reader's limit (:data:`FIELD_LIMIT` characters: a one-line file, or an
opening quote never closed) refuses the file with its line, never a traceback.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imaging.paths import OutsideRootError, confine
from imaging.problems import ManifestError, Problem
from imaging.settings import MAX_INDEX_CLASSES, ReadSettings

SPLITS = ("train", "val")
SEPARATORS = (",", ";", "\t", "|")
MAX_MANIFEST_BYTES = 256 * 2**20
FIELD_LIMIT = csv.field_size_limit()
"""Longest field the CSV reader takes (Python's default, 131,072 characters); left as it is, as
the limit is process-wide. No path, label or patient id comes near it."""
MAX_COLUMNS = 1000
"""Most columns a header may have (a manifest needs 3 or 4; a one-line file has thousands)."""
_SNIFF_CHARS = 4096  # characters of a header line the separator guess looks at
_SHOW = 60  # characters of a field quoted in a message
SHOW_PATH = 300  # characters of a path named in a problem


def _show(text: str, limit: int = _SHOW) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class Entry:
    """One usable manifest row.

    Attributes:
        row: line number in the manifest (header is line 1).
        path: the DICOM file or series folder, resolved (symbolic links followed) and inside
            an allowed folder.
        written_path: the path as the manifest writes it (used in messages and the fingerprint).
        label: class index.
        patient: patient id as in the manifest (never leaves the hospital).
        split: ``train``, ``val``, or ``""`` when the split is to be made per patient.
    """

    row: int
    path: Path
    written_path: str
    label: int
    patient: str
    split: str


@dataclass(frozen=True)
class ManifestInfo:
    """How the manifest was read: its separator and encoding, for the check's report."""

    separator: str
    encoding: str
    skipped_empty: int


def _text(path: Path, encoding: str) -> str:
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest {path} is {size / 2**20:,.0f} MiB, above "
                            f"{MAX_MANIFEST_BYTES // 2**20} MiB: is it the right file?")
    raw = path.read_bytes()
    name = codecs.lookup(encoding).name
    if name == "utf-8":
        name = "utf-8-sig"  # spreadsheet programs often start a CSV with a byte-order mark
    try:
        return raw.decode(name)
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        hint = ""
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = ("it is UTF-16 (a spreadsheet's 'Unicode text'): save it as 'CSV UTF-8' or "
                    "set manifest_encoding = 'utf-16'")
        else:
            try:
                raw.decode("cp1252")
                hint = ("it looks like Latin-1 / Windows-1252 (a spreadsheet's plain 'CSV'): "
                        "save it as 'CSV UTF-8' or set manifest_encoding = 'cp1252' in the site "
                        "data config")
            except UnicodeDecodeError:
                hint = "save it as 'CSV UTF-8' or set manifest_encoding in the site data config"
        raise ManifestError(f"manifest {path} is not {encoding} text (byte "
                            f"0x{raw[err.start]:02x} on line {line}): {hint}") from err


def _too_long(path: Path, line: int, what: str) -> ManifestError:
    """The error for a field past :data:`FIELD_LIMIT` characters that starts on ``line``."""
    return ManifestError(
        f"manifest {path}, line {line}: {what} longer than {FIELD_LIMIT:,} characters, the "
        "limit for one CSV field. A quote (\") that opens a field and is never closed makes the "
        "rest of the file one field: close it, or remove the quote. A file with no line breaks "
        "is not a manifest (one row per image): check that it is the right file")


def _columns(line: str, separator: str) -> list[str]:
    return [c.strip() for c in next(csv.reader([line], delimiter=separator), [])]


def _separator(header: str, required: list[str], path: Path) -> str:
    for separator in SEPARATORS:
        if all(c in _columns(header, separator) for c in required):
            return separator
    found = _columns(header, ",")
    try:
        sniffed = csv.Sniffer().sniff(header[:_SNIFF_CHARS],
                                      delimiters="".join(SEPARATORS)).delimiter
    except csv.Error:
        sniffed = ","
    names = {",": "comma", ";": "semicolon", "\t": "tab", "|": "bar"}
    if sniffed != ",":
        found = _columns(header, sniffed)
    raise ManifestError(
        f"manifest {path} lacks the column(s) {[c for c in required if c not in found]} (its "
        f"header, split at {names[sniffed]}s, has {[_show(c) for c in found[:12]]}): rename them "
        "in the file, or set path_column / label_column / patient_column in the settings "
        "that name the manifest")


def _header(text: str, config: ReadSettings, path: Path
            ) -> tuple[Iterator[list[str]], list[str], str]:
    """The CSV reader (positioned after the header), the header's names and the separator.

    Line breaks are universal (``\n``, ``\r\n`` or an old Mac's ``\r``), as in the line
    numbers of problems.
    """
    stream = io.StringIO(text, newline=None)
    lines = iter(stream)
    first, header_line = next(((n, line) for n, line in enumerate(lines)
                               if line.strip(" ,;\t|\r\n")), (None, ""))
    if first is None:
        raise ManifestError(f"manifest {path} is empty: it needs a header row with the columns "
                            f"{_required(config)} and one row per image")
    if len(header_line) > FIELD_LIMIT:
        raise ManifestError(
            f"manifest {path}, line {first + 1}: the header line is {len(header_line):,} "
            f"characters long (more than {FIELD_LIMIT:,}): a file whose line breaks were lost, "
            "or not a manifest. It needs a header line and one line per image: check that it "
            "is the right file")
    separator = _separator(header_line, _required(config), path)
    stream.seek(0)
    reader = csv.reader(stream, delimiter=separator)
    try:
        for _ in range(first + 1):
            header = [c.strip() for c in next(reader)]
    except csv.Error as err:
        if "field limit" in str(err):
            raise _too_long(path, first + 1, "the header holds a field") from err
        raise ManifestError(f"manifest {path} is not a readable CSV file ({err})") from err
    if len(header) > MAX_COLUMNS:
        raise ManifestError(
            f"manifest {path}, line {first + 1}: the header has {len(header):,} columns (at most "
            f"{MAX_COLUMNS:,}): a file whose line breaks were lost is one line; it needs a "
            "header line and one line per image. Check that it is the right file")
    counts = Counter(c for c in header if c)
    duplicated = sorted(c for c, n in counts.items() if n > 1)
    if duplicated:
        raise ManifestError(f"manifest {path} names the column(s) {duplicated} twice: keep one")
    return _records(reader, path), header, separator


def _records(reader, path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of each row after the header; a row the CSV reader cannot take
    refuses the file, naming the line where that row starts."""
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if "field limit" in str(err):
                raise _too_long(path, start, "the row starting here holds a field") from err
            raise ManifestError(f"manifest {path}, line {start}: not readable as CSV ({err}); "
                                "fix the quoting there") from err
        yield reader.line_num, record


def _width_problem(line: int, record: list[str], width: int, path_index: int,
                   separator: str) -> Problem | None:
    """A row with more fields than the header (``width``), empty extra fields included: a
    separator inside an unquoted value moved every field after it one column on, so the row is
    refused rather than read shifted."""
    if len(record) <= width:
        return None
    written = record[path_index].strip() if path_index < len(record) else "-"
    name = {",": "comma", ";": "semicolon", "\t": "tab", "|": "bar"}[separator]
    trailing = (" (the extra ones are empty: if every row ends with a separator, remove it or "
                "end the header line with one too)") if not any(
        f.strip() for f in record[width:]) else ""
    shown = _show(separator.join(record), 120)
    return Problem(line, _show(written, SHOW_PATH) or "-", "row",
                   f"{len(record)} fields but the header has {width}{trailing}: a {name} inside "
                   f"an unquoted value shifts every column after it (the row reads {shown!r}). "
                   f"Put that value in double quotes (\"a{separator} b\"); the row was not used, "
                   "so that no column is shifted")


def read_manifest(path: Path, config: ReadSettings
                  ) -> tuple[list[Entry], list[Problem], int, ManifestInfo]:
    """Read and check the manifest.

    Returns:
        usable entries, problems with individual rows, the number of data rows (empty rows not
        counted) and how the file was read.

    Raises:
        ManifestError: the file is missing, not text in the configured encoding, empty, lacks
            a required column, or holds a field longer than :data:`FIELD_LIMIT` characters.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist: give the path to the CSV file")
    records, header, separator = _header(_text(path, config.manifest_encoding), config, path)
    index = {name: header.index(name) for name in header if name}
    roots, base = config.resolved_roots(path), path.resolve().parent
    entries: list[Entry] = []
    problems: list[Problem] = []
    rows = skipped = 0
    for line, record in records:
        if not any(field.strip() for field in record):
            skipped += 1  # a spreadsheet's empty ",,," row
            continue
        rows += 1
        problem = _width_problem(line, record, len(header), index[config.path_column],
                                 separator)
        if problem is None:
            values = record + [""] * (len(header) - len(record))
            field = {name: values[i].strip() for name, i in index.items()}
            entry, problem = _entry(line, field[config.path_column],
                                    field[config.label_column], field[config.patient_column],
                                    field.get(config.split_column, "").lower(), config, base,
                                    roots)
        if problem is not None:
            problems.append(problem)
        else:
            entries.append(entry)
    if rows == 0:
        raise ManifestError(f"manifest {path} has a header but no rows: add one row per image")
    return entries, problems, rows, ManifestInfo(separator, config.manifest_encoding, skipped)


def _entry(line: int, written: str, label_text: str, patient: str, split: str,
           config: ReadSettings, base: Path, roots: tuple[Path, ...]
           ) -> tuple[Entry | None, Problem | None]:
    empty = [name for name, value in ((config.path_column, written),
                                      (config.label_column, label_text),
                                      (config.patient_column, patient)) if not value]
    shown = _show(written, SHOW_PATH) or "-"
    if empty:
        return None, Problem(line, shown, "row", f"empty {empty}: fill them in or remove the row")
    if split not in ("", *SPLITS):
        return None, Problem(line, shown, "row",
                             f"split {_show(split)!r} must be 'train', 'val' or empty")
    label, why = parse_label(label_text, config.classes)
    if label is None:
        return None, Problem(line, shown, "label", why)
    try:
        resolved = confine(written, base, roots)
    except OutsideRootError as err:
        return None, Problem(line, shown, "outside", str(err))
    return Entry(line, resolved, written, label, patient, split), None


def _required(config: ReadSettings) -> list[str]:
    return [config.path_column, config.label_column, config.patient_column]


def parse_label(text: str, classes: tuple[str, ...]) -> tuple[int | None, str]:
    """The class index of a label written as a class name or an index, or why it is none.

    Names match exactly or ignoring case; a near miss names the closest class. An index must
    be below the number of classes (below :data:`MAX_INDEX_CLASSES` without a class list); it
    is compared as text first, so a label of a million digits is never converted.
    """
    if classes:
        if text in classes:
            return classes.index(text), ""
        folded = [c.casefold() for c in classes]
        if text.casefold() in folded:
            return folded.index(text.casefold()), ""
    digits = text[1:] if text.startswith(("-", "+")) else text
    if digits.isascii() and digits.isdigit():
        limit = len(classes) or MAX_INDEX_CLASSES
        if text.startswith("-") and digits.strip("0"):
            return None, f"label {_show(text)} is negative: class indices start at 0"
        significant = digits.lstrip("0") or "0"
        if len(significant) > len(str(limit)) or int(significant) >= limit:
            allowed = (f"classes: 0..{limit - 1} = {list(classes)}" if classes else
                       f"below {limit} without a class list; declare classes to name them")
            return None, f"label {_show(text)} is not a class index ({allowed})"
        return int(significant), ""
    if not classes:
        return None, (f"label {_show(text)!r} is a name but no class list is set: declare "
                      "classes (e.g. classes = [\"normal\", \"pneumonia\"]) or use class indices")
    close = difflib.get_close_matches(text[:200], classes, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return None, f"label {_show(text)!r} is not in the class list {list(classes)}{hint}"
