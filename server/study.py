"""A study: what a consortium agrees to train, read from one TOML file by one typed reader.

The study names the task and its classes, the model and its LoRA adapter, how hospitals train,
how rounds run, the privacy mechanisms and how the published adapter is chosen::

    classes = ["normal", "pneumonia"]      # label order; every hospital maps its labels to these
    [model]       lora_r, image_size, backbone, ...       (models.config.ModelConfig)
    [train]       local_epochs, batch_size, lr, ...       (models.config.TrainConfig)
    [federation]  rounds, strategy, min_hospitals, task   (server.config.FederationConfig)
    [privacy]     dpsgd, update_clip_norm, ...            (privacy.config.DPConfig)
    [evaluation]  select_by, prior, test_manifest         (EvaluationConfig)
    [segmentation] prompt, box_shift, slices per case      (models.config.SegmentationConfig)

A simulation's settings (``simulations.config.SimulationConfig``) are a study plus where its
simulated hospitals' data comes from; a coordinator reads only the study, holds no data and
never imports ``simulations``. ``medfed study check FILE`` reads a study as the coordinator
will; ``docs/study-reference.md`` is :func:`study_reference`'s output.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from core.settings import (
    SettingsError,
    allowed,
    default_of,
    field_help,
    load_settings,
    read_toml,
    setting,
    type_name,
)
from models.config import ModelConfig, SegmentationConfig, TrainConfig
from privacy.config import DPConfig
from server.config import FederationConfig

SELECT_BY = ("auc", "balanced_accuracy", "accuracy", "macro_f1", "dice", "dice_whole")
"""Combined validation metrics the published adapter can be chosen by (higher is better);
``dice`` and ``dice_whole`` are a segmentation study's (tight-box and automatic prompts)."""
SEGMENTATION_SELECT_BY = ("dice", "dice_whole")


@dataclass
class EvaluationConfig:
    """How the global adapter is judged and which one the run publishes.

    After every round each sampled hospital scores the global adapter on its own held-out
    split (``federation.fraction_evaluate`` of them) and sends metrics only; the coordinator
    combines them weighted by each hospital's number of examples.

    Attributes:
        select_by: the combined validation metric that chooses the published adapter: the run
            publishes the global adapter of the round where it is highest (a tie goes to the
            later round). A segmentation study (``model.backbone = "litemedsam"``) must choose
            ``dice`` (mean 3D Dice over the hospitals' validation cases, tight box prompts) or
            ``dice_whole`` (the whole slice as the box). Rounds no hospital evaluated are not
            candidates; with none at all the last round's adapter is published.
        prior: the class prior (one share per class, in ``classes`` order, summing to 1) of the
            population the published adapter will see. Hospitals train on logits shifted by
            their own class prior (``train.logit_adjust``), which learns a class-balanced rule;
            the published adapter's head bias gets ``log(prior)`` added so that its plain
            logits answer for this population. Empty: the adapter assumes equal class priors
            (recorded in ``summary.json``). Hospitals evaluate the adapter as published.
        test_manifest: optional: a test set the coordinator holds, as a manifest (CSV with
            ``path``, ``label`` and ``patient_id`` columns; paths relative to the manifest's
            folder and confined to it) of DICOM files, read by the reader the hospitals use
            (same guards against hostile files; labels mapped to ``classes`` by name; a
            multi-frame file gives its middle frame, a 3D backbone's row its volume). A
            relative path is taken from the study file's folder. Every round's published
            adapter is scored on it: ``test_*`` columns of ``metrics.csv``'s ``global`` rows,
            ``federated`` and ``test_set`` in ``summary.json``. Empty: the coordinator reads
            no data file. For a deployed coordinator (a simulation scores on its dataset's
            held-out test split instead).
    """

    select_by: str = setting("auc", choices=SELECT_BY)  # a segmentation study: "dice"
    prior: list[float] = field(default_factory=list)
    test_manifest: str = ""


@dataclass
class Study:
    """Everything a consortium agrees on for one study.

    Attributes:
        classes: the task's class names in label order, e.g. ``["normal", "pneumonia"]``.
            Every round's config carries them; each hospital maps its manifest's labels to them
            by name and refuses a study whose classes it cannot map. ``model.num_classes``
            follows from them. Empty: labels are class indices ``0 .. model.num_classes - 1``.
        model: the foundation model and its LoRA adapter (``[model]``).
        train: local training at each hospital, per round (``[train]``).
        federation: how rounds run (``[federation]``).
        privacy: the run's differential-privacy mechanisms (``[privacy]``).
        evaluation: federated evaluation and the choice of the published adapter
            (``[evaluation]``).
        segmentation: how hospitals train and score a segmentation backbone
            (``[segmentation]``; read only when ``model.backbone`` is one, e.g.
            ``litemedsam``: the backbone makes the study a segmentation study).
    """

    classes: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: DPConfig = field(default_factory=DPConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)

    def __post_init__(self) -> None:
        check_classes(self)
        check_ranks(self)
        check_segmentation(self)

    def study(self) -> Study:
        """Only the study's own settings (a subclass's extra settings left out)."""
        return Study(**{f.name: getattr(self, f.name) for f in fields(Study)})


