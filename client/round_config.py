"""Every value the coordinator sends in a round's config, typed and bounded before anything
reads it.

The ClientApp's mod :func:`typed_config_mod` reads the incoming ``config`` record once
(:func:`read_round_config`) and replaces it with a record rebuilt from the typed values
(:func:`to_record`), so the handlers, the run policy and secure aggregation see only checked
values. A value that does not pass is refused with an error reply
(``round-config: <key> = <value>: <why>``, code :data:`ROUND_CONFIG_CODE`) before any data is
loaded or any model built; the egress audit logs it like every reply.

What is checked:

* types: a whole number is an ``int`` (never a string, float or bool), a number is an ``int``
  or ``float`` (never a bool), a flag a ``bool``, names strings, lists lists of their type;
* limits: each field's own (``core.settings.setting``), and the upper bounds in
  :data:`UPPER` (a value past them is not a study, it is an attack on the hospital's memory,
  time or privacy accounting); every float finite;
* consistency: the study's ``classes`` name ``num_classes`` distinct classes; ``hetlora``
  ranks lie in ``1..lora_r``; DP settings come all together or not at all;
* what only the hospital may set: ``update-min-sum-size`` is reset to 0 (the hospital's
  secure-aggregation handler sets its own).

Keys the hospital does not know are dropped (logged): nothing reads them. The run policy's
bounds (``client.run_policy``) then apply to these typed values, and
:func:`check_fresh_round` refuses a training round this run already answered.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from core.errors import MedfedError
from core.settings import SettingsError, load_settings
from models.config import ModelConfig, SegmentationConfig, TrainConfig, to_config_record
from models.lora_parts import EXCHANGES
from models.registry import UnknownBackboneError, backbone_spec
from privacy.accounting import MAX_NOISE_MULTIPLIER
from privacy.config import DPConfig

logger = logging.getLogger(__name__)

CONFIG_KEY = "config"
"""The message's config record (both ``train`` and ``evaluate``)."""
ROUND_CONFIG_CODE = 400
"""Flower error code of a round config the hospital refused."""
ROUNDS_STATE_KEY = "answered-rounds"
"""Where ``context.state`` keeps the last training round this run answered."""

MAX_ROUND = 1_000_000
MAX_CLASSES = 1000
"""Most classes a study may have: refused before a head is allocated (``(F, classes)``)."""
STUDY_CHECK_COUNTS = ("study-rounds", "rounds-left", "evaluations")
"""Whole numbers the study check's query adds to a round config (``server.preflight``)."""
MAX_NAME = 256
"""Longest class name, task, run key or weights hash (characters)."""
MAX_LIST = 10_000
"""Longest list (classes, LoRA targets, hetlora ranks)."""

UPPER: dict[str, float] = {
    # the model (pixels, classes, LoRA)
    "image_size": 8192, "num_classes": MAX_CLASSES, "lora_r": 512, "lora_alpha": 8192,
    # local training per round; lr_decay > 1 would compound the rate over the rounds
    "local_epochs": 1000, "local_steps": 1_000_000, "batch_size": 65_536, "lr": 10.0,
    "lr_decay": 1.0, "weight_decay": 10.0, "proximal_mu": 1e4, "seed": 2**32 - 1,
    # DP: noise multipliers past MAX_NOISE_MULTIPLIER add nothing but accountant time
    "dp_noise_multiplier": MAX_NOISE_MULTIPLIER, "dp_target_epsilon": 1000.0,
    "dp_delta": 0.1, "dp_max_grad_norm": 1000.0, "dp_lr": 10.0, "dp_run_rounds": MAX_ROUND,
    "dp_augmentations": 64, "update_clip_norm": 1000.0,
    "update_noise_multiplier": MAX_NOISE_MULTIPLIER, "update_hospitals": 10_000,
}
"""Inclusive upper bound of each numeric setting a hospital takes from the coordinator."""
LOWER: dict[str, float] = {"seed": 0, "dp_delta": 1e-12}
"""Lower bounds beyond the fields' own (``seed``: NumPy and torch take non-negative seeds)."""


class RoundConfigError(MedfedError, ValueError):
    """A coordinator value of the wrong type, out of bounds, or inconsistent; the message
    names the key and the value (the coordinator's own), never the hospital's data."""


