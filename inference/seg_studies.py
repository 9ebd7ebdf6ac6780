"""What a segmentation adapter runs on: a manifest, or a folder of NIfTI files and DICOM series.

A study is one volume: a NIfTI file (``.nii``/``.nii.gz``) or a DICOM series folder (a folder
holding the series' files, one slice per file). Its identifier is the manifest's ``image`` text
or the path relative to the input folder; patient ids and names are never part of it.

- **Manifest**: a CSV with an ``image`` column (a NIfTI file or a series folder, relative to the
  manifest or absolute) and, for external validation, a ``mask`` column (a NIfTI file on the
  image's grid; an empty cell: that study is predicted but not scored). Other columns
  (``patient_id``, ``split``) are ignored.
- **Folder**: every NIfTI file under it is a study, and every folder that directly holds other
  visible files is one DICOM series study (hidden files and folders skipped).

Every path is confined to the allowed folders (``imaging.paths``) before anything is opened: a
study pointing outside becomes a refused study (kind ``outside``), not an error for the run.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path

from imaging.paths import OutsideRootError, confine, series_files
from imaging.problems import ManifestError
from imaging.volumes import is_nifti
from inference.studies import visible_files

IMAGE_COLUMN, MASK_COLUMN = "image", "mask"


@dataclass(frozen=True)
class SegStudy:
    """One volume to segment.

    Attributes:
        identifier: the manifest's ``image`` text, or the path relative to the input folder.
        image: the resolved NIfTI file or series folder (None: refused before reading).
        files: a series folder's slice files, each confined (empty for NIfTI).
        mask: the resolved true mask (NIfTI), or None.
        problem: ``kind: reason`` when the study cannot be read (empty: none known yet).
    """

    identifier: str
    image: Path | None
    files: tuple[Path, ...] = ()
    mask: Path | None = None
    problem: str = ""


@dataclass(frozen=True)
class SegSource:
    """Studies and where they come from.

    Attributes:
        studies: in manifest or path order.
        labelled: the input has a mask column (external validation).
        description: the manifest or folder, for the summary.
    """

    studies: list[SegStudy]
    labelled: bool
    description: str
    roots: tuple[Path, ...] = field(default=())


def _image_study(written: str, base: Path, roots: tuple[Path, ...],
                 mask: str = "") -> SegStudy:
    """A study for a written image (and mask) path, confined to ``roots``."""
    try:
        image = confine(written, base, roots)
        mask_path = confine(mask, base, roots) if mask else None
        files = tuple(series_files(image, roots)) if image.is_dir() else ()
    except OutsideRootError as err:
        return SegStudy(written, None, problem=f"outside: {err}")
    return SegStudy(written, image, files, mask_path)


def folder_segmentation_studies(folder: Path) -> SegSource:
    """Every NIfTI file and every DICOM series folder under ``folder``, in path order.

    Raises:
        ManifestError: ``folder`` is not a folder or holds no study.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"--input {folder}: not a folder of NIfTI files or DICOM series")
    root = folder.resolve()
    found: list[str] = []
    for where, visible in visible_files(root):
        found += [(where / f).as_posix() for f in visible if is_nifti(Path(f))]
        if any(not is_nifti(Path(f)) for f in visible):
            found.append(where.as_posix())  # a series folder: its other files are the slices
    # --input naming a series folder itself: the study is named after the folder
    studies = [replace(_image_study(w, root, (root,)), identifier=root.name) if w == "."
               else _image_study(w, root, (root,)) for w in sorted(found)]
    if not studies:
        raise ManifestError(f"--input {folder}: holds no NIfTI file and no DICOM series")
    return SegSource(studies, False, str(folder), (root,))


def manifest_segmentation_studies(manifest: Path, roots: tuple[Path, ...]) -> SegSource:
    """The rows of a segmentation manifest (``image`` column, ``mask`` optional).

    Args:
        manifest: the CSV file.
        roots: folders its paths may point into, resolved
            (``imaging.settings.ReadSettings.resolved_roots``).

    Raises:
        ManifestError: missing, not UTF-8, without an ``image`` column, or without rows.
    """
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist: give the path to the CSV file")
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestError(f"manifest {manifest} is not UTF-8 text ({err}); save it as "
                            "'CSV UTF-8'") from err
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in reader.fieldnames or []]
    if IMAGE_COLUMN not in columns:
        raise ManifestError(f"manifest {manifest} has no '{IMAGE_COLUMN}' column (its header: "
                            f"{columns[:12]}); add it: one NIfTI file or DICOM series folder "
                            f"per row, and a '{MASK_COLUMN}' column to score the adapter")
    base = manifest.resolve().parent
    studies = []
    for record in reader:
        record = {(k or "").strip(): (v or "").strip() for k, v in record.items()
                  if isinstance(v, str)}
        if written := record.get(IMAGE_COLUMN, ""):
            studies.append(_image_study(written, base, roots, record.get(MASK_COLUMN, "")))
    if not studies:
        raise ManifestError(f"manifest {manifest} has no row with an '{IMAGE_COLUMN}' path")
    return SegSource(studies, MASK_COLUMN in columns, str(manifest), roots)
