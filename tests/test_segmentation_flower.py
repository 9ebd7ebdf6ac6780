"""Segmentation through the real ClientApp and round loop, in process, on real hippocampus MRI:
two hospitals with NIfTI manifests train LoRA on LiteMedSAM's mask decoder over cached
embeddings for two rounds; each reports 3D Dice and HD95 in both prompt modes; the coordinator
publishes the round chosen on validation Dice with a segmentation card; every reply is in the
hospital's egress audit log. Then what a hostile coordinator or file can send is refused."""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from client.app import build_client_app
from client.round_config import RoundConfigError, read_round_config
from imaging.segmentation import load_cases
from models.adapters import adapter_state, load_adapter_file
from models.config import ModelConfig, SegmentationConfig, TrainConfig, to_config_record
from models.registry import SEGMENTATION_BACKBONE, weights_sha256
from models.segmentation import SliceSet, build_segmenter
from server.config import FederationConfig
from server.records import RunRecords
from server.rounds import initial_model, run_federation
from server.study import EvaluationConfig
from simulations.inprocess import InProcessGrid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus"
SITES = {0: (["001", "003"], "004"), 1: (["006", "007"], "008")}
CLASSES = ["background", "hippocampus"]
SITE_CLASSES = "background,hippocampus-anterior,hippocampus-posterior"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is not here")


def _manifest(folder: Path, train: list[str], val: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(case, "train") for case in train] + [(val, "val")]
    lines = ["image,mask,patient_id,split"] + [
        f"{DATA / 'images' / f'hippocampus_{c}.nii.gz'},"
        f"{DATA / 'labels' / f'hippocampus_{c}.nii.gz'},p{c},{split}" for c, split in rows]
    path = folder / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _node_configs(root: Path, cache: Path) -> dict[int, dict[str, str]]:
    return {10 + k: {"partition-id": k, "manifest": str(_manifest(root / f"h{k}", *cases)),
                     "classes": SITE_CLASSES, "site-allowed-roots": str(DATA),
                     "embedding-cache": str(cache), "audit-log": str(root / f"audit{k}.jsonl")}
            for k, cases in SITES.items()}


