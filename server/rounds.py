"""The coordinator's round loop: initial adapter, strategy, combined evaluation, records.

After each round the hospitals evaluate the global adapter on their own held-out splits; the
coordinator combines their metrics (``server.evaluation``), keeps the round to publish, and
writes a checkpoint. It holds no data: a test set is optional (simulations pass one).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from peft import PeftModel
from safetensors.torch import load_file, save_file

from core.errors import MedfedError
from models.adapters import adapter_state, load_adapter_file, load_adapter_state, save_adapter
from models.config import ModelConfig, SegmentationConfig, TrainConfig, to_config_record
from models.data import ImageSet
from models.lora import build_lora_model
from models.metrics import RECORDED_METRIC_NAMES
from models.registry import backbone_spec
from privacy.config import DPConfig
from server.card import publish_card
from server.checkpoint import (
    CHECKPOINT_FILE,
    RoundOffset,
    load_checkpoint,
    save_checkpoint,
    settings_fingerprint,
)
from server.config import FederationConfig
from server.evaluation import AdapterSelection, central_evaluator, combine_validation, with_prior
from server.preflight import CHECK_FILE, check_config, check_study
from server.records import RunRecords, trained
from server.secure_aggregation import secure_grid
from server.study import EvaluationConfig, Study
from strategies import Reply, build_strategy
from strategies.adapter import TooFewUpdates

logger = logging.getLogger(__name__)

RoundCallback = Callable[[int, dict[str, float]], None]
"""Called after each round with ``(round, metrics)``: the combined validation metrics
(``val-auc``...) and, with a test set, the test metrics (``test-auc``...)."""
RUN_NONCE_FILE = "run-nonce"
"""Kept from a run's start to its end (``RUN_DIR/run-nonce``): part of its run key."""
SELECTED_FILE = "selected.safetensors"
"""The round to publish so far (``RUN_DIR/selected.safetensors``), kept for a resumed run."""
ReplyCallback = Callable[[Reply], None]
"""Called with each hospital's reply (or failure) as it is recorded."""


RESUME_ADVICE = ("Once the hospitals named can take part (their policy changed, say), start "
                 "the same study again with the same run directory: it resumes after round "
                 "{done}, the last round every hospital's update was counted in.")
"""What a run that ended on hospitals' refusals tells the operator to do."""


class FederationError(MedfedError, RuntimeError):
    """A run that did not complete the rounds it was asked for."""


@dataclass
class FederationOutcome:
    """What the round loop produced.

    Attributes:
        model: the LoRA model holding the published adapter.
        wall_time_s: seconds from the first round's start to the last evaluation.
        published_round: the round whose global adapter was published.
        rule: how that round was chosen, in words.
    """

    model: PeftModel
    wall_time_s: float
    published_round: int = 0
    rule: str = ""


def initial_model(model_config: ModelConfig, seed: int, adapter: str = "",
                  adapter_sha256: str = "") -> PeftModel:
    """The run's starting point: pretrained backbone, seeded LoRA factors and head, or the
    saved ``adapter`` (checked against ``adapter_sha256`` when given) in their place."""
    torch.manual_seed(seed)
    model = build_lora_model(model_config, verify=True)
    if adapter:
        load_adapter_file(model, Path(adapter), adapter_sha256)
        logger.info("starting from the adapter in %s", adapter)
    return model


def _round_configs(federation: FederationConfig, model_config: ModelConfig,
                   train_config: TrainConfig, dp: DPConfig | None, classes: list[str],
                   run_key: str, segmentation: SegmentationConfig | None = None
                   ) -> tuple[ConfigRecord, ConfigRecord]:
    """The config records every training and every evaluation message carries (a
    segmentation backbone's: its ``segmentation`` settings too)."""
    task = ([segmentation or SegmentationConfig()]
            if backbone_spec(model_config.backbone).task == "segmentation" else [])
    wire_config = to_config_record(model_config, train_config, *([dp] if dp else []), *task)
    evaluate_config = to_config_record(model_config, train_config, *task)
    # Declared in every message so that a hospital's run policy can refuse too small
    # aggregates and tasks it has not agreed to, and can map its labels to the study's classes.
    for config in (wire_config, evaluate_config):
        config["min-hospitals"] = federation.min_hospitals
        config["task"] = federation.task
        if classes:
            config["classes"] = classes
    wire_config["run-key"] = run_key
    return wire_config, evaluate_config


