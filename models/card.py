"""The adapter's card: what a published adapter is, machine-readable, in ``adapter/card.json``.

Every published adapter carries a card: the study, the task and its classes in order, the base
model and the SHA-256 of its weights, the preprocessing the adapter was trained with, how the
federation ran (rounds, hospitals, strategy), the validation metrics of the published round,
the decision rule and class prior, the privacy mechanisms with the largest epsilon any hospital
reported, secure aggregation on or off, the code that wrote it, and the SHA-256 of every
adapter file. :func:`read_card` refuses a card with an unknown key, a missing key or a bad value.

The fields a prediction depends on (task, classes, model, preprocessing) are also written into
the adapter file's own safetensors metadata (:data:`PINS_METADATA_KEY`), which the card's
adapter hash covers: a card edited by hand no longer agrees with its adapter
(:func:`embedded_pins`). The card is not a signature: whoever can rewrite both files and the
hash can forge it; compare the adapter's SHA-256 with the one the consortium announced.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load, save

from core.errors import MedfedError
from core.hashing import file_sha256
from core.settings import SettingsError, load_settings, setting
from models.adapters import ADAPTER_FILE

logger = logging.getLogger(__name__)

CARD_FILE = "card.json"
"""The card's file name in a published adapter folder."""
CARD_FORMAT = 1
"""Version of the card's layout; a reader refuses other versions."""
TASKS = ("classification", "segmentation")
"""What an adapter can be for."""
PINS_METADATA_KEY = "medfed.pins"
"""safetensors metadata key holding the card's prediction-relevant fields as JSON."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_CARD_BYTES = 1 << 20
_MAX_HEADER_BYTES = 100 << 20


class CardError(MedfedError, ValueError):
    """A card that cannot be used: unreadable, unknown or missing keys, bad values."""


def _finite_numbers(values: dict[str, Any], where: str, allow_none: bool = False,
                    allow_text: bool = False) -> None:
    """Refuse a mapping whose keys are not strings or whose values are not finite numbers
    (or None, or strings, where allowed)."""
    if not isinstance(values, dict):
        raise CardError(f"{where}: expected a table, got {values!r}")
    for key, value in values.items():
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value)) or (allow_none and value is None) or (
                  allow_text and isinstance(value, str))
        if not isinstance(key, str) or not ok:
            raise CardError(f"{where}.{key} = {value!r}: expected a finite number")


def _sha256(value: str, where: str) -> None:
    """Refuse a value that is not a lower-case hex SHA-256."""
    if not _SHA256.match(value):
        raise CardError(f"{where} = {value!r}: expected 64 lower-case hex digits (a SHA-256)")


@dataclass
class ModelPin:
    """The base model and the adapter's LoRA settings (``models.config.ModelConfig``).

    Attributes:
        backbone: registry name of the base model (``efficientnet-lite0-imagenet``...).
        weights_sha256: SHA-256 of the base weights the adapter was trained on.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator.
        lora_dropout: LoRA dropout (off at prediction).
        lora_targets: LoRA target entries as the run wrote them (empty: the backbone's default).
    """

    backbone: str
    weights_sha256: str
    lora_r: int = setting(ge=1)
    lora_alpha: int = setting(ge=1)
    lora_dropout: float = setting(ge=0.0, lt=1.0)
    lora_targets: list[str]

    def __post_init__(self) -> None:
        """Refuse a weights pin that is not a SHA-256."""
        _sha256(self.weights_sha256, "model.weights_sha256")


@dataclass
class Preprocessing:
    """How an image becomes the model's input, as the adapter was trained.

    Attributes:
        image_size: side of the square input in pixels (a volume: of the cube).
        spatial_dims: 2 for images ``(B, C, S, S)``, 3 for volumes ``(B, 1, S, S, S)``.
        channels: channels the backbone takes (grayscale input is repeated to them).
        frames: which frames of a file or series are read (``imaging.settings.FRAME_MODES``).
        mean: per-channel mean subtracted after scaling to [0, 1] (empty: none).
        std: per-channel standard deviation divided by (empty: none).
        pixels: the decoding pipeline's settings (``imaging.transforms.transform_settings``).
    """

    image_size: int = setting(ge=1)
    spatial_dims: int = setting(choices=(2, 3))
    channels: int = setting(ge=1)
    frames: str = setting(choices=("middle", "all", "volume"))
    mean: list[float]
    std: list[float]
    pixels: dict[str, Any]

    def __post_init__(self) -> None:
        """Refuse a pipeline table of other values, or a normalisation that cannot work."""
        if not isinstance(self.pixels, dict) or not all(
                isinstance(k, str) and isinstance(v, str | int) and not isinstance(v, bool)
                for k, v in self.pixels.items()):
            raise CardError(f"preprocessing.pixels = {self.pixels!r}: expected a table of "
                            "strings and whole numbers")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise CardError(f"preprocessing: mean {self.mean} and std {self.std} need one "
                            "value each per channel, std > 0")


@dataclass
class Decision:
    """How the adapter's output becomes a class.

    Attributes:
        rule: the decision rule, in words (``argmax of the class probabilities``).
        prior: the class prior put back into the head (one share per class); empty: equal
            priors (the class-balanced rule logit-adjusted training learns).
        select_by: the combined validation metric that chose the published round.
        selection: how that round was chosen, in words.
    """

    rule: str
    prior: list[float]
    select_by: str
    selection: str


@dataclass
class PrivacyRecord:
    """The run's privacy mechanisms.

    Attributes:
        dpsgd: hospitals trained with DP-SGD (example-level DP).
        update_dp: hospitals clipped and noised their updates (client-level DP).
        parameters: the run's ``[privacy]`` settings (``privacy.config.DPConfig``): numbers
            (booleans as 0/1) and names (the accountant, the optimiser).
        epsilon_max: the largest epsilon any hospital reported for this run (None: none did).
        delta: the delta those epsilons are stated for (None: none reported).
    """

    dpsgd: bool
    update_dp: bool
    parameters: dict[str, float | str]
    epsilon_max: float | None
    delta: float | None

    def __post_init__(self) -> None:
        """Refuse non-finite or non-numeric privacy figures."""
        _finite_numbers(self.parameters, "privacy.parameters", allow_text=True)
        _finite_numbers({"epsilon_max": self.epsilon_max, "delta": self.delta}, "privacy",
                        allow_none=True)


@dataclass
class AdapterCard:
    """What a published adapter is (``adapter/card.json``).

    Attributes:
        format: the card layout's version (:data:`CARD_FORMAT`).
        study: the study's name (its run directory's name).
        declared_task: the task the study declared to the hospitals (``federation.task``).
        task: ``classification`` or ``segmentation``.
        classes: class names in the order of the model's outputs.
        model: the base model, its weights pin and the LoRA settings.
        preprocessing: how images become the model's input.
        rounds: federated rounds the run ran.
        published_round: the round whose global adapter this is.
        hospitals: hospitals that trained in the run.
        strategy: the aggregation strategy.
        validation: the hospitals' combined validation metrics of the published round
            (``auc``, ``accuracy``... and ``examples``).
        decision: the decision rule and class prior.
        privacy: the privacy mechanisms and the largest reported epsilon.
        secure_aggregation: the coordinator saw only sums of updates.
        medfed_version: medfed's version that wrote the card.
        code_commit: git commit of that code (``unknown`` outside a git checkout).
        adapter_files: SHA-256 of each file of the adapter folder, by file name.
    """

    format: int = setting(choices=(CARD_FORMAT,))
    study: str
    declared_task: str
    task: str = setting(choices=TASKS)
    classes: list[str]
    model: ModelPin
    preprocessing: Preprocessing
    rounds: int = setting(ge=1)
    published_round: int = setting(ge=0)
    hospitals: int = setting(ge=0)
    strategy: str
    validation: dict[str, float]
    decision: Decision
    privacy: PrivacyRecord
    secure_aggregation: bool
    medfed_version: str
    code_commit: str
    adapter_files: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse bad classes, metrics, prior or file hashes."""
        if len(self.classes) < 2 or len({c.casefold() for c in self.classes}) != len(
                self.classes) or not all(c.strip() for c in self.classes):
            raise CardError(f"classes = {self.classes}: need two or more distinct, non-empty "
                            "names")
        _finite_numbers(self.validation, "validation")
        prior = self.decision.prior
        if prior and (len(prior) != len(self.classes) or any(p <= 0 for p in prior)):
            raise CardError(f"decision.prior = {prior}: needs one share > 0 per class")
        if not isinstance(self.adapter_files, dict):
            raise CardError(f"adapter_files = {self.adapter_files!r}: expected a table")
        for name, digest in self.adapter_files.items():
            if not isinstance(name, str) or "/" in name or name.startswith(".") or \
                    not isinstance(digest, str):
                raise CardError(f"adapter_files: {name!r} is not a file name in the folder")
            _sha256(digest, f"adapter_files.{name}")

    def pins(self) -> dict[str, Any]:
        """The fields a prediction depends on, as embedded in the adapter file."""
        return {"task": self.task, "classes": list(self.classes),
                "model": asdict(self.model), "preprocessing": asdict(self.preprocessing)}

    def to_json(self) -> str:
        """The card as indented JSON (keys in field order)."""
        return json.dumps(asdict(self), indent=2) + "\n"