MODEL = ModelConfig(backbone=SEGMENTATION_BACKBONE, image_size=256, lora_r=4, lora_alpha=8)
TRAIN = TrainConfig(local_steps=2, batch_size=2, lr=3e-3)
SEGMENTATION = SegmentationConfig(train_slices_per_case=1, eval_slices_per_case=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmentation-flower")
    grid = InProcessGrid(build_client_app(), _node_configs(root, root / "cache"))
    model = replace(MODEL, weights_sha256=weights_sha256(SEGMENTATION_BACKBONE))
    records = RunRecords(root / "run")
    run_federation(grid, FederationConfig(rounds=2, min_hospitals=2, task="hippocampus-mri"),
                   model, TRAIN, None, records, classes=CLASSES,
                   evaluation=EvaluationConfig(select_by="dice"), segmentation=SEGMENTATION)
    return root, model


def test_two_rounds_train_report_dice_and_publish_a_segmentation_card(run):
    root, model = run
    rows = list(csv.DictReader((root / "run" / "metrics.csv").open()))
    hospitals = [r for r in rows if r["hospital"] != "global"]
    assert {(r["round"], r["hospital"]) for r in hospitals} == {
        (str(n), h) for n in (1, 2) for h in ("0", "1")}
    for row in hospitals:  # per hospital and round: both prompt modes, 3D Dice and HD95
        assert row["num_examples"] == "2" and row["val_examples"] == "1"  # 2 slices, 1 case
        for name in ("dice", "dice_whole"):
            assert 0.0 <= float(row[f"val_{name}"]) <= 1.0
        for name in ("hd95", "hd95_whole"):
            assert float(row[f"val_{name}"]) >= 0.0
        assert row["val_auc"] == ""  # no classification metric is made up
    # The published round is the one with the best combined validation Dice.
    combined = {r["round"]: float(r["val_dice"]) for r in rows if r["hospital"] == "global"
                and r["round"] != "0"}
    card = json.loads((root / "run" / "adapter" / "card.json").read_text())
    assert combined[str(card["published_round"])] == max(combined.values())
    assert card["task"] == "segmentation" and card["classes"] == CLASSES
    assert card["model"]["backbone"] == SEGMENTATION_BACKBONE
    assert (card["model"]["lora_r"], card["model"]["lora_alpha"]) == (4, 8)
    assert card["model"]["lora_targets"] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert card["decision"]["select_by"] == "dice"
    # The published adapter moved away from the run's initial adapter.
    published = load_file(str(root / "run" / "adapter" / "adapter_model.safetensors"))
    start = adapter_state(initial_model(model, TRAIN.seed))
    assert set(published) == set(start)
    assert sum(float((published[k] - start[k]).abs().sum()) for k in start) > 0
    # What 'medfed predict' rebuilds from the card alone, holding the published adapter.
    rebuilt = build_segmenter(card["model"]["lora_r"], card["model"]["lora_alpha"],
                              tuple(card["model"]["lora_targets"]))
    load_adapter_file(rebuilt, root / "run" / "adapter")
    assert all(adapter_state(rebuilt)[k].equal(published[k]) for k in published)
    # 'medfed predict' itself accepts it: every pin on the card matches this code's.
    from inference.published import load_published

    loaded = load_published(root / "run" / "adapter", device="cpu")
    assert loaded.card.task == "segmentation"
    # The report plots each hospital's validation Dice and HD95 per round from metrics.csv.
    import pandas as pd

    from simulations.report.figures import Figures
    from simulations.report.page import run_figures
    from simulations.report.runs import Run

    figures = Figures()
    run_metrics = Run(root / "run", {}, pd.read_csv(root / "run" / "metrics.csv"), {})
    assert "hospital-dice" in run_figures(run_metrics, None, figures, "")
    assert figures.items["hospital-dice"][2][:4] == b"\x89PNG"


def test_every_reply_is_in_the_hospitals_audit_log(run):
    root, _ = run
    for k in SITES:
        lines = [json.loads(line) for line in (root / f"audit{k}.jsonl").read_text().splitlines()]
        kinds = [line.get("message_type") for line in lines]
        assert kinds.count("train") == 2 and kinds.count("evaluate") >= 2, kinds


def _record(**changes) -> dict:
    record = to_config_record(MODEL, TRAIN, SEGMENTATION)
    record["server-round"] = 1
    for key, value in changes.items():
        record[key] = value
    return record


@pytest.mark.parametrize(("key", "value"), [("box-shift", 100_000),
                                            ("train-slices-per-case", 10**9),
                                            ("eval-slices-per-case", -1), ("prompt", "oracle"),
                                            ("lr", 1e6), ("box-shift", 2.5)])
def test_a_hostile_segmentation_round_config_is_refused(key, value):
    from flwr.app import ConfigRecord

    assert read_round_config(ConfigRecord(_record())).segmentation == SEGMENTATION
    with pytest.raises(RoundConfigError, match=key):
        read_round_config(ConfigRecord(_record(**{key: value})))


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_hostile_masks_are_row_problems_not_tracebacks(tmp_path):
    image = _nifti(tmp_path / "img.nii.gz", np.random.default_rng(0).random((8, 9, 7),
                                                                             dtype=np.float32))
    mask = np.zeros((8, 9, 7), np.uint8)
    mask[3:5, 3:5, 3:5] = 1
    # A header declaring 32767^3 voxels over 10 MB of zeros, gzipped: about 10 kB on disk.
    bomb = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.eye(4))
    bomb.header.set_data_shape((32767, 32767, 32767))
    raw = bomb.header.binaryblock + b"\0" * 4 + bytes(10_000_000)
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(raw))
    rows = [(image, _nifti(tmp_path / "moved.nii.gz", mask, np.diag([1.0, 1.0, 3.0, 1.0]))),
            (image, str(tmp_path / "bomb.nii.gz")), (str(tmp_path / "bomb.nii.gz"), image)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,mask,patient_id,split\n" + "".join(
        f"{a},{b},p{i},train\n" for i, (a, b) in enumerate(rows)))
    cases, problems = load_cases(manifest, classes=(0, 1))
    assert cases == []
    kinds = {p.row: (p.kind, p.reason) for p in problems}
    assert kinds[2][0] == "bad-values" and "affine" in kinds[2][1]
    for row in (3, 4):
        assert kinds[row][0] == "too-large" and "bomb.nii.gz" in kinds[row][1]


def _train_message(model: ModelConfig, dp, server_round: int = 1):
    from flwr.app import ArrayRecord

    from simulations.inprocess import coordinator_message

    config = to_config_record(model, TRAIN, SEGMENTATION, dp)
    config["server-round"] = server_round
    config["classes"] = CLASSES
    arrays = ArrayRecord(adapter_state(initial_model(model, TRAIN.seed)))
    return coordinator_message("train", arrays, config)


def _hospital(root: Path, node: int = 10):
    from flwr.app import Context, RecordDict

    config = _node_configs(root, root / "cache")[node]  # the run's cached embeddings
    return Context(run_id=3, node_id=node, node_config=config, state=RecordDict(),
                   run_config={})


