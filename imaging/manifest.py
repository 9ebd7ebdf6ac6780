"""The manifest: a CSV table with one row per DICOM file or series folder.

Each row names a path (relative to the manifest, confined to the allowed folders), a label and a
patient, and optionally a split. Rows are checked one by one with Python's ``csv`` module, so
that every problem names its line: a bad row becomes a :class:`Problem`, a bad table a
:class:`ManifestError`. Rows that are entirely empty (a spreadsheet's ``,,,``) are skipped; a
row with more fields than the header is reported, never shifted into the wrong columns.
The separator (comma, semicolon, tab or bar) is taken from the header line.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
from dataclasses import dataclass
from pathlib import Path

from imaging.paths import OutsideRootError, confine
from imaging.problems import ManifestError, Problem
from imaging.settings import MAX_INDEX_CLASSES, ReadSettings

SPLITS = ("train", "val")
SEPARATORS = (",", ";", "\t", "|")
MAX_MANIFEST_BYTES = 256 * 2**20
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


def _columns(line: str, separator: str) -> list[str]:
    return [c.strip() for c in next(csv.reader([line], delimiter=separator), [])]


def _separator(header: str, required: list[str], path: Path) -> str:
    for separator in SEPARATORS:
        if all(c in _columns(header, separator) for c in required):
            return separator
    found = _columns(header, ",")
    try:
        sniffed = csv.Sniffer().sniff(header, delimiters="".join(SEPARATORS)).delimiter
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


def read_manifest(path: Path, config: ReadSettings
                  ) -> tuple[list[Entry], list[Problem], int, ManifestInfo]:
    """Read and check the manifest.

    Returns:
        usable entries, problems with individual rows, the number of data rows (empty rows not
        counted) and how the file was read.

    Raises:
        ManifestError: the file is missing, not text in the configured encoding, empty, or
            lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist: give the path to the CSV file")
    text = _text(path, config.manifest_encoding)
    lines = text.splitlines()
    first = next((n for n, line in enumerate(lines) if line.strip(" ,;\t|")), None)
    if first is None:
        raise ManifestError(f"manifest {path} is empty: it needs a header row with the columns "
                            f"{_required(config)} and one row per image")
    separator = _separator(lines[first], _required(config), path)
    reader = csv.reader(io.StringIO(text), delimiter=separator)
    try:
        for _ in range(first + 1):
            header = [c.strip() for c in next(reader)]
    except csv.Error as err:
        raise ManifestError(f"manifest {path} is not a readable CSV file ({err})") from err
    duplicated = sorted({c for c in header if c and header.count(c) > 1})
    if duplicated:
        raise ManifestError(f"manifest {path} names the column(s) {duplicated} twice: keep one")
    index = {name: header.index(name) for name in header if name}
    roots = config.resolved_roots(path)
    base = path.resolve().parent
    entries: list[Entry] = []
    problems: list[Problem] = []
    rows = skipped = 0
    has_split = config.split_column in index
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise ManifestError(f"manifest {path}, line {reader.line_num}: not readable as "
                                f"CSV ({err}); fix the quoting there") from err
        line = reader.line_num
        if not any(field.strip() for field in record):
            skipped += 1  # a spreadsheet's empty ",,," row
            continue
        rows += 1
        if len(record) > len(header) and any(f.strip() for f in record[len(header):]):
            written = record[index[config.path_column]].strip() \
                if index[config.path_column] < len(record) else "-"
            problems.append(Problem(
                line, _show(written, SHOW_PATH) or "-", "row",
                f"{len(record)} fields but the header has {len(header)}: a "
                f"{'comma' if separator == ',' else 'separator'} inside a value (quote it) or "
                "an extra field; the row was not used so that no column is shifted"))
            continue
        record = record + [""] * (len(header) - len(record))

        def field(name: str, values: list[str] = record) -> str:
            return values[index[name]].strip() if name in index else ""

        entry, problem = _entry(line, field(config.path_column), field(config.label_column),
                                field(config.patient_column),
                                field(config.split_column).lower() if has_split else "",
                                config, base, roots)
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
