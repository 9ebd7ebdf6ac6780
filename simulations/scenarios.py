"""Named studies: the TOML files in the repository's ``scenarios/`` folder, or any TOML file.

A scenario is a ``medfed simulate --config`` file with a name: ``medfed simulate --scenario
label-skew`` reads ``scenarios/label-skew.toml``. Its first comment lines say what it simulates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simulations.config import ConfigError, SimulationConfig, load_config

SCENARIOS_DIR = Path(__file__).resolve().parent.parent / "scenarios"


def scenario_names(folder: Path = SCENARIOS_DIR) -> list[str]:
    """The named scenarios (file stems), sorted."""
    return sorted(p.stem for p in folder.glob("*.toml"))


def scenario_path(name: str, folder: Path = SCENARIOS_DIR) -> Path:
    """``name``'s TOML file: a path to a ``.toml`` file, or the stem of one in ``folder``."""
    candidate = Path(name)
    if candidate.suffix == ".toml":
        if not candidate.is_file():
            raise ConfigError(f"scenario file {candidate} does not exist")
        return candidate
    path = folder / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown scenario '{name}'; named scenarios: "
                          f"{', '.join(scenario_names(folder))} (or give a .toml file)")
    return path


def scenario_description(path: Path) -> str:
    """The leading comment lines of a scenario file, joined (what it simulates)."""
    lines = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines)


def load_scenario(name: str, overrides: dict[str, Any] | None = None) -> SimulationConfig:
    """The scenario's config, then ``overrides`` (same nesting as the file)."""
    return load_config(scenario_path(name), overrides)
