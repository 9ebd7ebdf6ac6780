"""A sweep: one study run for each point of a grid over a few settings, each in its own folder.

``medfed sweep --scenario label-skew --grid data.num_hospitals=3,5 --grid data.alpha=0.3,1``
runs four studies under ``<out>/num_hospitals=3_alpha=0.3/`` and so on, then writes
``<out>/sweep.csv`` (one row per run) that ``medfed report`` can follow up on.
"""

from __future__ import annotations

import itertools
import logging
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from simulations.config import ConfigError, SimulationConfig, with_overrides

logger = logging.getLogger(__name__)


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """``["data.alpha=0.3,1", "seed=0,1"]`` -> ``{"data.alpha": [0.3, 1], "seed": [0, 1]}``.

    Values are TOML literals (numbers, ``true``, quoted or bare strings).
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid '{spec}': expected SECTION.KEY=V1,V2 "
                              f"(e.g. data.num_hospitals=3,5)")
        grid[key.strip()] = [_literal(v.strip(), spec) for v in values.split(",")]
    return grid


def _literal(text: str, spec: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text.replace("-", "").replace("_", "").isalnum():
            return text  # a bare word: a string such as iid or scanners
        raise ConfigError(f"--grid '{spec}': cannot read value '{text}'") from None


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, as ``{dotted key: value}``, in grid order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*(grid[k] for k in keys))]


def point_overrides(point: dict[str, Any]) -> dict[str, Any]:
    """``{"data.alpha": 0.3}`` -> ``{"data": {"alpha": 0.3}}`` (the TOML nesting)."""
    nested: dict[str, Any] = {}
    for dotted, value in point.items():
        *sections, key = dotted.split(".")
        table = nested
        for section in sections:
            table = table.setdefault(section, {})
        table[key] = value
    return nested


def point_name(point: dict[str, Any]) -> str:
    """Folder name of one grid point, e.g. ``num_hospitals=3_alpha=0.3``."""
    def text(value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return "_".join(f"{k.split('.')[-1]}={text(v)}" for k, v in point.items()) or "base"


def sweep_configs(base: SimulationConfig, grid: dict[str, list[Any]], out_dir: Path
                  ) -> list[tuple[dict[str, Any], SimulationConfig]]:
    """Each grid point's config (base, then the point), run directory under ``out_dir``.

    Every point is checked before any run starts, so a typo fails at once.
    """
    configs = []
    for point in grid_points(grid):
        config = with_overrides(base, point_overrides(point), f"--grid {point}")
        config = with_overrides(config, {"run_dir": str(Path(out_dir) / point_name(point))})
        configs.append((point, config))
    return configs


def run_sweep(base: SimulationConfig, grid: dict[str, list[Any]], out_dir: Path,
              console: Console | None = None) -> pd.DataFrame:
    """Run every grid point with :func:`simulations.runner.run_study`; write ``sweep.csv``."""
    from simulations.runner import run_study

    console = console or Console()
    out_dir = Path(out_dir)
    configs = sweep_configs(base, grid, out_dir)
    rows = []
    for i, (point, config) in enumerate(configs, 1):
        console.rule(f"sweep {i}/{len(configs)}: {point_name(point)}")
        summary = run_study(config, console)
        rows.append({**point, "run_dir": config.run_dir,
                     "federated_auc": summary["federated"]["auc"],
                     "pooled_auc": summary.get("pooled", {}).get("auc"),
                     "local_auc": summary.get("local", {}).get("auc"),
                     "epsilon_max": summary.get("privacy", {}).get("epsilon_max"),
                     "wall_time_s": summary["wall_time_s"]["federated"]})
        # Written after each run: a sweep cut short keeps what it finished.
        out_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(out_dir / "sweep.csv", index=False)
    return pd.DataFrame(rows)