def card_from_values(values: Any, where: str) -> AdapterCard:
    """An :class:`AdapterCard` from parsed JSON; every key required, none unknown.

    Raises:
        CardError: naming ``where``, the key and what is allowed.
    """
    try:
        card = load_settings(AdapterCard, values, where)
    except (SettingsError, TypeError) as err:
        raise CardError(f"{err}".replace("__init__() ", "")) from err
    if ADAPTER_FILE not in card.adapter_files:
        raise CardError(f"{where}: adapter_files must list {ADAPTER_FILE} with its SHA-256")
    return card


def read_card(path: Path) -> AdapterCard:
    """Read ``path`` (a ``card.json`` or the adapter folder holding one).

    Raises:
        CardError: missing, too large, not JSON, or a key/value the card refuses.
    """
    path = Path(path)
    file = path / CARD_FILE if path.is_dir() else path
    if not file.is_file():
        raise CardError(f"{file}: no adapter card here; give a run directory or the adapter "
                        "folder of a run made by this medfed version")
    if file.stat().st_size > _MAX_CARD_BYTES:
        raise CardError(f"{file}: {file.stat().st_size} bytes is too large for a card")
    try:
        values = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CardError(f"{file}: not valid JSON ({err})") from err
    return card_from_values(values, str(file))