@dataclass(frozen=True)
class RoundConfig:
    """The round's settings, typed and bounded.

    Attributes:
        model: the model the run adapts.
        train: local training per round.
        dp: the run's DP settings, ``None`` when the record carries none.
        server_round: the round number, ``1..MAX_ROUND``.
        extras: the other known keys the record carried, typed (``task``, ``min-hospitals``,
            ``classes``, ``run-key``, ``adapter-exchange``, ``hetlora``, ``hetlora-ranks``;
            the study check's ``study-rounds``, ``rounds-left``, ``evaluations`` and
            ``secure-aggregation``).
        segmentation: a segmentation run's settings (``box-shift``, slices per case...),
            ``None`` when the record carries none (the handlers then use the defaults).
    """

    model: ModelConfig
    train: TrainConfig
    dp: DPConfig | None
    server_round: int
    extras: dict[str, Any] = field(default_factory=dict)
    segmentation: SegmentationConfig | None = None


def _refuse(key: str, value: Any, why: str) -> RoundConfigError:
    shown = repr(value)
    return RoundConfigError(f"{key} = {shown[:80]}{'...' if len(shown) > 80 else ''}: {why}")


def whole_number(record: ConfigRecord, key: str, low: int, high: int) -> int:
    """``record[key]`` as an ``int`` in ``low..high``; a string, float or bool is refused."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(key, value, "expected a whole number")
    if not low <= value <= high:
        raise _refuse(key, value, f"must be between {low} and {high}")
    return value


def _names(record: ConfigRecord, key: str) -> list[str]:
    """``record[key]`` as a list of at most :data:`MAX_LIST` strings of 1..MAX_NAME chars."""
    value = record[key]
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise _refuse(key, value, f"expected a list of at most {MAX_LIST} strings")
    if any(not isinstance(v, str) or not 0 < len(v) <= MAX_NAME for v in value):
        raise _refuse(key, value, f"expected strings of 1 to {MAX_NAME} characters")
    return list(value)


def _text(record: ConfigRecord, key: str) -> str:
    value = record[key]
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise _refuse(key, value, f"expected a string of at most {MAX_NAME} characters")
    return value


def check_bounds(settings: Any) -> None:
    """Every float of ``settings`` (a settings dataclass) finite, every number within
    :data:`UPPER` and :data:`LOWER`; raise :class:`RoundConfigError` naming the first that
    is not."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        key = f.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise _refuse(key, value, "must be a finite number")
        if f.name in UPPER and value > UPPER[f.name]:
            raise _refuse(key, value, f"must be at most {UPPER[f.name]:g}")
        if f.name in LOWER and value < LOWER[f.name]:
            raise _refuse(key, value, f"must be at least {LOWER[f.name]:g}")


def _settings(cls: type, record: ConfigRecord, optional: bool = False) -> Any:
    """``cls`` read from ``record``'s dashed keys with the settings reader's types and limits
    (:func:`core.settings.load_settings`), then :func:`check_bounds`. ``None`` when
    ``optional`` and no key of ``cls`` is present; a missing key otherwise is refused."""
    keys = {f.name.replace("_", "-"): f.name for f in fields(cls)}
    present = [k for k in keys if k in record]
    if optional and not present:
        return None
    missing = sorted(set(keys) - set(present))
    if missing:
        raise RoundConfigError(f"the round config lacks {missing}")
    values = {k: list(record[k]) if isinstance(record[k], list) else record[k] for k in keys}
    try:
        settings = load_settings(cls, values, "round config")
    except (SettingsError, OverflowError) as err:  # OverflowError: an int past any float
        raise RoundConfigError(str(err).removeprefix("round config: ")) from None
    check_bounds(settings)
    return settings


def _extras(record: ConfigRecord, model: ModelConfig) -> dict[str, Any]:
    """The known keys beyond the settings, typed and checked against ``model``."""
    extras: dict[str, Any] = {}
    if "min-hospitals" in record:
        extras["min-hospitals"] = whole_number(record, "min-hospitals", 0, 100_000)
    for key in STUDY_CHECK_COUNTS:  # the study check's query (client.study_check)
        if key in record:
            extras[key] = whole_number(record, key, 0, MAX_ROUND)
    if "secure-aggregation" in record:
        if not isinstance(record["secure-aggregation"], bool):
            raise _refuse("secure-aggregation", record["secure-aggregation"],
                          "expected true or false")
        extras["secure-aggregation"] = record["secure-aggregation"]
    for key in ("task", "run-key"):
        if key in record:
            extras[key] = _text(record, key)
    if "adapter-exchange" in record:
        if record["adapter-exchange"] not in EXCHANGES:
            raise _refuse("adapter-exchange", record["adapter-exchange"],
                          f"must be one of {list(EXCHANGES)}")
        extras["adapter-exchange"] = record["adapter-exchange"]
    if "classes" in record:
        classes = _names(record, "classes")
        if len(classes) != model.num_classes or len({c.casefold() for c in classes}) != len(
                classes):
            raise _refuse("classes", classes, f"must name num-classes = {model.num_classes} "
                          "distinct classes")
        extras["classes"] = classes
    if "hetlora" in record:
        if not isinstance(record["hetlora"], bool):
            raise _refuse("hetlora", record["hetlora"], "expected true or false")
        extras["hetlora"] = record["hetlora"]
    if "hetlora-ranks" in record:
        ranks = record["hetlora-ranks"]
        if not isinstance(ranks, list) or len(ranks) > MAX_LIST or any(
                isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= model.lora_r
                for r in ranks):
            raise _refuse("hetlora-ranks", ranks, f"expected a list of whole numbers in "
                          f"1..lora-r ({model.lora_r})")
        extras["hetlora-ranks"] = list(ranks)
    return extras


