"""Membership inference by loss threshold (Yeom et al. 2018): does DP do something, empirically?

The attacker holds a trained model and an example and guesses "member" (the example was in the
training data) when the model's loss on it is low. Over equal numbers of members and non-members
(examples from the same distribution the model never saw) the attack is scored by

- ``auc``: ROC AUC of the score ``-loss`` for "member" (0.5: the attacker learns nothing;
  examples are ranked by :func:`example_log_odds_against`, which orders them as their loss
  does without rounding a confident model's losses to ties at 0), and
- ``advantage``: ``max_t (TPR(t) - FPR(t))`` over thresholds ``t``, Yeom et al.'s membership
  advantage, which an ``(epsilon, 0)``-DP training bounds by ``e^epsilon - 1``.

It is an empirical lower bound on leakage, not a proof of privacy: a weak attack near 0.5 says
little, an attack well above 0.5 shows the model memorised its training examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from models.data import ImageSet


@dataclass(frozen=True)
class MembershipResult:
    """Outcome of the loss-threshold attack.

    Attributes:
        auc: ROC AUC of ``-loss`` separating members from non-members.
        advantage: max over thresholds of TPR - FPR, in [0, 1].
        members: member examples scored.
        non_members: non-member examples scored (equal to ``members``).
        member_loss: mean cross-entropy (nats) on the members.
        non_member_loss: mean cross-entropy (nats) on the non-members.
    """

    auc: float
    advantage: float
    members: int
    non_members: int
    member_loss: float
    non_member_loss: float


@torch.no_grad()
def example_log_odds_against(model: nn.Module, data: ImageSet,
                             batch_size: int = 256) -> np.ndarray:
    """Per-example ``log sum_{j != y} exp(z_j - z_y)`` from the logits ``z``, shape ``(N,)``.

    Cross-entropy is ``softplus`` of it, so it ranks examples as their loss does; but where a
    confident model's loss rounds to exactly 0 (a logit margin past about 17 in float32) it
    still tells the examples apart, so the attack does not score such ties as a coin toss.
    """
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        logits = model(data.images[i:i + batch_size]).double()
        labels = data.labels[i:i + batch_size]
        own = logits.gather(1, labels[:, None])
        others = logits.scatter(1, labels[:, None], float("-inf"))
        out.append(torch.logsumexp(others - own, dim=1))
    return torch.cat(out).numpy()


def matched_non_members(members: ImageSet, pool: ImageSet, seed: int,
                        limit: int = 0) -> tuple[ImageSet, ImageSet]:
    """Equal-sized members and non-members with the same label counts.

    A label-skewed hospital's members are mostly one class; non-members drawn from ``pool`` with
    the members' label counts keep the attack from scoring the class instead of membership.
    Classes ``pool`` has too few of are cut down on both sides.

    Args:
        members: the model's training examples (e.g. one hospital's training split).
        pool: examples of the same distribution the model never trained on.
        seed: seeds which examples are drawn.
        limit: at most this many of each (0: as many as match).

    Returns:
        ``(members, non_members)``, same length and label counts.
    """
    rng = np.random.default_rng(seed)
    member_labels, pool_labels = members.labels.numpy(), pool.labels.numpy()
    keep_m, keep_n = [], []
    for label in np.unique(member_labels):
        m = rng.permutation(np.flatnonzero(member_labels == label))
        n = rng.permutation(np.flatnonzero(pool_labels == label))
        count = min(len(m), len(n))
        keep_m.append(m[:count])
        keep_n.append(n[:count])
    idx_m, idx_n = np.concatenate(keep_m), np.concatenate(keep_n)
    if limit and len(idx_m) > limit:
        chosen = rng.permutation(len(idx_m))[:limit]
        idx_m, idx_n = idx_m[chosen], idx_n[chosen]
    if len(idx_m) == 0:
        raise ValueError("no non-member of the members' classes in the pool")
    return members.subset(np.sort(idx_m)), pool.subset(np.sort(idx_n))


def loss_threshold_attack(model: nn.Module, members: ImageSet,
                          non_members: ImageSet) -> MembershipResult:
    """Attack AUC and advantage of the loss threshold against ``model``.

    Raises:
        ValueError: the two sets differ in size (the AUC and advantage assume equal priors).
    """
    if len(members) != len(non_members) or len(members) == 0:
        raise ValueError(f"need equal, non-zero numbers of members ({len(members)}) and "
                         f"non-members ({len(non_members)}); see matched_non_members")
    member_odds = example_log_odds_against(model, members)
    other_odds = example_log_odds_against(model, non_members)
    # Cross-entropy (nats) is softplus of the log-odds against the true class.
    member_loss, other_loss = np.logaddexp(0.0, member_odds), np.logaddexp(0.0, other_odds)
    truth = np.concatenate([np.ones(len(member_odds)), np.zeros(len(other_odds))])
    # Lower loss, more likely a member; ranked by the loss's unrounded monotone transform.
    score = -np.concatenate([member_odds, other_odds])
    fpr, tpr, _ = roc_curve(truth, score)
    return MembershipResult(
        auc=float(roc_auc_score(truth, score)),
        advantage=float(np.max(tpr - fpr)),
        members=len(member_loss),
        non_members=len(other_loss),
        member_loss=float(member_loss.mean()),
        non_member_loss=float(other_loss.mean()),
    )
