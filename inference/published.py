"""A published adapter, checked pin by pin and rebuilt on its pinned base weights.

:func:`load_published` finds the adapter folder (a run directory or the folder itself), reads
its card strictly, and refuses, naming the pin and what to do, any of: a task this code does not
run (a segmentation adapter must be a LiteMedSAM one with one structure); an adapter file whose
SHA-256 is not the card's; base weights on this machine that are not the ones the card pins; a
card whose task, classes, model or preprocessing disagree with what the adapter file itself was
published with; preprocessing this code would no longer reproduce; adapter tensors that do not
fit the model the card describes. Only then is the model built: a classifier
(``models.lora.build_lora_model``) or LiteMedSAM with LoRA on its mask decoder
(``models.segmentation.build_segmenter``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load

from core.errors import MedfedError
from core.settings import SettingsError
from imaging.preprocessing import describe_preprocessing, segmentation_preprocessing
from models.adapters import ADAPTER_FILE, AdapterMismatchError, load_adapter_state
from models.card import CARD_FILE, AdapterCard, CardError, embedded_pins, read_card
from models.classifier import ImageClassifier
from models.config import ModelConfig
from models.litemedsam import LORA_TARGETS
from models.lora import build_lora_model
from models.prefix_cache import PrefixCache
from models.registry import SEGMENTATION_BACKBONE, weights_sha256
from models.segmentation import build_segmenter

logger = logging.getLogger(__name__)

CLASSIFICATION, SEGMENTATION = "classification", "segmentation"


class PinError(MedfedError, ValueError):
    """The adapter, its card, or this machine's copy of what it pins do not agree; the
    message names the pin, both values and what to do."""


@dataclass
class Published:
    """A checked adapter, ready to run.

    Attributes:
        folder: the adapter folder.
        card: its card.
        config: the model settings rebuilt from the card.
        model: the base model with the adapter loaded, in eval mode, on ``device``.
        device: where the model runs (``cpu``, ``cuda``).
    """

    folder: Path
    card: AdapterCard
    config: ModelConfig
    model: PeftModel
    device: torch.device


def adapter_folder(path: Path) -> Path:
    """The adapter folder of ``path``: a run directory (``path/adapter``) or the folder.

    Raises:
        PinError: neither holds a card.
    """
    path = Path(path)
    for folder in (path / "adapter", path):
        if (folder / CARD_FILE).is_file():
            return folder
    raise PinError(f"{path}: no {CARD_FILE} in it or in {path / 'adapter'}; give a run directory "
                   "or its adapter folder, published by a medfed version that writes cards")


def check_task(card: AdapterCard) -> None:
    """Refuse an adapter for a task this code does not run."""
    if card.task not in (CLASSIFICATION, SEGMENTATION):
        raise PinError(f"task: the card says this adapter is for {card.task!r}; medfed predict "
                       f"runs {CLASSIFICATION} and {SEGMENTATION} adapters")


def check_segmentation_model(card: AdapterCard) -> None:
    """Refuse a segmentation adapter this code cannot run (checked after the card is known
    to agree with the adapter file, so that a tampered task is named as such)."""
    if card.task != SEGMENTATION:
        return
    if card.model.backbone != SEGMENTATION_BACKBONE:
        raise PinError(f"model.backbone: a segmentation adapter on {card.model.backbone!r}; "
                       f"medfed predict segments with {SEGMENTATION_BACKBONE!r} only")
    if len(card.classes) != 2:
        raise PinError(f"classes: {card.classes}: LiteMedSAM's decoder gives one mask per box, "
                       "so a segmentation card names the background and one structure (e.g. "
                       "['background', 'hippocampus'])")


def check_adapter_files(card: AdapterCard, folder: Path) -> bytes:
    """Check every adapter file against the card's SHA-256; returns the tensors file's bytes
    (hashed and later loaded from the same bytes: nothing can swap it in between)."""
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != CARD_FILE
               and not p.name.startswith(".")}
    if extra := sorted(present - set(card.adapter_files)):
        raise PinError(f"adapter: {folder} holds files the card does not list: {extra}; use "
                       "the adapter folder exactly as published")
    data = b""
    for name, pinned in sorted(card.adapter_files.items()):
        file = folder / name
        if not file.is_file():
            raise PinError(f"adapter: {file} is missing; the card lists it")
        content = file.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        if digest != pinned:
            raise PinError(f"adapter: {file} has SHA-256 {digest}, the card pins {pinned}; the "
                           "file was changed after publication: get the published adapter again")
        if name == ADAPTER_FILE:
            data = content
    return data


def check_weights(card: AdapterCard) -> None:
    """Refuse base weights on this machine that are not the card's."""
    local = weights_sha256(card.model.backbone)
    if local != card.model.weights_sha256:
        raise PinError(f"base weights: this machine's '{card.model.backbone}' has SHA-256 "
                       f"{local}, the adapter was trained on {card.model.weights_sha256}; "
                       "install the pinned weights")