def run_federation(
    grid: Grid,
    federation: FederationConfig,
    model_config: ModelConfig,
    train_config: TrainConfig,
    test_set: ImageSet | None,
    records: RunRecords,
    on_round: RoundCallback | None = None,
    on_reply: ReplyCallback | None = None,
    dp: DPConfig | None = None,
    *,
    classes: Iterable[str] = (),
    evaluation: EvaluationConfig | None = None,
    study_check: bool = False,
    segmentation: SegmentationConfig | None = None,
) -> FederationOutcome:
    """Run ``federation.rounds`` rounds; write the metrics and the published adapter to
    ``records``.

    ``dp`` travels in each round's config; with client-level DP the strategy averages
    updates uniformly (hospitals send ``update-weight`` = 1), as its sensitivity bound needs,
    and each hospital's noise share assumes ``dp.update_hospitals`` shares in the sum (0:
    ``federation.min_hospitals``, the fewest a round accepts, so a round never holds less
    noise than planned). ``classes`` (the study's class names) travel in every round's config;
    each hospital maps its labels to them. ``evaluation`` chooses the published round and the
    prior it answers for (default: best combined validation AUC, equal priors).
    ``study_check``: before the first round, ask every hospital a dry run of the study
    (``server.preflight``) and start nothing if any would refuse it. ``segmentation``: a
    segmentation backbone's settings, sent in every round's config (default: their defaults).

    Raises:
        FederationError: a round ended with fewer than ``federation.min_hospitals`` valid
            updates, or (``study_check``) a hospital would refuse the study.
    """
    evaluation = evaluation or EvaluationConfig()
    classes = list(classes)
    dp = _run_dp(dp, federation)
    model = initial_model(model_config, train_config.seed, federation.initial_adapter,
                          federation.initial_adapter_sha256)
    strategy = _strategy(federation, model_config, records, on_reply, dp, evaluation)
    plain_grid = grid
    if federation.secure_aggregation.enabled:
        # Training rounds then run SecAgg+: the strategy only ever receives the sum.
        grid = secure_grid(grid, federation.secure_aggregation, strategy, dp)
    # A checkpoint after every round; a run dir holding one (a crashed run with the same
    # settings) resumes after its round, with its arrays, RNG states and records.
    fingerprint = settings_fingerprint(federation, model_config, train_config, dp)
    judge = RoundJudge(records, federation, evaluation, model_config.num_classes, fingerprint,
                       central_evaluator(model, test_set) if test_set is not None else None,
                       on_round)
    initial_arrays = judge.resume(ArrayRecord(adapter_state(model)))
    # Flower counts from 1: shift to done + 1; FedOpt's moments come back; replies are
    # aggregated in node order (resumed or not, the same sums).
    judge.strategy = strategy = RoundOffset(strategy, judge.done, judge.strategy_state)
    wire_config, evaluate_config = _round_configs(
        federation, model_config, train_config, dp, classes,
        run_key_for(records.run_dir, fingerprint), segmentation)
    if study_check:
        _check_study(plain_grid, records, federation, wire_config, judge.done)
    start = time.monotonic()
    try:
        result = strategy.start(
            grid=grid, initial_arrays=initial_arrays,
            num_rounds=federation.rounds - judge.done, timeout=federation.round_timeout_s,
            train_config=wire_config, evaluate_config=evaluate_config, evaluate_fn=judge)
    except TooFewUpdates as err:  # end at the round that failed, saying why
        records.write_metrics()
        raise FederationError(f"{err}. See {records.run_dir / 'metrics.csv'}. "
                              f"{RESUME_ADVICE.format(done=judge.saved[-1])}") from err
    wall_time = time.monotonic() - start
    records.write_metrics()
    _check_rounds(records, federation)
    published_round = _publish(model, judge, result.arrays, model_config, classes, dp)
    return FederationOutcome(model=model, wall_time_s=wall_time,
                             published_round=published_round, rule=judge.selection.rule())


