"""A study as a new consortium runs it: DICOM files at the hospitals, a coordinator with no data.

``python -m simulations.bench real-study`` prepares three hospitals' site folders, each with its
own DICOM files (a MedMNIST partition written as DICOM, ``simulations.dicom_export``), a
manifest whose labels are class names and a ``hospital.toml`` declaring those names (hospital 1
lists them in another order: labels are matched by name), and a study file that names the
classes. Then the coordinator runs the study with its data folder (``MEDFED_DATA_DIR``) pointed
at an empty folder: every round the hospitals train and then evaluate the global adapter on
their own held-out split, the coordinator combines their results and publishes the best round.

The hospitals are called in the coordinator's process (``simulations.inprocess.InProcessGrid``
with medfed's ClientApp reading each site folder's node config, as ``medfed hospital start``
gives it). While the study runs, an audit hook (:func:`sys.addaudithook`) counts every file
opened under the MedMNIST folders and the coordinator's data folder, and every outgoing network
connection; the hospitals read only their own DICOM folders, so the count is the coordinator's.
It prints ``federated eval auc: <x>`` (the combined validation AUC of the published round) and
``coordinator data files read: <n>``. The last hospital answers one evaluation per run
(``max_evaluations_per_run = 1``), so from round 2 it refuses to evaluate: ``rounds lost to an
evaluation refusal: <n>`` counts the rounds whose training did not count (0: a refusal never
voids a round's training), beside ``hospital rounds not evaluated: <n>``. Then the hospital and
coordinator guides are walked as written (:mod:`simulations.bench.guide_walk`: their commands in
order on a fresh folder with real DICOM files, the study run by real daemons on loopback):
``guide steps that failed: <n> of <m>`` (``--no-guide`` skips it). The coordinator is set up by
the deployed ServerApp's own code (``server.deployment_app.deployment_server_run``).
``--test-images N`` gives it a test set of its own (``evaluation.test_manifest``: N MedMNIST test
images written as DICOM, outside the audited folders) and prints ``coordinator test auc: <x>``
too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import Context, RecordDict

from client.site_folder import CONFIG_FILE, init_site_folder, load_hospital_config, node_config
from server.deployment_app import RUN_DIR_KEY, STUDY_KEY, deployment_server_run
from server.rounds import run_study_rounds, run_summary
from simulations.config import DataConfig
from simulations.datasets import search_dirs

CLASSES = ["normal", "pneumonia"]
STUDY = {
    "classes": CLASSES,
    "model": {"image_size": 32, "lora_r": 4, "lora_alpha": 8},
    "train": {"batch_size": 16, "local_steps": 4, "lr": 2e-3},
    "federation": {"rounds": 3, "min_hospitals": 3, "fraction_evaluate": 1.0,
                   "task": "pneumonia-cxr", "round_timeout_s": 600.0},
    "evaluation": {"select_by": "auc"},
}


def prepare_hospitals(root: Path, hospitals: int, train_per_hospital: int, image_size: int,
                      seed: int = 0, evaluations: dict[int, int] | None = None) -> list[Path]:
    """Site folders ``root/hospital-<k>``: DICOM files, a manifest with class names, and a
    ``hospital.toml`` naming the classes (hospital 1 in reverse order) and its decoded-image
    cache (``[site_data]``). ``evaluations``: hospital index -> its run policy's
    ``max_evaluations_per_run`` (default 10). Reads MedMNIST: done before the coordinator
    starts."""
    from simulations.dicom_export import export_site
    from simulations.sites import hospital_site

    data = DataConfig(num_hospitals=hospitals, partition="iid",
                      max_train_examples=hospitals * train_per_hospital, val_fraction=0.3)
    sites = []
    for k in range(hospitals):
        site = root / f"hospital-{k}"
        init_site_folder(site, f"hospital-{k}")
        export_site(hospital_site(data, image_size, seed, k), site / "data", k, CLASSES)
        hospital = asdict(load_hospital_config(site)) | {
            "manifest": "data/manifest.csv", "privacy_policy": "",
            "classes": CLASSES[::-1] if k == 1 else CLASSES}
        # The template allows nothing: approve this study's app, backbone and task.
        (site / "run-policy.toml").write_text(tomli_w.dumps({
            "allowed_apps": ["medfed/medfed-app"],
            "allowed_backbones": ["efficientnet-lite0-imagenet"],
            "allowed_tasks": [STUDY["federation"]["task"]],
            "max_evaluations_per_run": (evaluations or {}).get(k, 10),
            "max_evaluations_per_day": 40}))
        (site / CONFIG_FILE).write_text(tomli_w.dumps({
            "hospital": hospital,
            "site_data": {"cache_dir": str(site / "cache"), "max_error_fraction": 0.0}}))
        sites.append(site)
    return sites


@dataclass
class FileAudit:
    """Files opened under ``watched`` folders and network connections, while ``active``."""

    watched: list[Path]
    opened: list[str] = field(default_factory=list)
    connections: list[str] = field(default_factory=list)
    active: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
            path = os.path.abspath(os.fsdecode(args[0]))
            if any(path == str(w) or path.startswith(str(w) + os.sep) for w in self.watched):
                with self._lock:
                    self.opened.append(path)
        elif event == "socket.connect":
            with self._lock:
                self.connections.append(repr(args[1]))


_AUDIT: FileAudit | None = None


@contextmanager
def audited(watched: list[Path]):
    """Count opens under ``watched`` while the block runs (one process-wide audit hook: Python
    cannot remove one, so it is installed once and switched on and off)."""
    global _AUDIT
    if _AUDIT is None:
        _AUDIT = FileAudit([])
        sys.addaudithook(lambda event, args: _AUDIT(event, args) if _AUDIT else None)
    _AUDIT.watched = [Path(w).resolve() for w in watched]
    _AUDIT.opened, _AUDIT.connections = [], []
    _AUDIT.active = True
    try:
        yield _AUDIT
    finally:
        _AUDIT.active = False


def run_coordinator(study_file: Path, sites: list[Path], run_dir: Path,
                    data_dir: Path) -> tuple[dict[str, Any], FileAudit]:
    """Run the study with the coordinator's data folder at ``data_dir`` (empty); the hospitals
    are ``sites``. Returns ``summary.json``'s content and the audit of the run."""
    from client.app import build_client_app
    from simulations.inprocess import InProcessGrid

    watched = [data_dir, *[d for d in search_dirs() if d.is_dir()]]
    saved = os.environ.get("MEDFED_DATA_DIR")
    os.environ["MEDFED_DATA_DIR"] = str(data_dir)
    try:
        with audited(watched) as audit:
            # What the deployed ServerApp does with its run config (server.deployment_app).
            run = deployment_server_run(Context(
                run_id=1, node_id=0, node_config={}, state=RecordDict(),
                run_config={STUDY_KEY: str(study_file), RUN_DIR_KEY: str(run_dir)}))
            grid = InProcessGrid(build_client_app(), {
                k + 1: node_config(site, load_hospital_config(site))
                for k, site in enumerate(sites)})
            outcome = run_study_rounds(grid, run.study, run.records, run.test_set)
            summary = run_summary(run.records, run.study, outcome)
            run.records.write_summary(summary)
            summary = json.loads((run_dir / "summary.json").read_text())
    finally:
        if saved is None:
            os.environ.pop("MEDFED_DATA_DIR", None)
        else:
            os.environ["MEDFED_DATA_DIR"] = saved
    return summary, audit