def test_client_level_dp_clips_and_noises_a_segmentation_update(run):
    from privacy.config import DPConfig

    root, model = run
    dp = DPConfig(update_clip_norm=0.05, update_noise_multiplier=1.0, update_hospitals=2)
    reply = build_client_app()(_train_message(model, dp), _hospital(root))
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content.metric_records["metrics"]
    assert metrics["update-weight"] == 1.0 and metrics["dp-epsilon"] > 0
    assert "train-loss" not in metrics  # the raw loss is not covered by the accounting
    sent = reply.content.array_records["arrays"].to_torch_state_dict()
    start = adapter_state(initial_model(model, TRAIN.seed))
    # Noise at sigma * clip / sqrt(hospitals) per coordinate: far past the 0.05 clip.
    norm = sum(float((sent[k] - start[k]).pow(2).sum()) for k in start) ** 0.5
    assert norm > 0.05 * 10


def test_dp_sgd_is_refused_for_segmentation_with_a_reason(run):
    from client.privacy_round import REFUSAL_CODE
    from privacy.config import DPConfig

    root, model = run
    reply = build_client_app()(_train_message(model, DPConfig(dpsgd=True,
                                                               dp_noise_multiplier=1.0)),
                               _hospital(root, 11))
    assert reply.has_error() and reply.error.code == REFUSAL_CODE
    assert "DP-SGD is not available for segmentation" in reply.error.reason


def test_the_scenario_deals_cases_with_size_skew_and_keeps_test_cases_apart(tmp_path):
    from simulations.scenarios import load_scenario
    from simulations.segmentation_study import hospital_sites, is_segmentation

    config = replace(load_scenario("hippocampus-segmentation"), run_dir=str(tmp_path / "run"))
    assert is_segmentation(config) and config.evaluation.select_by == "dice"
    nodes, test = hospital_sites(config)

    def cases(manifest, split=None):
        rows = list(csv.DictReader(Path(manifest).open()))
        return [r["patient_id"] for r in rows if split is None or r["split"] == split]

    train = [cases(n["manifest"], "train") for n in nodes.values()]
    assert len(train) == 5 and sum(map(len, train)) == config.data.max_train_examples
    assert len(train[0]) > len(train[-1])  # power-law size skew
    assert all(cases(n["manifest"], "val") for n in nodes.values())  # each validates
    held_out = set(cases(test))
    assert len(held_out) == config.data.max_test_examples
    everyone = [c for n in nodes.values() for c in cases(n["manifest"])]
    assert len(set(everyone)) == len(everyone) and not held_out & set(everyone)
    again, _ = hospital_sites(config)  # the same seed deals the same cases
    assert [cases(n["manifest"]) for n in again.values()] == [cases(n["manifest"])
                                                             for n in nodes.values()]