def _run_dp(dp: DPConfig | None, federation: FederationConfig) -> DPConfig | None:
    """The run's DP settings with the study's defaults filled in: the accountant plans over
    ``federation.rounds``, and each hospital's noise share assumes ``min_hospitals`` shares."""
    if dp is None:
        return None
    return replace(dp, dp_run_rounds=dp.dp_run_rounds or federation.rounds,
                   update_hospitals=dp.update_hospitals or federation.min_hospitals)


def _strategy(federation: FederationConfig, model_config: ModelConfig, records: RunRecords,
              on_reply: ReplyCallback | None, dp: DPConfig | None,
              evaluation: EvaluationConfig):
    """The study's aggregation rule, observing every reply into ``records``; with a prior,
    hospitals evaluate the adapter as it will be published."""
    strategy = build_strategy(
        federation.strategy,
        fraction_train=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate,
        min_train_nodes=federation.min_hospitals,
        min_evaluate_nodes=min(federation.min_hospitals, 1) if federation.fraction_evaluate else 0,
        min_available_nodes=federation.min_hospitals,
        observer=lambda reply: _observe(reply, records, on_reply),
        train_weighted_by_key="update-weight" if dp is not None and dp.update_dp else None,
        options=federation.options,  # the strategies' settings
    )
    if evaluation.prior:
        _evaluate_as_published(strategy, evaluation.prior, model_config.num_classes)
    return strategy


class RoundJudge:
    """Flower's ``evaluate_fn``: after each round, the global adapter with the study's prior
    put back is scored on the coordinator's test set (if any), the hospitals' validation
    results are combined, the best round so far is kept for publication, and a checkpoint is
    written. :meth:`resume` restores a crashed run's state first.

    Attributes:
        done: rounds finished before this process (a resumed run goes on after them).
        saved: the rounds checkpointed so far.
        selection: the published round's choice.
        selected: where the best round's published adapter is kept until the end.
        strategy: the strategy whose state each checkpoint saves (set before the rounds).
    """

    def __init__(self, records: RunRecords, federation: FederationConfig,
                 evaluation: EvaluationConfig, num_classes: int, fingerprint: str,
                 evaluator, on_round: RoundCallback | None) -> None:
        self.records, self.federation, self.evaluation = records, federation, evaluation
        self.num_classes, self.fingerprint = num_classes, fingerprint
        self.evaluator, self.on_round = evaluator, on_round
        self.selection = AdapterSelection(evaluation.select_by)
        self.selected = records.run_dir / SELECTED_FILE
        self.done, self.saved, self.resumed = 0, [0], False
        self.strategy_state: dict = {}
        self.strategy = None

    def resume(self, initial_arrays: ArrayRecord) -> ArrayRecord:
        """The arrays the rounds start from: ``initial_arrays``, or a crashed run's last
        checkpoint (its records and judged rounds restored with it)."""
        resumed = load_checkpoint(self.records.run_dir, self.fingerprint)
        if resumed is None:
            return initial_arrays
        self.done, self.saved, self.resumed = resumed.server_round, [resumed.server_round], True
        self.strategy_state = resumed.strategy_state
        self.records.rows.update({(r["round"], r["hospital"]): r for r in resumed.rows})
        logger.info("resuming %s after round %d of %d", self.records.run_dir, self.done,
                    self.federation.rounds)
        for row in self.records.test_history():  # the rounds judged before the crash
            self.selection.consider(row["round"], row)
        return ArrayRecord({k: resumed.arrays[k] for k in initial_arrays})

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += self.done
        if self.resumed and server_round == self.done:
            return None  # evaluated and recorded before the crash
        published = with_prior(arrays, self.evaluation.prior, self.num_classes)
        self.records.add_round(server_round)
        metrics: dict[str, float] = {}
        if self.evaluator is not None:
            test = dict(self.evaluator(server_round, published))
            self.records.add_test(server_round, test)
            metrics |= test
        if server_round > 0:
            metrics |= self._judge(server_round, arrays, published)
        if self.on_round is not None:
            self.on_round(server_round, metrics)
        return MetricRecord(metrics) if metrics else None

    def _judge(self, server_round: int, arrays: ArrayRecord,
               published: ArrayRecord) -> dict[str, float]:
        """Combine the round's validation results, keep it if best, checkpoint it."""
        # A round without enough updates is neither judged nor checkpointed: a resumed run
        # redoes it.
        _check_round(self.records, self.federation, server_round)
        combined = combine_validation(self.records.validation_rows(server_round))
        self.records.add_combined(server_round, combined)
        if self.selection.consider(server_round, combined):
            _save_arrays(published, self.selected)
        logger.debug("round %d: combined validation %s", server_round,
                     {k: round(v, 4) for k, v in combined.items()})
        save_checkpoint(self.records.run_dir, server_round, arrays, self.fingerprint,
                        self.records.rows.values(), self.strategy)
        self.saved.append(server_round)
        return {k.replace("_", "-"): v for k, v in combined.items()}


