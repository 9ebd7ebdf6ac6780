"""A deployed run's records name each hospital by the name the coordinator enrolled it under.

Real consortium folder (CA, enrolment list), real site folders' node keys, the deployed
ServerApp's own setup (``deployment_server_run``) and real ``metrics.csv``: a hospital's rows
carry its enrolled name whatever id its replies claim, from its first reply on (an error reply
carries no metrics at all).
"""

from __future__ import annotations

import pandas as pd
import tomli_w
from flwr.app import Context, RecordDict

from client.site_folder import init_site_folder
from server.consortium import enrol, init_consortium, set_node_id
from server.deployment_app import (
    CONSORTIUM_KEY,
    RUN_DIR_KEY,
    STUDY_KEY,
    deployment_server_run,
    run_config_args,
)
from strategies.replies import Reply


def test_metrics_name_hospitals_by_their_enrolled_names(tmp_path):
    folder = tmp_path / "consortium"
    init_consortium(folder, "cxr-consortium")
    node_ids = {"st-marys": 4_113_229_871, "north-general": 77}
    for name, node_id in node_ids.items():
        site = tmp_path / name
        init_site_folder(site, name)
        entry = enrol(folder, name, site / "node.pub")
        set_node_id(folder, entry.fingerprint, str(node_id))
    study = tmp_path / "study.toml"
    study.write_text(tomli_w.dumps({"classes": ["normal", "pneumonia"],
                                    "federation": {"rounds": 1, "min_hospitals": 2}}))
    args = run_config_args(study, tmp_path / "run", folder)
    assert f'{CONSORTIUM_KEY}="{folder.resolve()}"' in args[1]
    run = deployment_server_run(Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(),
        run_config={STUDY_KEY: str(study), RUN_DIR_KEY: str(tmp_path / "run"),
                    CONSORTIUM_KEY: str(folder)}))

    records = run.records
    # St Mary's refuses round 1 (no metrics), then answers claiming another hospital's id.
    records.add_reply(Reply(1, "train", node_ids["st-marys"], error="privacy: refused"))
    records.add_reply(Reply(2, "train", node_ids["st-marys"], metrics={
        "num-examples": 40, "train-loss": 0.5, "hospital-id": 0}))
    records.add_reply(Reply(2, "evaluate", node_ids["north-general"], metrics={
        "num-examples": 10, "val-auc": 0.8, "hospital-id": 1}))
    # A node the enrolment list does not know keeps the id its reply gives.
    records.add_reply(Reply(2, "train", 999, metrics={"num-examples": 5, "hospital-id": 3}))
    metrics = pd.read_csv(records.write_metrics(), dtype={"hospital": str})
    named = metrics[metrics.hospital != "global"]
    assert sorted(zip(named["round"], named.hospital, strict=True)) == [
        (1, "st-marys"), (2, "3"), (2, "north-general"), (2, "st-marys")]
    assert named[named.hospital == "st-marys"].node_id.tolist() == [node_ids["st-marys"]] * 2

    # Without a consortium folder (in-process runs) rows keep the replies' ids.
    bare = deployment_server_run(Context(
        run_id=2, node_id=0, node_config={}, state=RecordDict(),
        run_config={STUDY_KEY: str(study), RUN_DIR_KEY: str(tmp_path / "bare")}))
    bare.records.add_reply(Reply(1, "train", node_ids["st-marys"], metrics={
        "num-examples": 40, "hospital-id": 0}))
    assert [h for (_, h) in bare.records.rows] == ["0"]
