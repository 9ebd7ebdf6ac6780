"""Settings of the aggregation rules (``[federation.options]`` in a simulation TOML)."""

from __future__ import annotations

from dataclasses import dataclass

from core.settings import setting


@dataclass
class StrategyOptions:
    """Knobs of the strategies in :data:`strategies.STRATEGIES`; each rule reads its own.

    Attributes:
        server_lr: server learning rate (eta) of ``fedadam`` / ``fedyogi``, applied to the
            averaged adapter delta. Adapter values are small (LoRA B starts at 0), so it is far
            below Flower's default of 0.1.
        server_tau: adaptivity floor (tau) of ``fedadam`` / ``fedyogi``.
        beta_1: first-moment decay of ``fedadam`` / ``fedyogi``.
        beta_2: second-moment decay of ``fedadam`` / ``fedyogi``.
        proximal_mu: weight of FedProx's proximal term ``mu/2 * ||w - w_global||^2`` at the
            hospitals (``fedprox``).
        trim_fraction: share of updates cut at each end, per coordinate (``trimmed-mean``).
        clip_norm: ``norm-bound``: each update ``new - global`` is scaled down to this L2 norm;
            0 uses the median norm of the round's updates (no tuning, robust to a minority).
        max_update_norm: every strategy drops an update whose L2 norm ``||new - global||``
            exceeds this (logged with the hospital); 0 means no bound.
        hetlora_ranks: ``hetlora``: LoRA rank of each hospital, hospital ``k`` (partition id)
            taking ``hetlora_ranks[k % len]``; a hospital's node config ``lora-rank`` takes
            precedence; empty: every hospital at the global ``lora_r``. Each must be at most
            the global rank (``model.lora_r``, checked when the study is read).
    """

    server_lr: float = setting(0.01, gt=0.0)
    server_tau: float = setting(1e-3, gt=0.0)
    beta_1: float = setting(0.9, ge=0.0, lt=1.0)
    beta_2: float = setting(0.99, ge=0.0, lt=1.0)
    proximal_mu: float = setting(0.01, ge=0.0)
    # Below one half: a trim of half or more at each end leaves no update to average.
    trim_fraction: float = setting(0.2, ge=0.0, lt=0.5)
    clip_norm: float = setting(0.0, ge=0.0)
    max_update_norm: float = setting(0.0, ge=0.0)
    hetlora_ranks: list[int] = setting(default_factory=list, ge=1)
