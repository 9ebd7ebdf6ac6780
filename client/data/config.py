"""A hospital's data settings: which manifest columns mean what, the class list, how to decode.

One typed dataclass, read from a TOML file (``[site_data]`` table or top level) or from the
hospital daemon's node config (dashed keys, the class list as a comma-separated string).
"""

from __future__ import annotations

import codecs
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

FRAME_MODES = ("middle", "all", "volume")
MAX_INDEX_CLASSES = 1000
"""Without a class list, integer labels must be below this (declare ``classes`` to be exact)."""


class SiteDataConfigError(ValueError):
    """A site data setting that is unknown or has a wrong value."""


@dataclass(frozen=True)
class SiteDataConfig:
    """How a hospital's manifest and DICOM files become training images.

    Attributes:
        classes: class names in label order, declared once for the whole study so every hospital
            maps labels the same way. Empty: labels must be integer class indices.
        path_column: manifest column with the DICOM file or series folder, relative to the
            manifest's folder (absolute paths are taken as they are); it must lie, after
            resolving symbolic links, inside one of ``allowed_roots``.
        label_column: manifest column with the class name or index.
        patient_column: manifest column with the (site-internal) patient id.
        split_column: optional manifest column with ``train`` or ``val``; rows where it is absent
            or empty are split per patient.
        frames: multi-frame files and series folders give their ``middle`` frame or ``all``
            frames (one training image each); ``volume``: each row is one CT volume (a series
            folder or a NIfTI file) for a 3D backbone (``client.data.volumes``).
        val_fraction: share of patients (not images) held out for validation when not given.
        seed: seeds the per-patient split.
        max_error_fraction: the check fails when more than this share of manifest rows is unusable.
        cache_dir: where decoded, resized images are kept; empty means ``$MEDFED_CACHE_DIR`` or
            ``~/.cache/medfed/site-data``.
        use_cache: read and write the decoded-image cache.
        allowed_roots: folders the manifest's paths may point into (after resolving symbolic
            links); relative ones are taken from the manifest's folder. Empty: the manifest's
            folder only.
        max_frame_bytes: most bytes one frame may decode to, as its header declares it
            (Rows x Columns x Samples per Pixel x Bits Allocated / 8). Frames are decoded one
            at a time, so this bounds the memory one row needs; a deflated file may inflate to
            at most this plus 1 MiB. Checked before anything is decoded.
        max_pixel_bytes: most bytes all the frames of one file may decode to, as its header
            declares them (one frame's bytes x Number of Frames). Checked before decoding.
        match_patient_id: a row whose file names another patient (Patient ID) than the
            manifest's patient id is a problem. Set false when the manifest uses pseudonyms and
            the files keep the hospital's ids; files that share a Patient ID still stay in one
            split either way.
        manifest_encoding: text encoding of the manifest (``utf-8`` also reads a byte-order
            mark; ``cp1252`` or ``latin-1`` for some spreadsheet exports).
    """

    classes: tuple[str, ...] = ()
    path_column: str = "path"
    label_column: str = "label"
    patient_column: str = "patient_id"
    split_column: str = "split"
    frames: str = "middle"
    val_fraction: float = 0.2
    seed: int = 0
    max_error_fraction: float = 0.1
    cache_dir: str = ""
    use_cache: bool = True
    allowed_roots: tuple[str, ...] = ()
    max_frame_bytes: int = 64 * 2**20
    max_pixel_bytes: int = 2**30
    match_patient_id: bool = True
    manifest_encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if self.frames not in FRAME_MODES:
            raise SiteDataConfigError(f"frames = {self.frames!r}: use one of {FRAME_MODES}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SiteDataConfigError(f"val_fraction = {self.val_fraction}: use 0 <= x < 1")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise SiteDataConfigError(
                f"max_error_fraction = {self.max_error_fraction}: use 0 <= x <= 1")
        if len(set(self.classes)) != len(self.classes):
            raise SiteDataConfigError(f"classes {list(self.classes)} repeat a name")
        if len(self.classes) > MAX_INDEX_CLASSES:
            raise SiteDataConfigError(
                f"{len(self.classes)} classes: at most {MAX_INDEX_CLASSES} are supported")
        for name in ("max_frame_bytes", "max_pixel_bytes"):
            if getattr(self, name) < 1:
                raise SiteDataConfigError(f"{name} = {getattr(self, name)}: use a positive size")
        try:
            codecs.lookup(self.manifest_encoding)
        except LookupError as err:
            raise SiteDataConfigError(f"manifest_encoding = {self.manifest_encoding!r} is not "
                                      "a known encoding (e.g. 'utf-8', 'cp1252')") from err

    def resolved_cache_dir(self) -> Path:
        """The cache folder this config names (see ``cache_dir``)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("MEDFED_CACHE_DIR")
        base = Path(env) if env else Path.home() / ".cache" / "medfed"
        return base / "site-data"

    def resolved_roots(self, manifest: Path) -> tuple[Path, ...]:
        """The folders manifest paths may point into, absolute and with links resolved."""
        folder = Path(manifest).resolve().parent
        roots = self.allowed_roots or (".",)
        return tuple((folder / Path(r).expanduser()).resolve() for r in roots)


def _parse_roots(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(r.strip() for r in value.split(os.pathsep) if r.strip())
    if isinstance(value, list | tuple) and all(isinstance(r, str) for r in value):
        return tuple(r.strip() for r in value if r.strip())
    raise SiteDataConfigError(f"{where}: allowed_roots must be a list of folders or "
                              f"'a{os.pathsep}b', got {value!r}")


def _parse_classes(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(c.strip() for c in value.split(",") if c.strip())
    if isinstance(value, list | tuple) and all(isinstance(c, str) for c in value):
        return tuple(c.strip() for c in value)
    raise SiteDataConfigError(f"{where}: classes must be a list of names or 'a,b,c', got {value!r}")


def site_data_config(values: Mapping[str, Any], where: str = "site data config",
                     base: SiteDataConfig | None = None) -> SiteDataConfig:
    """``base`` (default: defaults) updated with ``values``; dashed or underscored keys.

    Keys that are not settings of :class:`SiteDataConfig` raise, except in node configs (see
    :func:`from_node_config`), which also hold other daemons' keys.
    """
    known = {f.name: f for f in fields(SiteDataConfig)}
    defaults = SiteDataConfig()
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise SiteDataConfigError(f"{where}: unknown setting '{key}'; known: {sorted(known)}")
        if name == "classes":
            changes[name] = _parse_classes(value, where)
            continue
        if name == "allowed_roots":
            changes[name] = _parse_roots(value, where)
            continue
        current = getattr(defaults, name)
        if isinstance(current, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise SiteDataConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        elif isinstance(current, float) and isinstance(value, int | str):
            try:
                value = float(value)
            except ValueError as err:
                raise SiteDataConfigError(f"{where}: '{key}' must be a number") from err
        elif isinstance(current, int) and isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, type(current)):
            raise SiteDataConfigError(
                f"{where}: '{key}' must be {type(current).__name__}, got {value!r}")
        changes[name] = value
    return replace(base or defaults, **changes)


def load_site_data_config(path: Path) -> SiteDataConfig:
    """Read a TOML file: its ``[site_data]`` table if it has one, else its top level."""
    try:
        values = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SiteDataConfigError(f"{path}: cannot read the site data config ({err})") from err
    return site_data_config(values.get("site_data", values), str(path))


NODE_CONFIG_PREFIX = "site-"


def from_node_config(node_config: Mapping[str, Any]) -> SiteDataConfig:
    """Settings from a hospital daemon's node config.

    ``classes = "normal,pneumonia"``, ``site-config = "/path/site.toml"`` (a TOML file as read by
    :func:`load_site_data_config`), and any setting prefixed ``site-`` (``site-frames = "all"``,
    ``site-label-column = "finding"``) on top of it.
    """
    base = SiteDataConfig()
    if "site-config" in node_config:
        base = load_site_data_config(Path(str(node_config["site-config"])))
    values: dict[str, Any] = {}
    if "classes" in node_config:
        values["classes"] = node_config["classes"]
    for key, value in node_config.items():
        if key.startswith(NODE_CONFIG_PREFIX) and key != "site-config":
            values[key[len(NODE_CONFIG_PREFIX):]] = value
    return site_data_config(values, "node config", base)
