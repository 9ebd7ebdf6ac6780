"""What to predict on: a manifest or a folder of DICOM files -> studies, each read by the
hospital's own reader (``imaging.rows.read_row``: paths confined, header bounds checked before
decoding, every decoder failure a refused row).

A study is one manifest row (its identifier: the path as the manifest writes it) or one file
under the input folder (its identifier: its path relative to the folder). Patient ids and names
are never part of a study's identifier nor of anything written.

A manifest with a label column (``label``) is read by the hospital's manifest reader
(``imaging.manifest.read_manifest``: ``path``, ``label`` and ``patient_id`` columns, labels
mapped to the card's classes by name); one without needs only the ``path`` column.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imaging.manifest import MAX_MANIFEST_BYTES, SEPARATORS, Entry, read_manifest
from imaging.paths import OutsideRootError, confine
from imaging.problems import ManifestError
from imaging.settings import ReadSettings

UNLABELLED = -1
"""The label of a study whose true class is not known."""


@dataclass(frozen=True)
class Study:
    """One study to predict on.

    Attributes:
        identifier: the manifest's path text, or the path relative to the input folder.
        entry: the row for ``imaging.rows.read_row`` (None: refused before reading).
        label: class index, or :data:`UNLABELLED`.
        problem: why the study cannot be read (empty: none known yet).
        row: the manifest line (folder: the file's position), for ordering.
    """

    identifier: str
    entry: Entry | None
    label: int = UNLABELLED
    problem: str = ""
    row: int = 0


@dataclass(frozen=True)
class StudySource:
    """Studies and where they come from.

    Attributes:
        studies: in manifest or path order.
        labelled: every usable study carries its true class.
        roots: the folders the studies' files may lie in (for ``read_row``).
        description: the manifest or folder, for the summary.
    """

    studies: list[Study]
    labelled: bool
    roots: tuple[Path, ...]
    description: str


def visible_files(root: Path) -> Iterator[tuple[Path, list[str]]]:
    """Each folder under ``root`` (relative to it, in path order) and its file names, hidden
    files and folders skipped; links to folders are not followed (``os.walk``'s default)."""
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(parent).relative_to(root), sorted(f for f in files if not f.startswith("."))


def folder_studies(folder: Path) -> StudySource:
    """Every file under ``folder`` (recursively, hidden files and folders skipped, symbolic
    links to folders not followed), in path order; a link pointing outside is refused.

    Raises:
        ManifestError: ``folder`` is not a folder or holds no file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"--input {folder}: not a folder of DICOM files")
    root = folder.resolve()
    written = [(where / f).as_posix() for where, files in visible_files(root) for f in files]
    studies = [_study(w, root, (root,), UNLABELLED, n)
               for n, w in enumerate(sorted(written), start=1)]
    if not studies:
        raise ManifestError(f"--input {folder}: holds no file")
    return StudySource(studies, False, (root,), str(folder))


def _study(written: str, base: Path, roots: tuple[Path, ...], label: int, row: int) -> Study:
    """A study for a written path, confined to ``roots`` (refused, with why, if outside)."""
    try:
        path = confine(written, base, roots)
    except OutsideRootError as err:
        return Study(written, None, label, f"outside: {err}", row)
    return Study(written, Entry(row, path, written, label, "", ""), label, row=row)


def _header(manifest: Path, encoding: str) -> tuple[list[str], str, str]:
    """The manifest's column names, its separator and its text."""
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist: give the path to the CSV file")
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest {manifest} is larger than "
                            f"{MAX_MANIFEST_BYTES // 2**20} MiB: is it the right file?")
    try:
        text = manifest.read_bytes().decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as err:
        raise ManifestError(f"manifest {manifest} is not {encoding} text ({err}); save it "
                            "as 'CSV UTF-8'") from err
    first = next((line for line in text.splitlines() if line.strip(" ,;\t|")), "")
    for separator in SEPARATORS:
        columns = [c.strip() for c in next(csv.reader([first], delimiter=separator), [])]
        if len(columns) > 1 or separator == SEPARATORS[-1]:
            return columns, separator, text
    return [], ",", text


def manifest_studies(manifest: Path, settings: ReadSettings) -> StudySource:
    """The manifest's rows as studies; labelled when it has ``settings.label_column``.

    Raises:
        ManifestError: missing, unreadable, without a path column, or without rows.
    """
    manifest = Path(manifest)
    columns, separator, text = _header(manifest, settings.manifest_encoding)
    roots = settings.resolved_roots(manifest)
    if settings.label_column in columns:
        entries, problems, _, _ = read_manifest(manifest, settings)
        studies = [Study(e.written_path, e, e.label, row=e.row) for e in entries]
        studies += [Study(p.path, None, UNLABELLED, f"{p.kind}: {p.reason}", p.row)
                    for p in problems]
        studies.sort(key=lambda s: s.row)
        return StudySource(studies, True, roots, str(manifest))
    if settings.path_column not in columns:
        raise ManifestError(f"manifest {manifest} has no '{settings.path_column}' column (its "
                            f"header: {columns[:12]}); add it, one DICOM file per row")
    return StudySource(list(_unlabelled(text, separator, manifest, settings, roots)), False,
                       roots, str(manifest))


def _unlabelled(text: str, separator: str, manifest: Path, settings: ReadSettings,
                roots: tuple[Path, ...]) -> Iterator[Study]:
    """The rows of a manifest without labels: only the path column is read."""
    reader = csv.DictReader(io.StringIO(text), delimiter=separator)
    base = manifest.resolve().parent
    for number, record in enumerate(reader, start=2):
        written = (record.get(settings.path_column) or "").strip()
        if not written:
            continue
        yield _study(written, base, roots, UNLABELLED, number)