@pytest.mark.slow  # two more federations and a third hospital's embeddings: minutes on CPU
def test_a_segmentation_round_under_secure_aggregation_gives_the_plain_rounds_adapter(run):
    """SecAgg+ works unchanged for segmentation: three hospitals' masked updates unmask to
    the sum the plain round averages (to the quantization step)."""
    from privacy.secagg import SecAggConfig
    from privacy.secagg.local_consortium import local_consortium

    root, model = run
    nodes = _node_configs(root, root / "cache")
    third = root / "h2"
    nodes[12] = {**nodes[11], "partition-id": 2, "manifest": str(_manifest(third, ["011"],
                                                                         "014")),
                 "audit-log": str(root / "audit2.jsonl")}
    adapters = {}
    for secure in (False, True):
        app = build_client_app(load_identity=local_consortium([0, 1, 2]))
        federation = FederationConfig(rounds=1, min_hospitals=3, fraction_evaluate=0.0,
                                      secure_aggregation=SecAggConfig(enabled=secure))
        outcome = run_federation(InProcessGrid(app, nodes), federation, model, TRAIN, None,
                                 RunRecords(root / f"secure-{secure}"), classes=CLASSES,
                                 evaluation=EvaluationConfig(select_by="dice"),
                                 segmentation=SEGMENTATION)
        adapters[secure] = adapter_state(outcome.model)
    start = adapter_state(initial_model(model, TRAIN.seed))
    moved = max(float((adapters[False][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-4  # the round trained
    gap = max(float((adapters[True][k] - adapters[False][k]).abs().max()) for k in start)
    assert gap < moved / 20, (gap, moved)


def test_the_study_check_reads_a_segmentation_site_without_embedding_it(tmp_path):
    from flwr.app import Context, RecordDict

    from client.privacy_round import site_privacy_from_node_config
    from client.study_check import study_checks
    from privacy.config import DPConfig

    def answers(dp: DPConfig, site_classes: str = SITE_CLASSES) -> dict[str, str]:
        node = _node_configs(tmp_path, tmp_path / "cache")[10] | {"classes": site_classes}
        context = Context(run_id=1, node_id=10, node_config=node, state=RecordDict(),
                          run_config={})
        config = to_config_record(MODEL, TRAIN, SEGMENTATION, dp)
        config["classes"] = CLASSES
        return {i.name: i.answer for i in study_checks(config, context, None,
                                                       site_privacy_from_node_config)}

    plain = answers(DPConfig(update_clip_norm=0.1, update_noise_multiplier=1.0))
    assert set(plain.values()) == {"pass"} and {"data", "classes", "dp-sgd"} <= set(plain)
    assert answers(DPConfig(dpsgd=True, dp_noise_multiplier=1.0))["dp-sgd"].startswith(
        "fail: DP-SGD is not available for segmentation")
    refused = answers(DPConfig(), "background,amygdala")["classes"]
    assert "amygdala" in refused and "hippocampus" in refused
    assert not (tmp_path / "cache").exists()  # nothing was embedded


def test_a_simulated_run_keeps_test_overlays_and_the_report_draws_them(tmp_path):
    from simulations.report.figures import fig_overlays
    from simulations.report.runs import OVERLAY_FILE
    from simulations.scenarios import load_scenario
    from simulations.segmentation_study import (
        hospital_sites,
        resolve_segmentation,
        score_test_cases,
    )

    config = replace(load_scenario("hippocampus-segmentation"), run_dir=str(tmp_path / "run"))
    config = resolve_segmentation(replace(
        config, data=replace(config.data, max_test_examples=1),
        segmentation=replace(config.segmentation, eval_slices_per_case=1)))
    _, test = hospital_sites(config)
    model = initial_model(config.study().model, 0)  # the pretrained network, LoRA at zero
    overlays = tmp_path / "run" / OVERLAY_FILE
    scores = score_test_cases(model, test, config, tmp_path / "cache", overlays)
    assert 0.0 <= scores["dice"] <= 1.0
    with np.load(overlays) as data:
        assert sorted(data.files) == ["image_0", "predicted_0", "truth_0"]
        assert data["image_0"].shape == data["truth_0"].shape == data["predicted_0"].shape
        assert data["truth_0"].any()  # a slice that holds the structure
    fig = fig_overlays(overlays)
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "test case 1"


def test_pooled_slices_keep_each_hospitals_cases_apart():
    from simulations.segmentation_baselines import pool_slices

    def slices(cases: list[int]) -> SliceSet:
        n = len(cases)
        return SliceSet(torch.zeros(n, 1), torch.zeros(n, 2), [torch.zeros(2, 2)] * n,
                        torch.zeros(n, 4), torch.zeros(n, 4), torch.tensor(cases))

    pooled = pool_slices([slices([0, 0, 1]), slices([0, 1, 1])])
    assert pooled.cases.tolist() == [0, 0, 1, 2, 3, 3] and len(pooled) == 6


@pytest.mark.slow  # a whole tiny scenario in process: federation, baselines, test scoring
def test_the_scenario_runs_with_its_baselines_chosen_on_validation(tmp_path):
    from simulations.report.runs import OVERLAY_FILE
    from simulations.scenarios import load_scenario
    from simulations.segmentation_study import run_segmentation_study

    config = load_scenario("hippocampus-segmentation")
    config = replace(config, run_dir=str(tmp_path / "run"),
                     data=replace(config.data, num_hospitals=3, max_train_examples=3,
                                  max_test_examples=1),
                     segmentation=replace(config.segmentation, train_slices_per_case=1,
                                          eval_slices_per_case=1),
                     federation=replace(config.federation, rounds=2, min_hospitals=3))
    summary = run_segmentation_study(config)
    for name in ("federated", "pretrained", "pooled", "local"):
        assert 0.0 <= summary[name]["dice"] <= 1.0 and summary[name]["hd95"] >= 0.0
    assert len(summary["local_per_hospital"]) == 3
    best = summary["best_hospital"]
    assert best["dice"] == summary["local_per_hospital"][best["hospital"]]["dice"]
    assert summary["local"]["dice"] == pytest.approx(
        np.mean([s["dice"] for s in summary["local_per_hospital"]]))
    assert (tmp_path / "run" / OVERLAY_FILE).is_file()
