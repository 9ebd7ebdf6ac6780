"""Client-level DP on adapter updates, with the noise added by the hospitals themselves.

Each hospital clips its update ``delta = new - global`` to L2 norm ``C`` (FlatClip, McMahan et
al. 2018, as Flower's ``fixedclipping_mod``) and adds Gaussian noise of std ``z * C / sqrt(n)``,
where ``n`` is the number of hospitals sampled in the round. The *sum* of the ``n`` updates then
carries noise of std ``z * C``: the DP-FedAvg mechanism with noise multiplier ``z`` on the sum, and
the coordinator's uniform average divides both by ``n``. This is the form secure aggregation
needs (the coordinator only sees the sum, so it cannot add the noise itself).

Why not Flower's wrappers: ``DifferentialPrivacyClientSideFixedClipping`` (flwr.serverapp.strategy)
has the hospitals clip but the *coordinator* add all the noise to the aggregate, so it trusts the
coordinator with raw clipped updates and cannot run under secure aggregation; its noise uses the
global NumPy RNG (not replayable), and it only warns when fewer hospitals reply than were sampled.

Limits (stated, not hidden):
- Without secure aggregation the coordinator sees each update with only its own share
  ``z / sqrt(n)`` of noise, and the ledger charges that share. Under secure aggregation it
  charges ``z * sqrt(m / n)``, ``m`` the minimum group the hospital enforces (see
  :func:`charge_noise_multiplier`).
- If fewer than ``n`` hospitals reply (refusals, failures), the sum carries less noise
  (``z * sqrt(m / n)``); the guarantee on the sum holds only with all ``n`` shares.
- Accounting is per hospital, with sampling rate 1: a hospital cannot verify the coordinator's
  sampling, so it takes no amplification by sampling.
- The coordinator must average uniformly (not weighted by example counts) for the sensitivity
  ``C / n`` of the mean to hold; hospitals send ``update-weight = 1`` for that.
"""

from __future__ import annotations

import math

import torch

from models.finite import NonFiniteError, check_finite_number, check_finite_tensors
from privacy.ledger import HOSPITAL, Charge
from privacy.noise import NoiseSource


def update_norm(new: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``new - reference`` over all tensors (the adapter update's size)."""
    squares = sum(float((new[k].double() - reference[k].double()).pow(2).sum()) for k in new)
    return math.sqrt(squares)


def clip_and_noise(
    new: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    hospitals: int,
    noise: NoiseSource,
) -> dict[str, torch.Tensor]:
    """``reference + clip(new - reference) + N(0, (z C)^2 / n)``, tensor by tensor.

    Args:
        new: the hospital's adapter after local training (name -> tensor).
        reference: the global adapter the round started from (same names and shapes).
        clip_norm: ``C``, the L2 bound on the whole update.
        noise_multiplier: ``z``, noise std of the sum of ``hospitals`` updates over ``C``.
        hospitals: ``n``, hospitals whose shares make up the sum.
        noise: the hospital's noise source (``privacy.noise.SecureNoise``: a CSPRNG nobody
            else can replay).

    Raises:
        NonFiniteError: the update (or either adapter) holds NaN or an infinity, so its norm
            is not finite: a refusal, never "no clipping" (``min(1, C / nan)`` would let the
            update through unclipped). Nothing is returned, so nothing can be released.
        ValueError: ``C`` or ``z`` not finite and positive, or ``n`` below 1.
    """
    if set(new) != set(reference):
        raise ValueError("update and global adapter have different tensor names")
    _check_mechanism(clip_norm, noise_multiplier, hospitals)
    norm = update_norm(new, reference)
    if not math.isfinite(norm):
        check_finite_tensors(reference, "the global adapter")
        check_finite_tensors(new, "the trained adapter")
        raise NonFiniteError(f"the update's norm is {norm}: refused (not clipped)")
    scale = min(1.0, clip_norm / max(norm, 1e-12))
    std = noise_multiplier * clip_norm / math.sqrt(hospitals)
    out = {}
    for name, tensor in new.items():
        delta = (tensor - reference[name]) * scale
        draw = noise.gaussian(tuple(tensor.shape), std, torch.float64)
        out[name] = (reference[name] + delta + draw.to(tensor.dtype)).to(tensor.dtype)
    check_finite_tensors(out, "the noised update")
    return out


def _check_mechanism(clip_norm: float, noise_multiplier: float, hospitals: int) -> None:
    """Refuse a clip norm that is not a finite number above 0, a noise multiplier that is not
    a finite number at least 0 (0: clipping alone, which ``DPConfig`` never lets a round ask
    for), and a hospital count below 1."""
    if check_finite_number(clip_norm, "update clip norm") <= 0:
        raise ValueError(f"update clip norm {clip_norm!r} must be above 0")
    if check_finite_number(noise_multiplier, "update noise multiplier") < 0:
        raise ValueError(f"update noise multiplier {noise_multiplier!r} must be at least 0")
    if isinstance(hospitals, bool) or not isinstance(hospitals, int) or hospitals < 1:
        raise ValueError(f"update hospitals {hospitals!r} must be a whole number >= 1")


def charge_noise_multiplier(noise_multiplier: float, hospitals: int,
                            min_sum_size: int = 0) -> float:
    """The noise multiplier that protects one hospital's update as the coordinator sees it.

    Without secure aggregation that is the hospital's own share, ``z / sqrt(n)``. Under secure
    aggregation the coordinator only decodes sums of at least ``m = min_sum_size`` updates, each
    carrying its share of noise, so one hospital's update is covered by ``z * sqrt(m / n)``
    (assuming the other hospitals in the sum do not collude with the coordinator).
    """
    if min_sum_size > 0:
        return noise_multiplier * math.sqrt(min(min_sum_size, hospitals) / hospitals)
    return noise_multiplier / math.sqrt(hospitals)


def update_charge(clip_norm: float, noise_multiplier: float, hospitals: int,
                  min_sum_size: int = 0) -> Charge:
    """The ledger charge of one round of client-level DP (one release, sampling rate 1).

    Its unit is the hospital (its whole update, sensitivity ``C``); the ledger converts it to
    the example level (sensitivity ``2 C``, see ``privacy.ledger.Charge.example_event``).
    """
    return Charge(mechanism="client-gaussian-secagg" if min_sum_size else "client-gaussian",
                  noise_multiplier=charge_noise_multiplier(noise_multiplier, hospitals,
                                                           min_sum_size),
                  sample_rate=1.0, steps=1, clip_norm=clip_norm, unit=HOSPITAL)
