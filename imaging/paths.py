"""Manifest paths confined to the folders a hospital allows.

A manifest is a file a hospital may be handed; its paths must not make medfed read anything
outside the data folder (``../../etc/passwd``, ``/home/x/.ssh/id_ed25519``, or a symbolic link
that points out of the folder). Paths are resolved (every symbolic link followed) and must land
inside one of the allowed roots; nothing is opened before that check, and the answer for a path
outside does not say whether the target exists.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import MedfedError


class OutsideRootError(MedfedError, ValueError):
    """A path that resolves outside every allowed root."""


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def confine(written: str, base: Path, roots: tuple[Path, ...]) -> Path:
    """The resolved path of a manifest entry, if it lies inside ``roots``.

    Args:
        written: the path as the manifest writes it (relative to ``base`` or absolute).
        base: the manifest's folder.
        roots: allowed folders, absolute and resolved (see
            ``imaging.settings.ReadSettings.resolved_roots``).

    Raises:
        OutsideRootError: the path, after following symbolic links, is outside every root.
    """
    if "\0" in written:
        raise OutsideRootError("the path holds a NUL character")
    candidate = Path(written).expanduser() if written.startswith("~") else Path(written)
    if not candidate.is_absolute():
        candidate = base / candidate
    try:
        # strict=False: a missing file resolves as far as it can and is reported as missing.
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as err:  # symlink loop, permission
        raise OutsideRootError(f"the path cannot be resolved ({type(err).__name__})") from err
    if not _inside(resolved, roots):
        raise OutsideRootError(
            "the path points outside the allowed folders (" + ", ".join(str(r) for r in roots)
            + "), directly or through a symbolic link: nothing was read from it. Move the file "
            "into the data folder or add its folder to allowed_roots in the site data config")
    return resolved


def series_files(folder: Path, roots: tuple[Path, ...]) -> list[Path]:
    """The files of a series folder (hidden ones skipped), each resolved and confined.

    Raises:
        OutsideRootError: a file in the folder is a symbolic link pointing outside ``roots``.
    """
    files = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        resolved = child.resolve(strict=False)
        if not _inside(resolved, roots):
            raise OutsideRootError(
                f"'{child.name}' in the series folder is a symbolic link pointing outside the "
                "allowed folders: nothing was read from it; remove the link")
        if resolved.is_file():
            files.append(resolved)
    return files