def write_test_set(folder: Path, images: int, image_size: int, seed: int = 0) -> Path:
    """``images`` of MedMNIST's official test split as DICOM files and a manifest with class
    names under ``folder``: a coordinator's own test set. Returns the manifest."""
    from client.site import SiteData
    from models.data import ImageSet
    from simulations.dicom_export import export_site
    from simulations.sites import held_out_test_set

    test = held_out_test_set(DataConfig(max_test_examples=images), image_size, seed)
    none = ImageSet(test.images[:0], test.labels[:0])
    return export_site(SiteData(train=test, val=none), folder, 0, CLASSES)


def run_real_study(root: Path, hospitals: int = 3, rounds: int = 3,
                   train_per_hospital: int = 80, test_images: int = 0,
                   evaluations: dict[int, int] | None = None) -> tuple[dict[str, Any], FileAudit]:
    """Prepare the hospitals and the study under ``root``, then run it (``root/run``).
    ``test_images`` > 0: the study names a coordinator-held test set of that many images
    (``root/coordinator-test-set``); its files are not in the audited folders.
    ``evaluations``: as for :func:`prepare_hospitals`."""
    root = Path(root)
    study = STUDY | {"federation": STUDY["federation"] | {"rounds": rounds,
                                                          "min_hospitals": hospitals}}
    sites = prepare_hospitals(root, hospitals, train_per_hospital,
                              study["model"]["image_size"], evaluations=evaluations)
    if test_images:
        manifest = write_test_set(root / "coordinator-test-set", test_images,
                                  study["model"]["image_size"])
        study |= {"evaluation": study["evaluation"] | {
            "test_manifest": str(manifest.relative_to(root))}}
    study_file = root / "study.toml"
    study_file.write_text(tomli_w.dumps(study))
    data_dir = root / "coordinator-data"
    data_dir.mkdir(exist_ok=True)
    return run_coordinator(study_file, sites, root / "run", data_dir)