def check_embedded(card: AdapterCard, data: bytes, where: Path) -> None:
    """Refuse a card whose task, classes, model or preprocessing differ from what the adapter
    file was published with (its metadata, covered by the adapter's hash)."""
    pins = embedded_pins(data, where)
    if pins is None:
        raise PinError(f"adapter: {where} carries no published pins (written before adapter "
                       "cards); publish it again with this medfed version")
    for key, value in card.pins().items():
        for name, said, published in _differences(key, value, pins.get(key)):
            raise PinError(f"{name}: the card says {said!r} but the adapter file was "
                           f"published with {published!r}; the card was edited: get the "
                           "published adapter folder again")


def _differences(name: str, card: object, published: object) -> list[tuple[str, object, object]]:
    """``(dotted name, card's value, published value)`` of each differing entry, tables
    compared key by key (so a message names ``preprocessing.image_size``, not the table)."""
    if isinstance(card, dict) and isinstance(published, dict):
        return [d for key in sorted(set(card) | set(published))
                for d in _differences(f"{name}.{key}", card.get(key), published.get(key))]
    return [] if card == published else [(name, card, published)]


def model_config(card: AdapterCard) -> ModelConfig:
    """The model settings the card describes (prediction: no LoRA dropout)."""
    return ModelConfig(
        backbone=card.model.backbone, image_size=card.preprocessing.image_size,
        num_classes=len(card.classes), lora_r=card.model.lora_r,
        lora_alpha=card.model.lora_alpha, lora_dropout=0.0,
        lora_targets=list(card.model.lora_targets), weights_sha256=card.model.weights_sha256)


def check_preprocessing(card: AdapterCard, config: ModelConfig, model: torch.nn.Module) -> None:
    """Refuse an adapter whose preprocessing this code would not reproduce (another pipeline
    version, normalisation or input size)."""
    local = asdict(segmentation_preprocessing() if card.task == SEGMENTATION
                   else describe_preprocessing(config, model))
    for key, value in asdict(card.preprocessing).items():
        if local[key] != value:
            raise PinError(f"preprocessing.{key}: the adapter was trained with {value!r}, this "
                           f"medfed prepares images with {local[key]!r}; use the medfed version "
                           f"that published it ({card.medfed_version}, {card.code_commit})")


def _load_state(model: PeftModel, card: AdapterCard, data: bytes, file: Path) -> None:
    """Load the adapter tensors from the checked bytes; a misfit names the classes."""
    try:
        state = load(data)
    except (SafetensorError, OSError) as err:
        raise PinError(f"adapter: {file} is not a readable safetensors file ({err})") from err
    try:
        load_adapter_state(model, state)
    except AdapterMismatchError as err:
        raise PinError(f"classes/model: {file} does not fit the model the card describes "
                       f"({len(card.classes)} classes {card.classes}, rank {card.model.lora_r}):"
                       f" {err}") from err


def _build_model(card: AdapterCard, config: ModelConfig) -> PeftModel:
    """The base model with the card's LoRA layout (adapter tensors not loaded yet)."""
    if card.task == SEGMENTATION:
        # The encoder stays frozen and unwrapped: LoRA lives on the mask decoder only.
        return build_segmenter(card.model.lora_r, card.model.lora_alpha,
                               tuple(card.model.lora_targets) or LORA_TARGETS)
    model = build_lora_model(config, verify=False)
    for module in model.modules():
        if isinstance(module, ImageClassifier):
            module.prefix_cache = PrefixCache(0)  # bounded memory: nothing kept per image
    return model


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``.

    Raises:
        SettingsError: ``cuda`` asked for on a machine without it, or an unknown name.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda: no CUDA device here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise SettingsError(f"--device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def load_published(path: Path, device: str = "auto") -> Published:
    """Find, check and rebuild a published adapter (module docstring: the checks' order).

    Raises:
        PinError: a pin does not hold (the message names it).
        models.card.CardError: the card is unreadable or refused.
    """
    folder = adapter_folder(path)
    card = read_card(folder)
    check_task(card)
    data = check_adapter_files(card, folder)
    check_weights(card)
    check_embedded(card, data, folder / ADAPTER_FILE)
    check_segmentation_model(card)
    config = model_config(card)
    model = _build_model(card, config)
    check_preprocessing(card, config, model)
    _load_state(model, card, data, folder / ADAPTER_FILE)
    target = resolve_device(device)
    model.to(target).eval()
    logger.info("adapter %s: every pin holds (%s, %s, %d classes)", folder, card.study,
                card.model.backbone, len(card.classes))
    return Published(folder, card, config, model, target)


__all__ = ["CardError", "PinError", "Published", "adapter_folder", "load_published",
           "resolve_device"]


def adapter_summary(published: Published) -> dict[str, Any]:
    """What a prediction's ``summary.json`` says of the adapter it ran: its folder, study,
    task, classes, base model and pins, and the round it was published from."""
    card = published.card
    return {"folder": str(published.folder), "study": card.study, "task": card.task,
            "classes": card.classes, "backbone": card.model.backbone,
            "weights_sha256": card.model.weights_sha256,
            "adapter_sha256": card.adapter_files.get("adapter_model.safetensors"),
            "published_round": card.published_round}
