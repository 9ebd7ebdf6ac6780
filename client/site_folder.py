"""A hospital's site folder: its node key pair, its own policy, ledger, audit log and config.

``medfed hospital init NAME --dir DIR`` lays it out::

    DIR/hospital.toml           the daemon's config (HospitalConfig)
    DIR/node.key                node-authentication private key, OpenSSH format (0600); never
                                leaves the hospital
    DIR/node.pub                the public key (one OpenSSH line): send it to the coordinator,
                                who enrols it
    DIR/privacy-policy.toml     the hospital's privacy policy (privacy.policy.SitePolicy); edit it
    DIR/run-policy.toml         which runs it takes part in (client.run_policy.RunPolicy)
    DIR/privacy-ledger.sqlite   privacy ledger (created at the first DP round)
    DIR/egress-audit.jsonl      egress audit log: one JSON line per message sent (client.audit)
    DIR/evaluation-count.sqlite evaluations answered per run (beside the run policy), against
                                its caps (client.evaluation_cap)
    DIR/ca.pem                  put the consortium's CA certificate here (from the coordinator)
    DIR/roster.toml             and the consortium's CA-signed roster of enrolled hospitals with
                                it (secure aggregation counts only peers on it)
    DIR/roster-accepted.toml    the newest roster serial this hospital accepted (older and
                                expired rosters are refused; privacy.secagg.roster_state)
    DIR/node.key.<time>.bak     a node key replaced by 'medfed hospital rotate-key' (0600)
    DIR/embedding-cache/        a segmentation run's cached image embeddings (patient-derived;
                                never sent)

The data manifest stays where the hospital keeps its images; ``hospital.toml`` names its path.
:func:`node_config` turns the config into the SuperNode's ``--node-config`` keys that the
ClientApp reads (``manifest``, ``privacy-policy``, ``privacy-ledger``, ``audit-log``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import tomli_w

from client.run_policy import RUN_POLICY_TEMPLATE
from core.errors import MedfedError
from core.settings import read_settings, read_toml
from privacy.noise import INSECURE_NOISE_KEY
from privacy.pki import (
    KeyFileError,
    load_node_public_key,
    make_node_key,
    node_private_openssh,
    node_public_openssh,
    public_key_fingerprint,
    write_private,
)
from privacy.secagg.identity import CA_KEY, NODE_KEY, ROSTER_FILE, ROSTER_KEY, ROSTER_STATE_KEY
from privacy.secagg.roster_state import ROSTER_STATE_FILE

logger = logging.getLogger(__name__)

CONFIG_FILE = "hospital.toml"
EMBEDDING_CACHE_KEY = "embedding-cache"
EMBEDDING_CACHE_FOLDER = "embedding-cache"
CLIENTAPP_EXECUTORS = ("warm", "subprocess")

POLICY_TEMPLATE = """\
# This hospital's privacy policy (medfed, privacy.policy.SitePolicy). The hospital owns this
# file: the coordinator never sees or changes it. A round that breaks it is refused, and the
# reason goes back to the coordinator.

