"""A fixed centre subtracted from the pooled feature before the task head.

The head sees ``logits = W (x - c) + b``. Moving ``c`` and folding ``W c`` into ``b`` leaves
every logit as it was, so centring is a change of coordinates, not of the model; what it
changes is training. A pooled feature of a ReLU network has a large component that every
example shares, and an example's head gradient ``(p - y) x`` carries it whatever the label.
Under DP-SGD each example's gradient is clipped to one bound: uncentred, that shared component
takes most of the bound and the noise, and the part that separates the classes is what is
left. Centred on the mean feature of *public* data (``simulations.public_start`` sets it), the
clipped gradients carry the separating part.

The centre travels with the adapter (peft's ``modules_to_save``; no trained tensor): every
hospital and the coordinator compute the same logits from it. It never trains and hospitals
send it back unchanged. Zero (no centring) until set.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from models.adapters import adapter_state, load_adapter_state
from models.finite import check_finite_tensors

CENTRE_MODULE = "centre"
"""Module name of the centre in a classifier that has one (``models.ct_encoder``, and
``models.classifier.ImageClassifier`` on EfficientNet-Lite0)."""


class FeatureCentre(nn.Module):
    """``(B, F) -> (B, F)``: subtracts the fixed ``mean`` buffer (zeros until set)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.mean

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A centre arrives with the coordinator's adapter: finite or refused, however loaded.
        mean = state_dict.get(prefix + "mean")
        if mean is not None:
            check_finite_tensors({prefix + "mean": mean}, "the feature centre")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _key(state: dict[str, torch.Tensor], name: str) -> str:
    keys = [k for k in state if k.endswith(f".{name}")]
    if len(keys) != 1:
        raise KeyError(f"expected one adapter tensor named '*.{name}', found {keys}")
    return keys[0]


def recentred(state: dict[str, torch.Tensor], centre: torch.Tensor,
              head: str) -> OrderedDict[str, torch.Tensor]:
    """Adapter tensors with the head's input centred on ``centre`` (``(F,)``) and the same
    logits: ``b' = b + W (centre - c)`` for the old centre ``c``.

    Args:
        state: adapter tensors (peft names) holding ``*.centre.mean`` and the head's
            ``*.<head>.weight`` / ``bias`` (a linear head).
        centre: the new centre, e.g. the mean pooled feature of public data.
        head: the head's module name (``models.registry.BackboneSpec.head``).

    Raises:
        models.finite.NonFiniteError: ``centre`` or an adapter tensor is not finite.
    """
    check_finite_tensors({"centre": centre}, "the feature centre")
    check_finite_tensors(state, "the adapter to recentre")
    out = OrderedDict((k, v.clone()) for k, v in state.items())
    mean_key = _key(out, f"{CENTRE_MODULE}.mean")
    weight_key, bias_key = _key(out, f"{head}.weight"), _key(out, f"{head}.bias")
    centre = centre.to(torch.float64)
    shift = out[weight_key].to(torch.float64) @ (centre - out[mean_key].to(torch.float64))
    out[bias_key] = (out[bias_key].to(torch.float64) + shift).to(out[bias_key].dtype)
    out[mean_key] = centre.to(out[mean_key].dtype)
    return out


def centre_on(model: nn.Module, images: torch.Tensor, head: str, batch_size: int = 32) -> None:
    """Centre ``model``'s head input on the mean pooled feature of ``images``, in place and
    with the same logits (:func:`recentred`).

    Args:
        model: a peft-wrapped classifier whose base has ``pooled`` and a centre
            (``models.ct_encoder.CTVolumeClassifier``, or the 2D
            ``models.classifier.ImageClassifier`` on EfficientNet-Lite0).
        images: ``(N, ...)`` inputs, as the model takes them: public data only (the centre
            travels to every hospital and the coordinator).
        head: the head's module name.
        batch_size: inputs per forward pass.
    """
    base = model.get_base_model()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        total = torch.zeros(base.centre.mean.shape, dtype=torch.float64)
        for start in range(0, len(images), batch_size):
            total += base.pooled(images[start:start + batch_size]).to(torch.float64).sum(0)
    model.train(was_training)
    load_adapter_state(model, recentred(adapter_state(model), total / len(images), head))
