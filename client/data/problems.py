"""A hospital's data problems: the row problems and manifest errors of :mod:`imaging.problems`,
and the error that stops training on data the check fails."""

from __future__ import annotations

from core.errors import MedfedError
from imaging.problems import KINDS, ManifestError, Problem

__all__ = ["KINDS", "ManifestError", "Problem", "SiteDataError"]


class SiteDataError(MedfedError, ValueError):
    """The site's data is not fit for training (nothing usable, or too many bad rows)."""
