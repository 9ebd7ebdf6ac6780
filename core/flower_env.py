"""Flower's environment defaults for every process medfed starts or runs in.

No telemetry, no update check, and no runtime dependency installation (it would use uv, which
pulls a CUDA build of torch). A variable already set is left as it is, so an operator can
override each default.
"""

from __future__ import annotations

import os

FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Ray's future default, set now: silences a warning on every run (no GPUs are used).
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
"""Variable -> value set unless the environment already has it."""


def set_flower_env_defaults() -> None:
    """Set each of :data:`FLOWER_ENV_DEFAULTS` that the environment does not set yet; the
    processes Flower starts (SuperNode, SuperExec, ClientApps, Ray workers) inherit them."""
    for name, value in FLOWER_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
