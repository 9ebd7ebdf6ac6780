"""Foundation-model registry, LoRA wrapping and adapter tensors; shared by coordinator and
hospital. Settings, errors and Flower compatibility live one room below, in ``core``."""

import core  # noqa: F401  (sets Flower environment defaults before Flower loads)
