"""A segmentation simulation (``medfed simulate --scenario hippocampus-segmentation``).

Hospitals hold real MSD hippocampus MRI cases (NIfTI image and mask, ``data.dataset =
"hippocampus"``): a seeded split by case gives a fixed held-out test set the coordinator keeps
(``data.max_test_examples`` cases), and the training cases (``data.max_train_examples``) are
dealt to ``data.num_hospitals`` hospitals with power-law size skew; each hospital also gets its
own validation cases (``data.val_fraction`` of its training cases, at least one). Each
hospital is a segmentation manifest in ``RUN_DIR/sites/`` read by the real ClientApp, called
in this process (``simulations.inprocess.InProcessGrid``: Flower's messages and the real
round loop, without Ray); its cached image embeddings go to ``.embedding-cache`` beside the
run directory, so a rerun computes none again.

The published round is chosen on the hospitals' validation Dice; the test cases score it once
(and the pretrained network, zero-shot) in ``summary.json``: ``federated`` and ``pretrained``,
each with ``dice``, ``hd95``, ``dice_whole`` and ``hd95_whole``; ``dice_per_hospital`` holds
each hospital's validation Dice per round.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from peft import PeftModel

from client.app import build_client_app
from client.segmentation import segmentation_scores
from client.segmentation_site import SegmentationSite, mask_classes, slices_of
from imaging.segmentation import foreground, load_cases
from models.registry import backbone_spec
from models.segmentation import SliceSet, embedding_cache, make_slice_set, predict_masks
from privacy.secagg.local_consortium import local_consortium
from server.records import RunRecords
from server.rounds import initial_model, run_study_rounds, run_summary
from server.study import resolve_study
from simulations.bench.segmentation import case_counts, hippocampus_dir, split_cases
from simulations.config import SimulationConfig, config_dict
from simulations.inprocess import InProcessGrid
from simulations.report.runs import OVERLAY_FILE
from simulations.segmentation_baselines import segmentation_baselines
from simulations.site_privacy import simulated_site_privacy

logger = logging.getLogger(__name__)

DATASET = "hippocampus"
SITE_CLASSES = "background,hippocampus-anterior,hippocampus-posterior"
"""The MSD labels' names (values 0, 1, 2), as a hospital declares them in hospital.toml."""


def is_segmentation(config: SimulationConfig) -> bool:
    """Whether the simulation's backbone is a segmentation backbone."""
    try:
        return backbone_spec(config.model.backbone).task == "segmentation"
    except ValueError:
        return False


def resolve_segmentation(config: SimulationConfig) -> SimulationConfig:
    """Pins and the run directory; refuses a dataset other than the hippocampus cases."""
    if config.data.dataset != DATASET:
        raise ValueError(f"data.dataset = '{config.data.dataset}': a segmentation simulation "
                         f"reads the MSD hippocampus cases (dataset = \"{DATASET}\")")
    study = resolve_study(config.study())
    run_dir = config.run_dir or str(Path("runs") / f"{DATASET}-{datetime.now():%Y%m%d-%H%M%S}")
    privacy = replace(config.privacy,
                      dp_run_rounds=config.privacy.dp_run_rounds or config.federation.rounds,
                      update_hospitals=config.privacy.update_hospitals
                      or config.data.num_hospitals)
    return replace(config, model=study.model, federation=study.federation, run_dir=run_dir,
                   privacy=privacy)


