"""The manifest: a CSV table with one row per DICOM file or series folder, read with pandas.

Each row names a path (relative to the manifest), a label and a patient, and optionally a split.
Rows are checked one by one; a bad row becomes a :class:`Problem`, a bad table a
:class:`ManifestError`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from client.data.config import SiteDataConfig
from client.data.problems import ManifestError, Problem

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Entry:
    """One usable manifest row.

    Attributes:
        row: line number in the manifest (header is line 1).
        path: the DICOM file or series folder, resolved.
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


def read_manifest(path: Path, config: SiteDataConfig) -> tuple[list[Entry], list[Problem], int]:
    """Read and check the manifest.

    Returns:
        usable entries, problems with individual rows, and the number of data rows.

    Raises:
        ManifestError: the file is missing, not a CSV, empty, or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist: give the path to the CSV file")
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True,
                            encoding="utf-8-sig")
    except pd.errors.EmptyDataError as err:
        raise ManifestError(f"manifest {path} is empty: it needs a header row with the columns "
                            f"{_required(config)} and one row per image") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ManifestError(f"manifest {path} is not a readable CSV file ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in _required(config) if c not in table.columns]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks the column(s) {missing} (it has {list(table.columns)}): "
            "rename them in the file, or set path_column / label_column / patient_column in the "
            "site data config")
    if table.empty:
        raise ManifestError(f"manifest {path} has a header but no rows: add one row per image")
    has_split = config.split_column in table.columns
    entries, problems = [], []
    for index, record in enumerate(table.to_dict("records")):
        line = index + 2
        written = record[config.path_column].strip()
        label_text = record[config.label_column].strip()
        patient = record[config.patient_column].strip()
        split = record[config.split_column].strip().lower() if has_split else ""
        empty = [name for name, value in ((config.path_column, written),
                                          (config.label_column, label_text),
                                          (config.patient_column, patient)) if not value]
        if empty:
            problems.append(Problem(line, written or "-", "row",
                                    f"empty {empty}: fill them in or remove the row"))
            continue
        if split not in ("", *SPLITS):
            problems.append(Problem(line, written, "row",
                                    f"split {split!r} must be 'train', 'val' or empty"))
            continue
        label, why = parse_label(label_text, config.classes)
        if label is None:
            problems.append(Problem(line, written, "label", why))
            continue
        resolved = Path(written) if Path(written).is_absolute() else path.parent / written
        entries.append(Entry(line, resolved, written, label, patient, split))
    return entries, problems, len(table)


def _required(config: SiteDataConfig) -> list[str]:
    return [config.path_column, config.label_column, config.patient_column]


def parse_label(text: str, classes: tuple[str, ...]) -> tuple[int | None, str]:
    """The class index of a label written as a class name or an index, or why it is none.

    Names match exactly or ignoring case; a near miss names the closest class.
    """
    if classes:
        if text in classes:
            return classes.index(text), ""
        folded = [c.casefold() for c in classes]
        if text.casefold() in folded:
            return folded.index(text.casefold()), ""
    if text.lstrip("-").isdigit():
        index = int(text)
        if classes and not 0 <= index < len(classes):
            return None, (f"label {index} is not a class index (classes: 0..{len(classes) - 1} "
                          f"= {list(classes)})")
        if index < 0:
            return None, f"label {index} is negative: class indices start at 0"
        return index, ""
    if not classes:
        return None, (f"label {text!r} is a name but no class list is set: declare classes "
                      "(e.g. classes = [\"normal\", \"pneumonia\"]) or use class indices")
    close = difflib.get_close_matches(text, classes, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return None, f"label {text!r} is not in the class list {list(classes)}{hint}"
