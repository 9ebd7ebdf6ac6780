"""A hospital's data settings: which manifest columns mean what, the class list, how to decode.

One typed dataclass, read from a TOML file (``[site_data]`` table or top level) or from the
hospital daemon's node config (dashed keys, the class list as a comma-separated string).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import SettingsError, check_settings, load_settings, read_toml, setting
from imaging.settings import FRAME_MODES, MAX_INDEX_CLASSES, ReadSettings, ReadSettingsError

__all__ = ["FRAME_MODES", "MAX_INDEX_CLASSES", "SiteDataConfig", "SiteDataConfigError",
           "from_node_config", "load_site_data_config", "site_data_config"]


class SiteDataConfigError(ReadSettingsError):
    """A site data setting that is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class SiteDataConfig(ReadSettings):
    """How a hospital's manifest and DICOM files become training images.

    The reader's settings (columns, classes, frames, folders, header bounds, encoding) are
    :class:`imaging.settings.ReadSettings`, shared with a coordinator that reads an evaluation
    manifest; the split, the error budget and the cache are the hospital's own. Each reader
    setting is documented there (the settings reference reads it from there); an entry here
    overrides it for a hospital.

    Attributes:
        split_column: optional manifest column with ``train`` or ``val``; rows where it is absent
            or empty are split per patient.
        val_fraction: share of patients (not images) held out for validation when not given.
        seed: seeds the per-patient split.
        max_error_fraction: the check fails when more than this share of manifest rows is unusable.
        cache_dir: where decoded, resized images are kept; empty means ``$MEDFED_CACHE_DIR`` or
            ``~/.cache/medfed/site-data``.
        use_cache: read and write the decoded-image cache.
        match_patient_id: a row whose file names another patient (Patient ID) than the
            manifest's patient id is a problem. Set false when the manifest uses pseudonyms and
            the files keep the hospital's ids; files that share a Patient ID still stay in one
            split either way.
    """

    val_fraction: float = setting(0.2, ge=0.0, lt=1.0)
    seed: int = 0
    max_error_fraction: float = setting(0.1, ge=0.0, le=1.0)
    cache_dir: str = ""
    use_cache: bool = True
    match_patient_id: bool = True

    def __post_init__(self) -> None:
        # Settings built in code are held to the limits a file is (the reader checks those).
        try:
            check_settings(self, "site data config")
            super().__post_init__()
        except SettingsError as err:
            raise SiteDataConfigError(str(err)) from err

    def resolved_cache_dir(self) -> Path:
        """The cache folder this config names (see ``cache_dir``)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        env = os.environ.get("MEDFED_CACHE_DIR")
        base = Path(env) if env else Path.home() / ".cache" / "medfed"
        return base / "site-data"


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


def _from_text(name: str, value: Any, where: str) -> Any:
    """A value as a node config or a command-line flag writes it (text) in the setting's type:
    ``"a,b"`` for a list of classes, ``"a:b"`` for folders, ``"true"``, ``"0.3"``, ``"64"``."""
    if name == "classes":
        return _parse_classes(value, where)
    if name == "allowed_roots":
        return _parse_roots(value, where)
    if not isinstance(value, str):
        return value
    default = getattr(SiteDataConfig(), name, None)
    if isinstance(default, bool) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            return value  # the reader refuses it, naming the key
    if isinstance(default, int) and not isinstance(default, bool) and \
            value.lstrip("-").isdigit():
        return int(value)
    return value


def site_data_config(values: Mapping[str, Any], where: str = "site data config",
                     base: SiteDataConfig | None = None, text: bool = True) -> SiteDataConfig:
    """``base`` (default: defaults) updated with ``values``; dashed or underscored keys.

    Read by the typed settings reader (``core.settings``): an unknown key, a value of the
    wrong type or out of range is refused, naming the key, the value and what is allowed.

    Args:
        text: also take the text forms a node config or a command-line flag gives
            (``classes = "a,b"``, ``use_cache = "false"``, ``val_fraction = "0.3"``); a
            TOML file's values are taken as typed.

    Raises:
        SiteDataConfigError: a setting that is unknown, mistyped or out of range.
    """
    if text:
        values = {k: _from_text(str(k).replace("-", "_"), v, where) for k, v in values.items()}
    try:
        return load_settings(SiteDataConfig, values, where, base)
    except SettingsError as err:
        raise SiteDataConfigError(str(err)) from err


def load_site_data_config(path: Path) -> SiteDataConfig:
    """Read a TOML file: its ``[site_data]`` table if it has one, else its top level.

    Raises:
        SiteDataConfigError: unreadable file, invalid TOML, or a refused setting.
    """
    values = read_toml(Path(path), f"site data config {path}", error=SiteDataConfigError)
    table = values.get("site_data", values)
    where = f"site data config {path}" + (" [site_data]" if "site_data" in values else "")
    return site_data_config(table, where, text=False)


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