def check_classes(study: Study) -> None:
    """Refuse class lists and priors that cannot work; fills ``model.num_classes``.

    Raises:
        ValueError: a repeated, empty or comma-holding class name, or a prior that does not fit.
    """
    names = study.classes
    if names:
        bad = [n for n in names if not n.strip() or "," in n]
        if bad:
            raise ValueError(f"classes = {names}: names must be non-empty and hold no comma "
                             f"(they travel comma-separated): {bad}")
        if len({n.casefold() for n in names}) != len(names):
            raise ValueError(f"classes = {names}: a name repeats (names match ignoring case)")
        if len(names) < 2:
            raise ValueError(f"classes = {names}: a classification task needs at least 2")
        study.model = replace(study.model, num_classes=len(names))
    prior = study.evaluation.prior
    if prior:
        if len(prior) != study.model.num_classes:
            raise ValueError(f"evaluation.prior = {prior}: needs one share per class "
                             f"({study.model.num_classes})")
        if any(p <= 0 for p in prior) or not math.isclose(sum(prior), 1.0, abs_tol=1e-3):
            raise ValueError(f"evaluation.prior = {prior}: shares must be > 0 and sum to 1")


def check_segmentation(study: Study) -> None:
    """A segmentation backbone's study: two classes (the background and one structure) and a
    Dice to choose the published round by.

    Raises:
        ValueError: naming the setting and what to write.
    """
    from models.registry import UnknownBackboneError, backbone_spec

    try:
        task = backbone_spec(study.model.backbone).task
    except UnknownBackboneError:
        return  # an hf: name or a typo: the registry refuses it where the model is built
    if task != "segmentation":
        return
    if study.model.num_classes != 2:
        raise ValueError(f"model.backbone = '{study.model.backbone}' segments one structure: "
                         f"classes names the background and it, e.g. [\"background\", "
                         f"\"hippocampus\"] (got {study.classes or study.model.num_classes})")
    if study.evaluation.select_by not in SEGMENTATION_SELECT_BY:
        raise ValueError(f"evaluation.select_by = '{study.evaluation.select_by}' is a "
                         f"classification metric: a segmentation study chooses its published "
                         f"round by one of {list(SEGMENTATION_SELECT_BY)}")


def check_ranks(study: Study) -> None:
    """Refuse HetLoRA ranks above the global LoRA rank when the study is read, not at every
    hospital in round 1 (a hospital's adapter is a truncation of the global one).

    Raises:
        ValueError: naming ``federation.options.hetlora_ranks`` and ``model.lora_r`` (the
            reader adds the file's name).
    """
    ranks = study.federation.options.hetlora_ranks
    above = [r for r in ranks if r > study.model.lora_r]
    if above:
        raise ValueError(f"federation.options.hetlora_ranks = {ranks}: {above} above "
                         f"model.lora_r = {study.model.lora_r}; each hospital's rank must be "
                         "at most the global rank (lower it, or raise model.lora_r)")


SET_ELSEWHERE = {  # their defaults stay accepted (every run's config.toml lists them)
    ("train", "proximal_mu"): "FedProx's weight is a strategy setting: [federation] strategy = "
                              "\"fedprox\" with [federation.options] proximal_mu; each round "
                              "sends it to the hospitals",
}
"""Settings a study file sets elsewhere: (table, key) -> where it belongs."""


def check_study_values(values: dict[str, Any], where: str) -> None:
    """What the typed reader cannot see alone: a setting that belongs elsewhere, and a file
    that names classes and sets another ``model.num_classes``.

    Raises:
        SettingsError: naming the key and what to do.
    """
    for (table, key), hint in SET_ELSEWHERE.items():
        section = values.get(table)
        if not isinstance(section, dict):
            continue
        # Its default stays accepted: every run's config.toml lists it.
        for name in (key, key.replace("_", "-")):
            if section.get(name, 0) not in (0, 0.0):
                raise SettingsError(f"{where}: {table}.{key} is not a study setting: {hint}")
    classes = values.get("classes")
    written = values.get("model", {}).get("num_classes") if isinstance(
        values.get("model"), dict) else None
    if classes and written is not None and written != len(classes):
        raise SettingsError(f"{where}: model.num_classes = {written} but classes names "
                            f"{len(classes)}: drop num_classes (it follows from classes)")