max_epsilon = 8.0       # total epsilon budget per dataset, over every run and round
delta = 1e-5            # the delta every epsilon is stated for; runs asking more are refused
accountant = "prv"      # how the ledger composes rounds: "rdp" or "prv"
require_dp = true       # refuse any round that is not differentially private
"""


class SiteFolderError(MedfedError, ValueError):
    """A site folder or hospital config that cannot be used as is."""


@dataclass(frozen=True)
class HospitalConfig:
    """The hospital daemon's settings (``hospital.toml``); relative paths are from the folder.

    Attributes:
        name: the hospital's name, as the coordinator enrols it.
        superlink: ``host:port`` of the coordinator's Fleet API.
        ca_cert: the consortium CA certificate (trust anchor for TLS, and of the roster).
        roster: the consortium's CA-signed roster of enrolled hospitals (from the coordinator,
            with ``ca_cert``): secure aggregation counts only peers whose keys are on it.
        roster_state: where the hospital keeps the newest roster serial it accepted.
        node_key, node_pub: the node-authentication key pair.
        manifest: the CSV data manifest (``""`` until the hospital sets it).
        classes: the class names the manifest's labels use, in label order (e.g.
            ``["normal", "pneumonia"]``); each round maps them by name to the study's classes
            and a study whose classes do not cover them is refused. Empty: integer labels, taken
            as the study's class indices. Other manifest settings (columns, frames, split) go in
            a ``[site_data]`` table of the same file (``client.data.config.SiteDataConfig``).
        data_npz: MedMNIST-format arrays instead of a manifest (``train_*``/``val_*``; tests,
            benchmarks and demos); ``""``: none.
        privacy_policy, run_policy, privacy_ledger, audit_log: the hospital's own files
            (``privacy_policy = ""``: no privacy policy, then rounds need not be private).
        dataset_id: the name under which the privacy ledger keeps this dataset's budget
            (e.g. ``"cxr-2026"``); a private round under a privacy policy is refused without
            it. Keep it when images are added or re-exported; a new id opens a new budget, so
            give one only to data that is truly new.
        runtime_port: the SuperNode's local Runtime API port (127.0.0.1), where its ClientApp
            processes fetch their messages; change it when several SuperNodes share a machine.
        clientapp_executor: ``"warm"`` (default): each message runs in a process forked from
            one that imported the ClientApp once (:mod:`client.warm_exec`: no import of torch,
            peft and MONAI per message; what it saves: docs/deployment.md); ``"subprocess"``: a
            fresh Python process per message. Both run the installed medfed ClientApp only,
            never code from the run's FAB.
        cpu_threads: CPU threads each ClientApp process may use (``OMP_NUM_THREADS``); 0: all
            cores. Set it where the daemon shares a machine: oversubscribed OpenMP threads
            spin (measured: docs/deployment.md).
    """

    name: str
    superlink: str = "localhost:8000"
    ca_cert: str = "ca.pem"
    roster: str = ROSTER_FILE
    roster_state: str = ROSTER_STATE_FILE
    node_key: str = "node.key"
    node_pub: str = "node.pub"
    manifest: str = ""
    classes: list[str] = field(default_factory=list)
    data_npz: str = ""
    privacy_policy: str = "privacy-policy.toml"
    run_policy: str = "run-policy.toml"
    privacy_ledger: str = "privacy-ledger.sqlite"
    audit_log: str = "egress-audit.jsonl"
    dataset_id: str = ""
    runtime_port: int = 9094
    clientapp_executor: str = "warm"
    cpu_threads: int = 0


def init_site_folder(folder: Path, name: str, superlink: str = "localhost:8000",
                     manifest: str = "") -> HospitalConfig:
    """Create the site folder with a new key pair and a policy template.

    Raises:
        SiteFolderError: ``folder`` already holds a ``hospital.toml`` (a new key would need a
            new enrolment).
    """
    folder = Path(folder)
    if (folder / CONFIG_FILE).exists():
        raise SiteFolderError(f"{folder / CONFIG_FILE} exists: this folder is already a "
                              f"hospital's site folder")
    folder.mkdir(parents=True, exist_ok=True)
    config = HospitalConfig(name=name, superlink=superlink, manifest=manifest)
    key = make_node_key()
    write_private(folder / config.node_key, node_private_openssh(key))
    (folder / config.node_pub).write_bytes(node_public_openssh(key.public_key(), comment=name))
    policy = folder / config.privacy_policy
    if not policy.exists():
        policy.write_text(POLICY_TEMPLATE)
    if not (folder / config.run_policy).exists():
        (folder / config.run_policy).write_text(RUN_POLICY_TEMPLATE)
    (folder / CONFIG_FILE).write_text(tomli_w.dumps({"hospital": asdict(config)}))
    return config


@dataclass(frozen=True)
class RotatedKey:
    """What :func:`rotate_node_key` did.

    Attributes:
        name: the hospital's name (as enrolled).
        node_pub: the new public key's file: send it to the coordinator.
        fingerprint: the new key's ``SHA256:<hex>`` (the coordinator prints the same one).
        old_fingerprint: the replaced key's.
        backup_key, backup_pub: where the old key pair is kept (0600 for the private key).
    """

    name: str
    node_pub: Path
    fingerprint: str
    old_fingerprint: str
    backup_key: Path
    backup_pub: Path


def rotate_node_key(folder: Path) -> RotatedKey:
    """Make a new node key pair in the site folder; keep the old one beside it as a backup.

    The new key is used from the daemon's next start; the coordinator swaps it in with
    ``medfed coordinator enroll DIR --name NAME --hospital-key node.pub --replace``, which
    revokes the old key (then the running daemon, still on the old key, is refused and stops).

    Raises:
        SiteFolderError: no site folder, or its node key is unreadable.
    """
    folder = Path(folder)
    config = load_hospital_config(folder)
    key_path, pub_path = folder / config.node_key, folder / config.node_pub
    try:
        old_key = key_path.read_bytes()
        old_public = load_node_public_key(pub_path)
    except (OSError, KeyFileError) as err:
        raise SiteFolderError(f"{key_path} / {pub_path}: cannot read the current key pair "
                              f"({err})") from err
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    backup_key = key_path.with_name(f"{key_path.name}.{stamp}.bak")
    backup_pub = pub_path.with_name(f"{pub_path.name}.{stamp}.bak")
    write_private(backup_key, old_key)
    backup_pub.write_bytes(pub_path.read_bytes())
    key = make_node_key()
    tmp = key_path.with_name(key_path.name + ".new")
    tmp.unlink(missing_ok=True)  # left by an interrupted rotation
    write_private(tmp, node_private_openssh(key))
    pub_tmp = pub_path.with_name(pub_path.name + ".new")
    pub_tmp.write_bytes(node_public_openssh(key.public_key(), comment=config.name))
    os.replace(tmp, key_path)
    os.replace(pub_tmp, pub_path)
    logger.info("node key rotated in %s; old key kept at %s", folder, backup_key)
    return RotatedKey(config.name, pub_path, public_key_fingerprint(key.public_key()),
                      public_key_fingerprint(old_public), backup_key, backup_pub)


def load_hospital_config(folder: Path) -> HospitalConfig:
    """Read ``DIR/hospital.toml``; errors name the file and the setting."""
    path = Path(folder) / CONFIG_FILE
    _without_insecure_noise(path)
    values = read_settings(
        path, HospitalConfig, SiteFolderError, str(path), table="hospital",
        unreadable_hint=f"; run 'medfed hospital init NAME --dir {folder}' first",
    )
    if "name" not in values:
        raise SiteFolderError(f"{path}: set 'name' in [hospital]")
    if values.get("clientapp_executor", "warm") not in CLIENTAPP_EXECUTORS:
        raise SiteFolderError(f"{path}: clientapp_executor = {values['clientapp_executor']!r}; "
                              f"use one of {', '.join(map(repr, CLIENTAPP_EXECUTORS))}")
    if values.get("cpu_threads", 0) < 0:
        raise SiteFolderError(f"{path}: cpu_threads must be 0 (all cores) or more")
    return HospitalConfig(**values)


def _without_insecure_noise(path: Path) -> None:
    """Refuse the simulation-only noise setting in a hospital's config, with its own reason."""
    try:
        text = path.read_text()
    except OSError:
        return  # read_settings says what is wrong
    if INSECURE_NOISE_KEY in text or INSECURE_NOISE_KEY.replace("-", "_") in text:
        raise SiteFolderError(
            f"{path}: insecure_replayable_noise is for simulations only: a hospital's DP noise "
            f"comes from its own CSPRNG, never from a seed the coordinator knows. Remove it.")


