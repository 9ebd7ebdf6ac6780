"""Foundation-model registry, LoRA wrapping and adapter tensors; shared by coordinator and hospital.

Importing any medfed package imports this one first, which sets Flower's environment defaults
before Flower itself is imported: no telemetry, no update check, and no runtime dependency
installation (it would use uv, which pulls a CUDA build of torch). Set a variable yourself to
override its default.
"""

import os

FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray's future default, set now: silences a warning on every run (no GPUs are used).
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
for _name, _value in FLOWER_ENV_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
