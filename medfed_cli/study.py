"""``medfed study ...``: read a study file as the coordinator will, and its reference."""

from __future__ import annotations

import argparse
from pathlib import Path

from medfed_cli.common import console


def cmd_study_check(args: argparse.Namespace) -> int:
    from server.study import load_study

    study = load_study(args.file)
    classes = ", ".join(study.classes) if study.classes else (
        f"{study.model.num_classes} (labels are indices)")
    prior = study.evaluation.prior or "equal class priors"
    privacy = study.privacy
    mechanisms = [name for name, on in (("DP-SGD", privacy.dpsgd),
                                        ("client-level DP", privacy.update_dp),
                                        ("secure aggregation",
                                         study.federation.secure_aggregation.enabled)) if on]
    lines = [
        f"{args.file}: a valid study",
        f"  task: {study.federation.task or '(undeclared)'}; classes: {classes}",
        f"  model: {study.model.backbone} at {study.model.image_size} px, LoRA rank "
        f"{study.model.lora_r}",
        f"  rounds: {study.federation.rounds} of {study.federation.strategy}, at least "
        f"{study.federation.min_hospitals} hospitals each",
        f"  privacy: {', '.join(mechanisms) or 'none'}",
        f"  published adapter: best combined validation {study.evaluation.select_by} (ties: "
        f"later round); prior: {prior}",
    ]
    console.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)
    return 0


def cmd_study_reference(args: argparse.Namespace) -> int:
    from server.study import study_reference

    console.print(study_reference(), markup=False, highlight=False, soft_wrap=True, end="")
    return 0


def add_study(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="a study file: what a consortium agrees to train")
    study_sub = study.add_subparsers(dest="study_command", required=True)
    check = study_sub.add_parser(
        "check", help="read a study file as the coordinator will: unknown keys, wrong types "
                      "and values out of range are refused, naming the key")
    check.add_argument("file", type=Path, help="the study TOML file")
    check.set_defaults(func=cmd_study_check)
    reference = study_sub.add_parser(
        "reference", help="every study setting with its type, default, limits and help")
    reference.set_defaults(func=cmd_study_reference)