def node_config(folder: Path, config: HospitalConfig) -> dict[str, str]:
    """The ClientApp's node-config keys, with absolute paths (the daemon's working directory
    is not the site folder). ``manifest``, ``data-npz`` and ``privacy-policy`` are left out
    while unset."""
    folder = Path(folder).resolve()
    values = {
        "run-policy": str(folder / config.run_policy),
        "privacy-ledger": str(folder / config.privacy_ledger),
        "audit-log": str(folder / config.audit_log),
        # Secure aggregation: setup keys are signed with the node key and peers checked
        # against the CA-signed roster (privacy.secagg.identity).
        NODE_KEY: str(folder / config.node_key),
        ROSTER_KEY: str(folder / config.roster),
        CA_KEY: str(folder / config.ca_cert),
        ROSTER_STATE_KEY: str(folder / config.roster_state),
        # A segmentation run's image embeddings: derived from patients' images, so they stay
        # in the site folder (client.segmentation_site).
        EMBEDDING_CACHE_KEY: str(folder / EMBEDDING_CACHE_FOLDER),
    }
    if config.privacy_policy:
        values["privacy-policy"] = str(folder / config.privacy_policy)
    if config.manifest:
        values["manifest"] = str(folder / config.manifest)
    if config.classes:
        values["classes"] = ",".join(config.classes)
    if "site_data" in read_toml(folder / CONFIG_FILE):
        values["site-config"] = str(folder / CONFIG_FILE)  # its [site_data] table
    if config.data_npz:
        values["data-npz"] = str(folder / config.data_npz)
    if config.dataset_id:
        values["dataset-id"] = config.dataset_id
    return values