def _publish(model: PeftModel, judge: RoundJudge, last: ArrayRecord, model_config: ModelConfig,
             classes: list[str], dp: DPConfig | None) -> int:
    """Save the chosen round's adapter and its card; clear the run's crash state. Returns the
    published round (the last, when no hospital evaluated any)."""
    records, evaluation = judge.records, judge.evaluation
    if judge.selection.best_round and judge.selected.is_file():
        published_round, state = judge.selection.best_round, load_file(str(judge.selected))
    else:  # no hospital evaluated any round: the last one
        published_round = judge.federation.rounds
        state = with_prior(last, evaluation.prior, judge.num_classes).to_torch_state_dict()
    load_adapter_state(model, state)
    save_adapter(model, records.run_dir / "adapter")
    publish_card(records, judge.federation, model_config, model, classes=classes,
                 evaluation=evaluation, dp=dp, published_round=published_round,
                 selection=judge.selection.rule())
    logger.info("published the global adapter of round %d (%s)", published_round,
                judge.selection.rule())
    # A finished run starts afresh when run again (the checkpoint is for crashes).
    for name in (CHECKPOINT_FILE, RUN_NONCE_FILE):
        (records.run_dir / name).unlink(missing_ok=True)
    judge.selected.unlink(missing_ok=True)
    return published_round


def run_key_for(run_dir: Path, fingerprint: str) -> str:
    """The run key every round's config carries (32 hex digits): the same for a run and its
    resumptions after a crash (at any point, round 1 included), new for each run started
    afresh in the directory and for other settings.

    A hospital keys its ledger entries by it: this run's reported epsilon, and a round it
    already charged, which a resumed run's replay gets back as released instead of trained and
    charged again (``client.released_rounds``). A fresh nonce (``RUN_DIR/run-nonce``, removed
    when the run finishes) keeps a finished study run again in the same directory apart.
    """
    nonce_file = Path(run_dir) / RUN_NONCE_FILE
    if not nonce_file.is_file():
        nonce_file.write_text(secrets.token_hex(16) + "\n")
    nonce = nonce_file.read_text().strip()
    key = f"{Path(run_dir).resolve()}\n{fingerprint}\n{nonce}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def run_study_rounds(grid: Grid, study: Study, records: RunRecords,
                     test_set: ImageSet | None = None, on_round: RoundCallback | None = None,
                     on_reply: ReplyCallback | None = None, study_check: bool = False
                     ) -> FederationOutcome:
    """:func:`run_federation` for a :class:`~server.study.Study`."""
    return run_federation(grid, study.federation, study.model, study.train, test_set, records,
                          on_round, on_reply, study.privacy, classes=study.classes,
                          evaluation=study.evaluation, study_check=study_check,
                          segmentation=study.segmentation)


def study_round_config(study: Study) -> ConfigRecord:
    """The config every training message of ``study`` carries (its run key left empty), as
    the study check sends it: what ``medfed hospital check --study`` checks at a hospital."""
    federation = study.federation
    dp = replace(study.privacy, dp_run_rounds=study.privacy.dp_run_rounds or federation.rounds,
                 update_hospitals=study.privacy.update_hospitals or federation.min_hospitals)
    wire, _ = _round_configs(federation, study.model, study.train, dp, study.classes, "",
                             study.segmentation)
    return check_config(wire, federation)