def adapter_files_sha256(folder: Path) -> dict[str, str]:
    """SHA-256 of each file of an adapter folder (the card and hidden files left out)."""
    return {p.name: file_sha256(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != CARD_FILE and not p.name.startswith(".")}


def embed_pins(folder: Path, card: AdapterCard) -> None:
    """Rewrite the adapter file with ``card.pins()`` in its safetensors metadata (same
    tensors, same names; peft's own ``format`` entry kept)."""
    file = Path(folder) / ADAPTER_FILE
    data = file.read_bytes()
    metadata = safetensors_metadata(data, file) | {
        "format": "pt", PINS_METADATA_KEY: json.dumps(card.pins(), sort_keys=True)}
    tmp = file.with_suffix(".tmp")
    tmp.write_bytes(save(load(data), metadata=metadata))
    tmp.replace(file)


def write_card(folder: Path, card: AdapterCard) -> Path:
    """Embed the pins in the adapter file, hash the folder's files into the card and write
    ``folder/card.json``; returns its path. The card is read back before it is kept."""
    embed_pins(folder, card)
    card.adapter_files = adapter_files_sha256(folder)
    text = card.to_json()
    card_from_values(json.loads(text), "the card being written")
    path = Path(folder) / CARD_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    logger.info("adapter card: %s", path)
    return path


def safetensors_metadata(data: bytes, where: Path | str) -> dict[str, str]:
    """The ``__metadata__`` table of a safetensors file's bytes (empty if it has none).

    Raises:
        CardError: the header is not a safetensors header.
    """
    if len(data) < 8:
        raise CardError(f"{where}: too short for a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(len(data) - 8, _MAX_HEADER_BYTES):
        raise CardError(f"{where}: not a safetensors file (header size {size})")
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CardError(f"{where}: not a safetensors header ({err})") from err
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return dict(metadata) if isinstance(metadata, dict) else {}


def embedded_pins(data: bytes, where: Path | str) -> dict[str, Any] | None:
    """The pins an adapter file's metadata holds (None: written before cards existed)."""
    text = safetensors_metadata(data, where).get(PINS_METADATA_KEY)
    if text is None:
        return None
    try:
        pins = json.loads(text)
    except json.JSONDecodeError as err:
        raise CardError(f"{where}: its {PINS_METADATA_KEY} metadata is not JSON") from err
    if not isinstance(pins, dict):
        raise CardError(f"{where}: its {PINS_METADATA_KEY} metadata is not a table")
    return pins
