"""Before round 1: ask every hospital for a dry run of the study against its own policies.

The coordinator sends each connected hospital a ``query`` message holding the study's round
config and what the whole study asks (:func:`check_config`); each answers, item by item,
``pass`` or ``fail: <reason naming the setting>`` (``client.study_check``: data, run policy,
secure aggregation, classes, evaluation, dataset id, differential privacy, budget). When any
hospital would refuse the study later, the run does not start (a hospital that does not
answer - offline, or its check failed - is logged, not a refusal): the error names the hospital,
the item and the setting, and ``RUN_DIR/study-check.json`` keeps every answer. A hospital's
egress audit log records its answer like every other reply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server.config import FederationConfig

logger = logging.getLogger(__name__)

CHECK_RECORD = "study-check"
"""The hospital's reply record: item -> ``pass`` or ``fail: reason`` (``client.study_check``)."""
CHECK_FILE = "study-check.json"
"""Every hospital's answers, in the run directory."""
QUERY = "query"
NO_ANSWER = "no answer"
"""A hospital that did not answer the check (offline, or it failed): not a refusal; the run
starts, and its rounds go on without the hospital as without any absent one."""

HospitalName = Callable[[int, dict], str]
"""``(node id, reply metrics) -> the hospital's name`` for the error and the file."""


def check_config(round_config: ConfigRecord, federation: FederationConfig,
                 done: int = 0) -> ConfigRecord:
    """The study-check query's config: ``round_config`` (what every training message of the run
    carries) and what the whole study asks of a hospital after round ``done``."""
    config = ConfigRecord(dict(round_config))
    left = federation.rounds - done
    config["server-round"] = min(done + 1, federation.rounds)  # the next round the run sends
    config["study-rounds"] = federation.rounds
    config["rounds-left"] = left
    config["secure-aggregation"] = federation.secure_aggregation.enabled
    # Every round evaluates every hospital only with fraction_evaluate = 1.
    config["evaluations"] = left if federation.fraction_evaluate >= 1.0 else 0
    return config


def ask_hospitals(grid: Grid, config: ConfigRecord, timeout_s: float,
                  name_of: HospitalName) -> dict[str, dict[str, str]]:
    """Every connected hospital's answers: name -> item -> ``pass`` or ``fail: reason`` (a
    hospital that answered with an error or not at all: item ``answer``, :data:`NO_ANSWER`)."""
    nodes = sorted(grid.get_node_ids())
    messages = [Message(RecordDict({"config": config}), dst_node_id=node, message_type=QUERY,
                        group_id="0") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=timeout_s)
    answers: dict[str, dict[str, str]] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():  # offline, or failed: not a refusal (its rounds will tell)
            answers[name_of(node, {})] = {"answer": f"{NO_ANSWER}: {reply.error.reason}"}
            continue
        metrics = reply.content.metric_records.get("metrics")
        items = reply.content.config_records.get(CHECK_RECORD)
        name = name_of(node, dict(metrics) if metrics is not None else {})
        answers[name] = ({str(k): str(v) for k, v in items.items()} if items is not None else
                         {"answer": "fail: the reply holds no study check"})
    answered = {r.metadata.src_node_id for r in replies}
    for node in nodes:
        if node not in answered:
            answers[name_of(node, {})] = {"answer": f"{NO_ANSWER}: none within {timeout_s:g} s"}
    return answers


def refusals(answers: dict[str, dict[str, str]]) -> list[str]:
    """``hospital X, item: reason`` for every item a hospital answered ``fail``."""
    return [f"hospital {name}, {item}: {answer.removeprefix('fail: ')}"
            for name, items in sorted(answers.items()) for item, answer in items.items()
            if answer.startswith("fail")]


def check_study(grid: Grid, config: ConfigRecord, timeout_s: float, name_of: HospitalName,
                run_dir: Path) -> list[str]:
    """Ask every hospital (:func:`ask_hospitals`), write ``run_dir/study-check.json`` and
    return the refusals (empty: every hospital takes the study)."""
    answers = ask_hospitals(grid, config, timeout_s, name_of)
    (Path(run_dir) / CHECK_FILE).write_text(json.dumps(answers, indent=2, sort_keys=True) + "\n")
    failed = refusals(answers)
    silent = sorted(name for name, items in answers.items() if "answer" in items)
    if silent:
        logger.warning("study check: no answer from %s (offline or failed): the run starts "
                       "without their check", ", ".join(silent))
    logger.info("study check: %d hospitals asked, %d refusals", len(answers), len(failed))
    return failed
