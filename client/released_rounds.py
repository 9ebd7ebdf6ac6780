"""A private round the hospital already released is sent again, never trained again.

A coordinator killed after it sent round ``r`` resumes from its checkpoint of round ``r - 1``
and sends round ``r`` again under the same run key (``run-key``). The hospital had trained that
round, charged it in its privacy ledger and released the noised update. Training it again would
be a second release of the same data, to be charged a second time: the hospitals would end above
the study's epsilon target. Instead the hospital keeps each private round's reply (the noised
adapter, its counts and epsilon: exactly what already left) beside its ledger, and answers the
replayed round with it. Sending the same values again releases nothing new and costs nothing.

The kept reply is written after the ledger entry and before the reply leaves. A hospital that
finds the round charged but no reply kept (it crashed between the two) refuses the replayed
round with a reason; the coordinator goes on with the other hospitals' updates. So does a
hospital asked to replay the round on another global adapter than the one it trained on.

Files: ``<ledger>.releases/<run digest>-<round>.safetensors`` (0600), one per run: the latest
round's (only a round the coordinator never checkpointed can be sent again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from client.privacy_round import PrivacyRefusal, SitePrivacy
from privacy.ledger import Ledger

logger = logging.getLogger(__name__)

SUFFIX = ".releases"
"""The kept replies' folder: the ledger's path with this appended."""


def release_folder(ledger: Ledger) -> Path:
    """Where a ledger's kept replies live (beside it)."""
    return ledger.path.with_name(ledger.path.name + SUFFIX)


def _run_digest(dataset_id: str, run: str) -> str:
    return hashlib.sha256(f"{dataset_id}\n{run}".encode()).hexdigest()[:32]


def _release_path(ledger: Ledger, dataset_id: str, run: str, server_round: int) -> Path:
    name = f"{_run_digest(dataset_id, run)}-{int(server_round)}.safetensors"
    return release_folder(ledger) / name


def global_digest(arrays: ArrayRecord) -> str:
    """sha256 of the global adapter a round was trained from (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = arrays[name]
        digest.update(f"{name}|{array.dtype}|{list(array.shape)}|".encode())
        digest.update(np.ascontiguousarray(array.numpy()).tobytes())
    return digest.hexdigest()


def keep_release(privacy: SitePrivacy, dataset_id: str, run: str, server_round: int,
                 received: ArrayRecord, content: RecordDict) -> None:
    """Keep the reply ``content`` of a private round the ledger has charged, for a replay.

    Only where the round was charged (a ledger entry for ``(dataset_id, run, server_round)``);
    the same run's older kept rounds are removed. A failure to write is logged: the reply still
    leaves, and a replay of the round is then refused (never trained again).
    """
    ledger = privacy.ledger
    if ledger is None or not ledger.charged(dataset_id, run, server_round):
        return
    path = _release_path(ledger, dataset_id, run, server_round)
    try:
        metadata = {
            "global_sha256": global_digest(received),
            "keys": json.dumps(list(content["arrays"])),
            "metrics": json.dumps(dict(content["metrics"])),
            "site": json.dumps(dict(content["site"]) if "site" in content else None),
        }
        path.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        tensors = {k: t.contiguous() for k, t in content["arrays"].to_torch_state_dict().items()}
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        for older in path.parent.glob(f"{_run_digest(dataset_id, run)}-*.safetensors"):
            if older != path:
                older.unlink(missing_ok=True)
    except (OSError, TypeError, ValueError) as err:
        logger.error("cannot keep round %d's reply in %s (%s): a replay of the round will be "
                     "refused", server_round, path, err)


def replayed_release(privacy: SitePrivacy, dataset_id: str, run: str, server_round: int,
                     received: ArrayRecord) -> RecordDict | None:
    """The reply this hospital already released for ``(run, server_round)``, or None when the
    ledger has not charged that round (train it as usual).

    Raises:
        PrivacyRefusal: the round was charged, but its reply was not kept or was trained from
            another global adapter: it is neither trained nor released again.
    """
    ledger = privacy.ledger
    if ledger is None or not ledger.charged(dataset_id, run, server_round):
        return None
    path = _release_path(ledger, dataset_id, run, server_round)
    already = (f"round {server_round} of this run was already trained here and charged in the "
               f"privacy ledger")
    if not path.is_file():
        raise PrivacyRefusal(f"{already}, and its reply was not kept: training it again would "
                             f"be a second release, so this hospital sits the round out")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("global_sha256") != global_digest(received):
        raise PrivacyRefusal(f"{already} on another global adapter than this one: training "
                             f"it again would be a second release, so this hospital sits the "
                             f"round out")
    tensors = load_file(str(path))
    content = RecordDict({
        "arrays": ArrayRecord({k: tensors[k] for k in json.loads(metadata["keys"])}),
        "metrics": MetricRecord(json.loads(metadata["metrics"])),
    })
    if (site := json.loads(metadata.get("site", "null"))) is not None:
        content["site"] = ConfigRecord(site)
    logger.info("round %d of run %s: sent again the reply already released (no new charge)",
                server_round, run[:12])
    return content