def _check_study(grid: Grid, records: RunRecords, federation: FederationConfig,
                 round_config: ConfigRecord, done: int) -> None:
    """Ask every hospital a dry run of the rest of the study (``server.preflight``).

    Raises:
        FederationError: a hospital would refuse it: naming the hospital and the setting.
    """
    failed = check_study(grid, check_config(round_config, federation, done),
                         federation.round_timeout_s, records.hospital_name, records.run_dir)
    # Only answered refusals stop the run: an absent hospital is the rounds' business.
    if failed:
        raise FederationError(
            f"the study was not started: {len(failed)} of its settings would be refused: "
            f"{'; '.join(failed)}. Change the setting named (at that hospital, or in the "
            f"study), then start the study again; each hospital's answers are in "
            f"{records.run_dir / CHECK_FILE}, and 'medfed hospital check --dir SITE --study "
            f"STUDY' shows the same items at a hospital.")


def _save_arrays(arrays: ArrayRecord, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: t.contiguous() for k, t in arrays.to_torch_state_dict().items()}, str(tmp))
    tmp.replace(path)


def _examples(combined: dict[str, Any]) -> dict[str, Any]:
    """The examples a round's combined validation rests on: all evaluated (``examples``) and
    those of the hospitals whose split held more than one class (``auc_examples``: the AUC's
    share; a warning when it is smaller)."""
    if not combined.get("val_examples"):
        return {}
    out = {"examples": combined["val_examples"]}
    if combined.get("val_auc_examples") not in (None, ""):
        out["auc_examples"] = combined["val_auc_examples"]
        if out["auc_examples"] < out["examples"]:
            logger.warning("the published round's validation AUC rests on %s of its %s "
                           "validation examples: a hospital's split held one class (its "
                           "AUC is undefined)", out["auc_examples"], out["examples"])
    return out


def run_summary(records: RunRecords, study: Study, outcome: FederationOutcome) -> dict[str, Any]:
    """What ``summary.json`` holds for any run, simulated or deployed.

    ``published``: the round and rule; ``validation``: the combined validation metrics of the
    published round and ``validation_per_hospital`` each hospital's; ``federated``: the
    published adapter's test metrics when the coordinator held a test set.
    """
    history = {row["round"]: row for row in records.test_history()}
    chosen = history.get(outcome.published_round, {})
    hospitals = {r["hospital"]: r for r in records.train_rows()
                 if r["round"] == outcome.published_round and r.get("val_examples")}

    def metrics(row: dict[str, Any], prefix: str) -> dict[str, Any]:
        return {name: row.get(f"{prefix}_{name}") for name in RECORDED_METRIC_NAMES
                if row.get(f"{prefix}_{name}") is not None}

    rounds = sorted(r for r in history if r > 0)
    summary: dict[str, Any] = {
        "rounds": study.federation.rounds,
        "strategy": study.federation.strategy,
        "task": study.federation.task,
        "classes": study.classes,
        "hospitals": len({r["hospital"] for r in records.train_rows()}),
        "backbone": study.model.backbone,
        "weights_sha256": study.model.weights_sha256,
        "initial_adapter": study.federation.initial_adapter,
        "initial_adapter_sha256": study.federation.initial_adapter_sha256,
        "published": {
            "round": outcome.published_round, "rule": outcome.rule,
            "select_by": study.evaluation.select_by,
            "prior": study.evaluation.prior or "equal class priors (the class-balanced rule "
                                               "logit-adjusted training learns)"},
        "validation": metrics(chosen, "val") | _examples(chosen),
        "validation_per_hospital": {h: metrics(r, "val") | {"examples": r["val_examples"]}
                                    for h, r in sorted(hospitals.items())},
        "val_auc_per_round": [history[r].get("val_auc") for r in rounds],
    }
    if study.evaluation.select_by != "auc":  # e.g. a segmentation study's Dice
        key = f"val_{study.evaluation.select_by}"
        summary[f"{key}_per_round"] = [history[r].get(key) for r in rounds]
    if any(row.get("test_auc") is not None for row in history.values()):
        summary["federated"] = metrics(chosen, "test")
        summary["test_auc_per_round"] = [history[r].get("test_auc")
                                         for r in sorted(history)]
    uploads = [r["upload_bytes"] for r in records.train_rows() if r.get("upload_bytes")]
    summary["bytes"] = {
        "upload_per_hospital_per_round": float(np.mean(uploads)) if uploads else 0.0,
        "adapter": int(sum(t.numel() * t.element_size()
                           for t in adapter_state(outcome.model).values())),
    }
    return summary | settings_summary(records, study)