def trained_rounds(metrics_csv: Path) -> set[int]:
    """The rounds in which at least one hospital's training update counted (a hospital row
    with examples and no error)."""
    import csv

    with open(metrics_csv, newline="") as handle:
        return {int(row["round"]) for row in csv.DictReader(handle)
                if row["hospital"] != "global" and row["num_examples"] and not row["error"]}


def walk_guides_line(root: Path) -> str:
    """Walk the guides under ``root`` and say how many of their steps failed (each failure
    is logged with the guide's line)."""
    from simulations.bench.guide_walk import walk_guides

    outcomes = walk_guides(root)
    failed = [o for o in outcomes if o.problem]
    for o in failed:
        print(f"  {o.step.guide}-guide.md:{o.step.line}: {o.command}: {o.problem}")
    return f"guide steps that failed: {len(failed)} of {len(outcomes)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.bench real-study")
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-per-hospital", type=int, default=80,
                        help="images per hospital, 30%% of them held out for its evaluation")
    parser.add_argument("--test-images", type=int, default=0,
                        help="give the coordinator a test set of this many MedMNIST test "
                             "images as DICOM files (evaluation.test_manifest; default: none)")
    parser.add_argument("--keep", type=Path, help="keep the folders here (default: temporary)")
    parser.add_argument("--no-guide", action="store_true",
                        help="do not walk the hospital and coordinator guides")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="medfed-real-study-"))
    # The last hospital evaluates once: its refusals from round 2 must not void training.
    summary, audit = run_real_study(root, args.hospitals, args.rounds, args.train_per_hospital,
                                    args.test_images, evaluations={args.hospitals - 1: 1})
    print(json.dumps({"published": summary["published"], "validation": summary["validation"],
                      "validation_per_hospital": summary["validation_per_hospital"]}, indent=2))
    print(f"run directory: {root / 'run'}")
    print(f"federated eval auc: {summary['validation']['auc']:.4f}")
    if "federated" in summary:
        print(f"coordinator test auc: {summary['federated']['auc']:.4f} "
              f"({summary['test_set']['usable_rows']} images)")
    print(f"coordinator network connections: {len(audit.connections)}")
    print(f"coordinator data files read: {len(audit.opened)}")
    lost = set(range(1, args.rounds + 1)) - trained_rounds(root / "run" / "metrics.csv")
    print(f"hospital rounds not evaluated: {len(summary['not_evaluated'])}")
    print(f"rounds lost to an evaluation refusal: {len(lost)}")
    if not args.no_guide:
        print(walk_guides_line(root / "guide"))
    return 0
