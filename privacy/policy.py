"""The hospital's own privacy policy: a TOML file the hospital owns, never the coordinator.

Example ``privacy-policy.toml``::

    max_epsilon = 8.0        # total over every run that touches a dataset
    delta = 1e-5             # per example; the delta every epsilon is stated for
    accountant = "prv"       # how the ledger composes: "rdp" or "prv"
    require_dp = true        # refuse rounds that are not differentially private
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.settings import check_settings, read_settings, setting
from privacy.config import ACCOUNTANTS


@dataclass(frozen=True)
class SitePolicy:
    """How much privacy a hospital spends on each of its datasets, at most.

    Attributes:
        max_epsilon: budget: the composed epsilon over all runs and rounds on one dataset.
        delta: the delta of that epsilon; a run asking for a larger delta is refused.
        accountant: ``rdp`` or ``prv``: how the ledger composes the recorded mechanisms.
        require_dp: refuse any round without a DP mechanism (a non-private round spends an
            unbounded epsilon).
    """

    max_epsilon: float = setting(gt=0)
    delta: float = setting(1e-5, gt=0, lt=1)
    accountant: str = setting("rdp", choices=ACCOUNTANTS)
    require_dp: bool = True

    def __post_init__(self) -> None:
        check_settings(self, "site policy")


def load_site_policy(path: Path) -> SitePolicy:
    """Read and check a site policy file by the one typed reader: an unknown key, a value of
    the wrong type or out of range is refused, naming the file, the key, the value and what is
    allowed.

    Raises:
        FileNotFoundError: the file cannot be read.
        ValueError: invalid TOML, a refused setting, or no ``max_epsilon``.
    """
    label = f"site policy {path}"
    values = read_settings(path, SitePolicy, ValueError, label,
                           unreadable_error=FileNotFoundError)
    if "max_epsilon" not in values:
        raise ValueError(f"{label}: set max_epsilon (the total budget per dataset)")
    return SitePolicy(**values)
