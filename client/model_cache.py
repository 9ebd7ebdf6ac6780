"""One LoRA model per process and model config: built (and its weights checked) once.

Each message overwrites every adapter tensor with the coordinator's, so reusing the model across
rounds carries nothing over from one round to the next but saves rebuilding the backbone.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import lru_cache

from peft import PeftModel

from models.config import ModelConfig
from models.lora import build_lora_model


@lru_cache(maxsize=2)
def _cached(config_json: str) -> PeftModel:
    return build_lora_model(ModelConfig(**json.loads(config_json)), verify=True)


def lora_model_for(config: ModelConfig) -> PeftModel:
    """The process's model for ``config`` (built on first use, after the weights hash check)."""
    return _cached(json.dumps(asdict(config), sort_keys=True))
