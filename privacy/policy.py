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

from models.settings import read_settings
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

    max_epsilon: float
    delta: float = 1e-5
    accountant: str = "rdp"
    require_dp: bool = True

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise ValueError(f"site policy: max_epsilon must be > 0, got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"site policy: delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"site policy: accountant '{self.accountant}' is not one of "
                             f"{ACCOUNTANTS}")


def load_site_policy(path: Path) -> SitePolicy:
    """Read and check a site policy file; errors name the file and the setting to fix."""
    values = read_settings(path, SitePolicy, ValueError, f"site policy {path}",
                           unreadable_error=FileNotFoundError)
    if "max_epsilon" not in values:
        raise ValueError(f"site policy {path}: set max_epsilon (the total budget per dataset)")
    for name, value in values.items():
        expected = {"max_epsilon": (int, float), "delta": (float,), "accountant": (str,),
                    "require_dp": (bool,)}[name]
        if isinstance(value, bool) != (bool in expected) or not isinstance(value, expected):
            raise ValueError(f"site policy {path}: '{name}' has the wrong type ({value!r})")
    try:
        return SitePolicy(**values)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
