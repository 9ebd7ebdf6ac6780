"""The run's differential-privacy settings, sent by the coordinator like ``TrainConfig``.

The coordinator proposes the mechanism; each hospital's own :class:`privacy.policy.SitePolicy`
decides whether it takes part (see ``client.privacy_round``). Keys on the wire are the field names
in Flower's dashed style (``dp_max_grad_norm`` -> ``"dp-max-grad-norm"``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from flwr.app import ConfigRecord

from core.settings import check_settings, setting

ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("einsum", "functorch", "hooks", "ghost")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class DPConfig:
    """Sample-level DP-SGD (opacus) and client-level DP on updates; both off by default.

    Attributes:
        dpsgd: train locally with DP-SGD (per-example clipping + Gaussian noise, Poisson sampling).
        dp_noise_multiplier: noise std over ``dp_max_grad_norm``; 0 means "derive it from
            ``dp_target_epsilon``".
        dp_target_epsilon: epsilon the whole run may spend at each hospital (all rounds); used
            only when ``dp_noise_multiplier`` is 0.
        dp_delta: the delta epsilon is stated for (per example).
        dp_max_grad_norm: per-example gradient L2 clipping bound (its effect on the default
            run is in docs/results/2026-11-29-dp-sgd-probes.md).
        dp_accountant: ``rdp`` (Renyi DP) or ``prv`` (privacy random variables, tighter).
        dp_grad_sample_mode: per-example gradient engine: ``einsum`` (default: opacus' hooks
            engine with ``privacy.grad_samplers``' layout-independent Conv2d sampler; exact),
            ``functorch`` (exact, slower), ``hooks`` or ``ghost``. The last two are opacus' own
            Conv2d samplers, which assume contiguous NCHW strides and so are wrong on
            channels-last backbones such as the default one: their clipping would not bound
            what the accountant assumes, and
            ``privacy.grad_samplers.engine_module`` refuses them on a model with a trainable
            Conv2d. See ``tests/test_privacy.py``.
        dp_optimizer: the optimiser that takes DP-SGD's noised gradients: ``adamw`` (the
            non-private default) or ``sgd`` (with ``dp_momentum``, the usual DP-SGD choice;
            measured on the default run in docs/results/2026-11-29-dp-sgd-probes.md).
        dp_lr: learning rate under DP-SGD in round 1 (0: ``train.lr``); SGD needs a larger one
            than AdamW. The run's per-round ``lr_decay`` applies to it too.
        dp_momentum: SGD's momentum (``dp_optimizer = "sgd"`` only).
        dp_augmentations: augmentation multiplicity ``k`` (``privacy.augmult``): each sampled
            example is seen as ``k`` randomly shifted views (up to 1/16 of the image side each
            way; no flips, as chest anatomy is not mirror-symmetric) and the mean of their
            gradients is what is clipped. Costs nothing in privacy and ``k`` times the compute;
            0 or 1: off (measured: docs/results/2026-11-29-dp-sgd-probes.md).
        dp_run_rounds: rounds the run plans; the coordinator fills it in, so a hospital can spread
            ``dp_target_epsilon`` over the run.
        update_clip_norm: client-level DP: L2 bound on each hospital's adapter update (new -
            global); 0 turns client-level DP off.
        update_noise_multiplier: client-level DP: noise std of the *sum* of updates over
            ``update_clip_norm``; each hospital adds its share (see ``privacy.update_dp``).
        update_hospitals: hospitals whose noise shares make up the sum (the number sampled per
            round); 0: the coordinator fills it in.
        update_min_sum_size: set by the *hospital* in a securely aggregated round: the fewest
            hospitals' updates in any sum the coordinator can unmask (the hospital refuses to
            unmask fewer; 1 when too few peers verified). 0: the coordinator sees each update.
            Never taken from the coordinator (see ``client.app.handle_train``).
    """

    dpsgd: bool = False
    dp_noise_multiplier: float = setting(0.0, ge=0)
    dp_target_epsilon: float = setting(0.0, ge=0)
    dp_delta: float = setting(1e-5, gt=0, lt=1)
    dp_max_grad_norm: float = setting(1.0, gt=0)
    dp_accountant: str = setting("rdp", choices=ACCOUNTANTS)
    dp_grad_sample_mode: str = setting("einsum", choices=GRAD_SAMPLE_MODES)
    dp_optimizer: str = setting("adamw", choices=OPTIMIZERS)
    dp_lr: float = setting(0.0, ge=0)
    dp_momentum: float = setting(0.9, ge=0, lt=1)
    dp_run_rounds: int = setting(0, ge=0)
    dp_augmentations: int = setting(0, ge=0)
    update_clip_norm: float = setting(0.0, ge=0)
    update_noise_multiplier: float = setting(0.0, ge=0)
    update_hospitals: int = setting(0, ge=0)
    update_min_sum_size: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def update_dp(self) -> bool:
        """Client-level DP on the update is on."""
        return self.update_clip_norm > 0

    def validate(self, where: str = "privacy") -> None:
        """Raise ``ValueError`` naming the field, its value and what is allowed: each field's
        limits (``core.settings.SettingsError``; the typed reader checks the same when a
        study file is read), then the settings that only work together. Runs on every
        construction: a hospital checks the values a coordinator's round config carries."""
        check_settings(self, where)
        if self.dpsgd and self.dp_noise_multiplier == 0 and self.dp_target_epsilon == 0:
            raise ValueError("dpsgd = true needs dp_noise_multiplier > 0 or "
                             "dp_target_epsilon > 0")
        if self.update_dp and self.update_noise_multiplier == 0:
            raise ValueError(f"update_clip_norm = {self.update_clip_norm:g} needs "
                             "update_noise_multiplier > 0 (clipping alone protects no one)")


def _key(name: str) -> str:
    return name.replace("_", "-")


def dp_config_from_record(record: ConfigRecord) -> DPConfig:
    """The DP settings in a coordinator's ConfigRecord.

    A record without any DP key comes from a run without DP (every mechanism off); a record with
    some but not all keys is a protocol error.
    """
    keys = [_key(f.name) for f in fields(DPConfig)]
    present = [k for k in keys if k in record]
    if not present:
        return DPConfig()
    missing = sorted(set(keys) - set(present))
    if missing:
        raise KeyError(f"the coordinator's config record lacks DP settings {missing}")
    return DPConfig(**{f.name: record[_key(f.name)] for f in fields(DPConfig)})