def settings_summary(records: RunRecords, study: Study) -> dict[str, Any]:
    """What ``summary.json`` says of the run's privacy and secure aggregation, and of the
    hospital rounds that were not evaluated.

    ``secure_aggregation``: the study's settings (``enabled`` first); ``privacy_settings``:
    its ``[privacy]`` settings; ``privacy``: the hospitals' reported epsilons, the largest
    (``epsilon_max``), the study's target and whether a hospital went past it
    (``target_exceeded``, also logged as a warning); ``not_evaluated``: each hospital round
    without an evaluation and why (training counted all the same).
    """
    out: dict[str, Any] = {
        "secure_aggregation": asdict(study.federation.secure_aggregation),
        "privacy_settings": asdict(study.privacy),
        "not_evaluated": records.not_evaluated(),
    }
    privacy = records.privacy_summary()
    target = study.privacy.dp_target_epsilon
    if privacy and target > 0:
        largest = privacy.get("epsilon_max")
        privacy["target_epsilon"] = target
        privacy["target_exceeded"] = largest is not None and largest > target * (1 + 1e-9)
        if privacy["target_exceeded"]:
            logger.warning("a hospital reports epsilon %.4g for this run, above the study's "
                           "target %g (summary.json 'privacy')", largest, target)
    if privacy:
        out["privacy"] = privacy
    return out


def _evaluate_as_published(strategy: Strategy, prior: list[float], num_classes: int) -> None:
    """Make ``strategy``'s evaluate messages carry the global adapter as the run would publish
    it: the study's class prior put back (:func:`server.evaluation.with_prior`)."""
    plain = strategy.configure_evaluate

    def configure_evaluate(server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return plain(server_round, with_prior(arrays, prior, num_classes), config, grid)

    strategy.configure_evaluate = configure_evaluate  # type: ignore[method-assign]


def _observe(reply: Reply, records: RunRecords, on_reply: ReplyCallback | None) -> None:
    records.add_reply(reply)
    if on_reply is not None:
        on_reply(reply)


def _check_rounds(records: RunRecords, federation: FederationConfig) -> None:
    """Flower ends a run normally even when hospitals failed: check each round's updates."""
    for server_round in range(1, federation.rounds + 1):
        _check_round(records, federation, server_round)


def _check_round(records: RunRecords, federation: FederationConfig, server_round: int) -> None:
    """Raise when ``server_round`` trained fewer than ``federation.min_hospitals`` updates.

    Only training counts: a hospital that trained but did not evaluate (its run policy's
    ``min_evaluation_examples``, say) gave the round its update; the records say why it did
    not evaluate (``evaluation_error``).

    Raises:
        FederationError: naming every hospital's training failure and what to do.
    """
    rows = [r for r in records.train_rows() if r["round"] == server_round]
    good = [r for r in rows if trained(r)]
    if len(good) >= federation.min_hospitals:
        return
    errors = [f"hospital {r['hospital']}: {r['train_error']}" for r in rows
              if r.get("train_error")]
    records.write_metrics()
    raise FederationError(
        f"round {server_round} got {len(good)} valid updates, needs "
        f"{federation.min_hospitals}; {'; '.join(errors) or 'no hospital answered'}. "
        f"See {records.run_dir / 'metrics.csv'}. {RESUME_ADVICE.format(done=server_round - 1)}"
    )
