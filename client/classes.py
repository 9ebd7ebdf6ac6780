"""The study's classes at a hospital: map the hospital's own labels to the study's, or refuse.

A study names its classes (``classes`` in every round's config, in the study's label order).
A hospital that names its classes (``classes`` in ``hospital.toml``, the names its manifest's
labels use) has its labels re-indexed to the study's order by name (ignoring case); a name the
study does not have, or a study with a class count the hospital's labels exceed, is refused
with a reason, which the ClientApp answers and audits like any local failure. A hospital that
names no classes labels by index: index ``k`` is the study's class ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from client.site import SiteData
from core.errors import MedfedError
from models.data import ImageSet


class ClassMismatch(MedfedError, ValueError):
    """The hospital cannot map its labels to the study's classes."""


def label_map(site_classes: Sequence[str], study_classes: Sequence[str]) -> list[int]:
    """``map[k]``: the study's index of the hospital's class ``k``.

    Raises:
        ClassMismatch: a hospital class the study does not name.
    """
    folded = [c.casefold() for c in study_classes]
    missing = [c for c in site_classes if c.casefold() not in folded]
    if missing:
        raise ClassMismatch(
            f"this hospital's classes {missing} are not among the study's classes "
            f"{list(study_classes)}: the hospital cannot take part until the consortium agrees "
            f"on the classes (or the hospital renames its labels in hospital.toml 'classes')")
    return [folded.index(c.casefold()) for c in site_classes]


def _remap(images: ImageSet, mapping: torch.Tensor) -> ImageSet:
    return ImageSet(images.images, mapping[images.labels] if len(images) else images.labels)


def for_study(site: SiteData, study_classes: Sequence[str], num_classes: int) -> SiteData:
    """``site`` with its labels in the study's class order.

    Raises:
        ClassMismatch: a class the study does not name, or a label index outside the study's
            ``num_classes`` classes.
    """
    if site.classes and study_classes:
        mapping = torch.tensor(label_map(site.classes, study_classes), dtype=torch.long)
        site = replace(site, train=_remap(site.train, mapping), val=_remap(site.val, mapping),
                       classes=tuple(study_classes))
    top = max((int(s.labels.max()) for s in (site.train, site.val) if len(s)), default=-1)
    if top >= num_classes:
        names = f" {list(study_classes)}" if study_classes else ""
        raise ClassMismatch(f"this hospital has label {top} but the study has {num_classes} "
                            f"classes{names}: declare the hospital's class names "
                            f"('classes' in hospital.toml) so its labels map by name")
    return site


def declared_class_count(site: SiteData) -> int:
    """The classes this hospital declared: its ``hospital.toml`` class names, else (labels by
    index) ``max label + 1`` over its splits."""
    if site.classes:
        return len(site.classes)
    return 1 + max((int(s.labels.max()) for s in (site.train, site.val) if len(s)), default=-1)


def check_class_count(site: SiteData, num_classes: int, extra_allowed: int) -> None:
    """Refuse a study with more classes than this hospital declared plus ``extra_allowed``
    (its run policy's ``max_extra_classes``); call on the site as loaded, before
    :func:`for_study` and before any model is built.

    Raises:
        ClassMismatch: too many classes (names counts only).
    """
    declared = declared_class_count(site)
    if num_classes > declared + extra_allowed:
        raise ClassMismatch(f"the study has {num_classes} classes, this hospital declared "
                            f"{declared} and its run policy allows {extra_allowed} more "
                            "('max_extra_classes')")