def study_from_values(values: dict[str, Any], where: str) -> Study:
    """A :class:`Study` from a parsed TOML table.

    Raises:
        SettingsError: an unknown or mistyped setting, or a value out of range; a simulation
            table (``[data]``, ``[failures]``...) is refused with a hint.
    """
    simulation = sorted(set(values) & SIMULATION_ONLY)
    if simulation:
        raise SettingsError(
            f"{where}: {simulation} are simulation settings (medfed simulate reads them); a "
            f"study for the coordinator holds only {sorted(f.name for f in fields(Study))}")
    check_study_values(values, where)
    return load_settings(Study, values, where)


def load_study(path: Path) -> Study:
    """Read and check the study file ``path``.

    Raises:
        SettingsError: unreadable file, invalid TOML, or a setting the study refuses; the
            message names the file, the key, the value and what is allowed.
    """
    study = study_from_values(read_toml(Path(path), f"study {path}"), f"study {path}")
    manifest = study.evaluation.test_manifest
    if manifest and not Path(manifest).expanduser().is_absolute():
        # Relative to the study file, wherever the coordinator is started from.
        resolved = str((Path(path).resolve().parent / manifest).resolve())
        study.evaluation = replace(study.evaluation, test_manifest=resolved)
    return study


def resolve_study(study: Study) -> Study:
    """Pin what defaults leave open, once, before the run starts: the base weights' hash and
    the initial adapter's hash (when one is named).

    Raises:
        FileNotFoundError: ``federation.initial_adapter`` names a file that does not exist.
    """
    from core.hashing import file_sha256
    from models.adapters import adapter_file
    from models.registry import weights_sha256

    model = replace(study.model, weights_sha256=study.model.weights_sha256
                    or weights_sha256(study.model.backbone))
    federation = study.federation
    if federation.initial_adapter and not federation.initial_adapter_sha256:
        # Pinned when the study starts: every round, baseline and resume uses this very file.
        start = adapter_file(Path(federation.initial_adapter))
        if not start.is_file():
            raise FileNotFoundError(f"federation.initial_adapter: {start} does not exist; give "
                                    "an adapter directory or file, or leave it empty")
        federation = replace(federation, initial_adapter_sha256=file_sha256(start))
    return replace(study, model=model, federation=federation)


SIMULATION_ONLY = {"data", "failures", "tracking", "baselines", "seed", "run_dir",
                   "cpus_per_hospital", "site_policy", "ledger_dir", "ray_address"}
"""Top-level keys of a simulation file that a study for the coordinator must not hold."""


# ------------------------------------------------------------------------- the reference


def settings_help(cls: type) -> dict[str, str]:
    """Each field's help for the reference: the ``Attributes:`` entry of ``cls``'s docstring,
    else that of the nearest base class that documents the field (a subclass that adds
    settings need not restate its base's help; an entry of its own overrides it)."""
    help_of: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        help_of |= field_help(base) if is_dataclass(base) else {}
    return help_of


def _rows(cls: type, prefix: str) -> list[tuple[str, list[list[str]]]]:
    """``(section, rows)`` for ``cls`` and its nested settings, in field order."""
    hints = typing.get_type_hints(cls)
    help_of = settings_help(cls)
    rows: list[list[str]] = []
    nested: list[tuple[str, list[list[str]]]] = []
    for f in fields(cls):
        hint = hints[f.name]
        if (prefix, f.name) in SET_ELSEWHERE:
            continue  # not a study setting (see SET_ELSEWHERE)
        if is_dataclass(hint):
            nested += _rows(hint, f"{prefix}.{f.name}" if prefix else f.name)
            continue
        default = default_of(f)
        rows.append([f"`{f.name}`", type_name(hint), f"`{_toml(default)}`",
                     allowed(f) or "", " ".join(help_of.get(f.name, "").split())])
    return [(prefix, rows), *nested]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def settings_reference(cls: type, title: str, intro: str) -> str:
    """A markdown reference of ``cls``'s settings, one table per TOML table."""
    lines = [f"# {title}", "", intro, ""]
    for section, rows in _rows(cls, ""):
        if not rows:
            continue
        lines += [f"## {'[' + section + ']' if section else 'top level'}", ""]
        lines += ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def study_reference() -> str:
    """``docs/study-reference.md``: every study setting with its type, default, limits and help,
    from the settings classes themselves (``python -m server.study > docs/study-reference.md``).
    """
    intro = ("Generated from the settings classes' own help text by `python -m server.study` "
             "(do not edit by hand; a test checks that this file matches). A study file is "
             "read by one typed reader: an unknown key, a value of the wrong type or a value "
             "outside what is allowed is refused when the file is read, naming the key, the "
             "value and what is allowed. `medfed study check FILE` reads a file as the "
             "coordinator will.")
    return settings_reference(Study, "Study settings", intro)


if __name__ == "__main__":
    print(study_reference(), end="")