def _manifest(path: Path, data: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["image,mask,patient_id,split"] + [
        f"{data / 'images' / f'hippocampus_{c}.nii.gz'},"
        f"{data / 'labels' / f'hippocampus_{c}.nii.gz'},{c},{split}" for c, split in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def hospital_rows(config: SimulationConfig) -> tuple[list[list[tuple[str, str]]], list[str]]:
    """Each hospital's manifest rows ``(case id, split)`` and the held-out test case ids.
    Deterministic in ``config.seed``."""
    hospitals = config.data.num_hospitals
    train_counts = case_counts(config.data.max_train_examples or 2 * hospitals, hospitals)
    val_counts = [max(1, round(config.data.val_fraction * n)) for n in train_counts]
    splits = split_cases(hippocampus_dir(), {"test": config.data.max_test_examples or 3,
                                             "val": sum(val_counts),
                                             "train": sum(train_counts)}, config.seed)
    train, val = iter(splits["train"]), iter(splits["val"])
    rows = [[(next(train), "train") for _ in range(train_counts[k])]
            + [(next(val), "val") for _ in range(val_counts[k])] for k in range(hospitals)]
    return rows, splits["test"]


def hospital_sites(config: SimulationConfig) -> tuple[dict[int, dict[str, Any]], Path]:
    """Each hospital's node config (its manifest written under ``RUN_DIR/sites``) and the
    coordinator's test manifest."""
    data, run_dir = hippocampus_dir(), Path(config.run_dir)
    rows, test_ids = hospital_rows(config)
    cache = run_dir.resolve().parent / ".embedding-cache"
    nodes: dict[int, dict[str, Any]] = {}
    for k, chosen in enumerate(rows):
        manifest = _manifest(run_dir / "sites" / f"hospital-{k}" / "manifest.csv", data, chosen)
        nodes[10 + k] = {"partition-id": k, "manifest": str(manifest), "classes": SITE_CLASSES,
                         "site-allowed-roots": str(data), "embedding-cache": str(cache)}
    test = _manifest(run_dir / "sites" / "test-manifest.csv", data,
                     [(c, "val") for c in test_ids])
    return nodes, test


def loopback_site(config: SimulationConfig, k: int, site: Path) -> dict[str, Any]:
    """Hospital ``k``'s cases as a segmentation manifest in its site folder, and the
    ``hospital.toml`` tables that point at it (``simulations.bench.deploy.SiteWriter``)."""
    data = hippocampus_dir()
    _manifest(site / "manifest.csv", data, hospital_rows(config)[0][k])
    return {"hospital": {"manifest": "manifest.csv", "classes": SITE_CLASSES.split(",")},
            "site_data": {"allowed_roots": [str(data)]}}


OVERLAY_CASES = 3


def save_overlays(path: Path, model: PeftModel, test: SliceSet, images: list[torch.Tensor],
                  index: list[int], cases: int = OVERLAY_CASES) -> None:
    """For up to ``cases`` test cases, the middle chosen slice ``(H, W)``, its true mask and
    ``model``'s tight-box prediction, as ``image_<k>``, ``truth_<k>``, ``predicted_<k>``."""
    predicted = predict_masks(model, test, "tight")
    arrays: dict[str, np.ndarray] = {}
    for k, number in enumerate(sorted(set(index))[:cases]):
        rows = [i for i, n in enumerate(index) if n == number]
        i = rows[len(rows) // 2]
        arrays |= {f"image_{k}": images[i].numpy(), f"truth_{k}": test.masks[i].numpy(),
                   f"predicted_{k}": predicted[i].numpy()}
    np.savez_compressed(path, **arrays)


def score_test_cases(model: PeftModel, manifest: Path, config: SimulationConfig,
                     cache: Path, overlays: Path | None = None) -> dict[str, float]:
    """Mean 3D Dice and HD95 (both prompt modes) of ``model`` over the test cases;
    ``overlays``: also save a few test slices with their masks there (:func:`save_overlays`)."""
    declared, structure = mask_classes(SITE_CLASSES.split(","), config.classes)
    cases, _ = load_cases(manifest, declared, (hippocampus_dir(),))
    cases = [c for c in cases if foreground(c.mask, structure).any()]
    images, masks, index, gaps = slices_of(cases, config.segmentation.eval_slices_per_case,
                                           structure)
    test = make_slice_set(model.get_base_model(), images, masks, index, embedding_cache(cache))
    spacing = [(float(s[0] * g), float(s[1]), float(s[2])) for s, g in zip(
        (nib.affines.voxel_sizes(c.affine) for c in cases), gaps, strict=True)]
    site = SegmentationSite(train=test, val=test, train_patients=len(cases),
                            val_spacing=spacing)
    if overlays is not None:
        save_overlays(overlays, model, test, images, index)
    return segmentation_scores(model, site)


def _per_hospital(records: RunRecords) -> dict[str, list[float | None]]:
    """Each hospital's validation Dice per round (``None`` where it did not evaluate)."""
    rows = [r for r in records.train_rows() if r["round"] > 0]
    rounds = sorted({r["round"] for r in rows})
    out: dict[str, list[float | None]] = {}
    for hospital in sorted({r["hospital"] for r in rows}):
        by_round = {r["round"]: r.get("val_dice") for r in rows if r["hospital"] == hospital}
        out[hospital] = [by_round.get(n) for n in rounds]
    return out


def run_segmentation_study(config: SimulationConfig) -> dict[str, Any]:
    """Run the federated rounds, score the published adapter and the pretrained network on
    the test cases; write and return ``summary.json``'s data.

    Raises:
        FederationError: a round ended with too few hospitals.
    """
    config = resolve_segmentation(config)
    records = RunRecords(Path(config.run_dir))
    records.write_config(config_dict(config))
    nodes, test_manifest = hospital_sites(config)
    identity = ({} if not config.federation.secure_aggregation.enabled else
                {"load_identity": local_consortium(list(range(config.data.num_hospitals)))})
    app = build_client_app(load_privacy=simulated_site_privacy(config), **identity)
    study = config.study()
    outcome = run_study_rounds(InProcessGrid(app, nodes), study, records)
    cache = Path(next(iter(nodes.values()))["embedding-cache"])
    summary = {"dataset": DATASET, "task_type": "segmentation"} | run_summary(records, study,
                                                                            outcome)
    summary["federated"] = score_test_cases(outcome.model, test_manifest, config, cache,
                                            Path(config.run_dir) / OVERLAY_FILE)
    pretrained = initial_model(study.model, study.train.seed)
    summary["pretrained"] = score_test_cases(pretrained, test_manifest, config, cache)
    summary |= segmentation_baselines(
        study, nodes, lambda model: score_test_cases(model, test_manifest, config, cache),
        list(config.baselines))
    summary["dice_per_hospital"] = _per_hospital(records)
    summary["cases_per_hospital"] = [sum(1 for line in Path(n["manifest"]).read_text()
                                         .splitlines() if line.endswith(",train"))
                                     for n in nodes.values()]
    summary["seconds_per_round"] = outcome.wall_time_s / max(1, config.federation.rounds)
    records.write_summary(summary)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What ``medfed simulate`` prints for a segmentation run."""
    def row(name: str) -> str:
        m = summary[name]
        return (f"{name:<11} dice {m['dice']:.4f}  hd95 {m['hd95']:.2f} mm  |  automatic "
                f"dice {m['dice_whole']:.4f}  hd95 {m['hd95_whole']:.2f} mm")

    lines = [f"{summary['dataset']}: {summary['hospitals']} hospitals, {summary['rounds']} "
             f"rounds, published round {summary['published']['round']} (test cases)",
             row("federated"), row("pretrained"),
             *(row(name) for name in ("pooled", "local") if name in summary)]
    if "best_hospital" in summary:
        best = summary["best_hospital"]
        lines.append(f"best hospital alone (#{best['hospital']}, chosen on all validation "
                     f"cases): dice {best['dice']:.4f}  hd95 {best['hd95']:.2f} mm")
    lines.append("validation Dice per hospital and round:")
    for hospital, values in summary["dice_per_hospital"].items():
        shown = ", ".join("-" if v is None or (isinstance(v, float) and math.isnan(v))
                          else f"{v:.3f}" for v in values)
        lines.append(f"  hospital {hospital}: {shown}")
    lines.append(f"seconds per round: {summary['seconds_per_round']:.1f}")
    return lines