def read_round_config(record: ConfigRecord) -> RoundConfig:
    """The typed, bounded settings of a coordinator's round config.

    Raises:
        RoundConfigError: a value of the wrong type, out of bounds or inconsistent.
    """
    model = _settings(ModelConfig, record)
    train = _settings(TrainConfig, record)
    dp = _settings(DPConfig, record, optional=True)
    if dp is not None and dp.update_min_sum_size:
        # Set only by the hospital's own secure-aggregation handler, never by the coordinator.
        dp = replace(dp, update_min_sum_size=0)
    if "server-round" not in record:
        raise RoundConfigError("the round config lacks 'server-round'")
    server_round = whole_number(record, "server-round", 1, MAX_ROUND)
    segmentation = _settings(SegmentationConfig, record, optional=True)
    known = ({f.name.replace("_", "-") for c in (ModelConfig, TrainConfig, DPConfig,
                                                 SegmentationConfig)
              for f in fields(c)} | {"server-round", "min-hospitals", "task", "run-key",
                                     "adapter-exchange", "classes", "hetlora", "hetlora-ranks",
                                     "secure-aggregation", *STUDY_CHECK_COUNTS})
    if unknown := sorted(set(record) - known):
        logger.warning("round config: dropped keys this hospital does not know: %s",
                       unknown[:10])
    return RoundConfig(model, train, dp, server_round, _extras(record, model), segmentation)


def backbone_spec_task(backbone: str) -> str:
    """The task a registered backbone is for (``classification`` for any other name)."""
    try:
        return backbone_spec(backbone).task
    except UnknownBackboneError:
        return "classification"


def to_record(config: RoundConfig) -> ConfigRecord:
    """The ConfigRecord the handlers read: the typed values only, in the wire's key style."""
    # A segmentation run's settings always reach its handlers: the coordinator's, or defaults.
    segmentation = config.segmentation
    if segmentation is None and backbone_spec_task(config.model.backbone) == "segmentation":
        segmentation = SegmentationConfig()
    record = to_config_record(config.model, config.train,
                              *([config.dp] if config.dp is not None else []),
                              *([segmentation] if segmentation is not None else []))
    record["server-round"] = config.server_round
    for key, value in config.extras.items():
        record[key] = value
    return record


def typed_config_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace ``msg``'s config record with its typed, bounded form before the handlers run;
    refuse the message (an error reply naming the key) when it does not pass."""
    if msg.has_content() and CONFIG_KEY in msg.content.config_records:
        try:
            typed = read_round_config(msg.content.config_records[CONFIG_KEY])
        except RoundConfigError as err:
            logger.warning("refused a %s message: round config %s",
                           msg.metadata.message_type, err)
            return Message(Error(code=ROUND_CONFIG_CODE, reason=f"round-config: {err}"),
                           reply_to=msg)
        msg.content[CONFIG_KEY] = to_record(typed)
    return call_next(msg, context)


class RoundReplay(MedfedError, ValueError):
    """A training round this run already answered (or one before it)."""


def check_fresh_round(context: Context, server_round: int) -> None:
    """Refuse a training round at or below the last one this run answered (a replay would
    release a second update of the same round from the same start)."""
    state = context.state.config_records.get(ROUNDS_STATE_KEY)
    last = int(state["train"]) if state is not None else 0
    if server_round <= last:
        raise RoundReplay(f"round-replay: round {server_round} is not after round {last}, "
                          "which this run already answered")


def record_answered_round(context: Context, server_round: int) -> None:
    """Note that this run answered training round ``server_round``."""
    context.state[ROUNDS_STATE_KEY] = ConfigRecord({"train": int(server_round)})
