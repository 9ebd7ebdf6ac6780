"""Exact per-example gradients for opacus' hooks engine on channels-last convolutions.

Why opacus' own ``hooks`` engine is wrong on medfed's default backbone: the backbone runs in
channels-last memory format (``models.classifier.ImageClassifier(channels_last=True)``), so the
activations a Conv2d receives, and the LoRA factors' ``(B, C, H, W)`` inputs among them, have
strides ``(HWC, 1, WC, C)``. opacus 1.6's Conv2d grad sampler unfolds its activations with
``opacus.utils.tensor_utils.unfold2d``, which calls ``as_strided`` with the strides of a
*contiguous* NCHW tensor for the spatial and kernel dimensions: on a channels-last tensor it reads
the wrong elements (mixing channels and pixels), and the per-example gradients of every Conv2d,
``lora_A`` and ``lora_B`` alike, are wrong (their sum, which autograd computes, is right).
``lora_A``'s error hides while ``lora_B`` is still zero, as peft initialises it. (``unfold2d``'s
``as_strided`` form came with opacus PR #256, "Better unfold".) The ``functorch``
engine is exact because it recomputes each layer under ``vmap`` instead of unfolding by hand.

This module's mode, :data:`GRAD_SAMPLE_MODE` (``"einsum"``), is opacus' hooks engine with a Conv2d
grad sampler that does not depend on memory layout: a 1x1 convolution's per-example weight
gradient is a batched matrix product of its input and output gradient over pixels; any other
Conv2d goes to opacus' sampler on a contiguous copy. Linear layers (the task head) keep opacus'
sampler, which is layout-independent. The replacement is per wrapped model (an instance
attribute), not opacus' global registry, so other code keeps opacus' own behaviour.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

GRAD_SAMPLE_MODE = "einsum"
# What opacus' make_private is told: the wrapped model is the hooks engine's GradSampleModule.
OPACUS_MODE = "hooks"
# opacus' own engines whose Conv2d per-example gradients go through unfold2d.
LAYOUT_UNSAFE_MODES = ("hooks", "ghost")


def is_pointwise(layer: nn.Conv2d) -> bool:
    """A 1x1 convolution with stride 1, no padding and one group: a per-pixel Linear map."""
    padding = layer.padding
    no_padding = padding in ("valid", "same") or all(p == 0 for p in padding)
    return (tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1) and no_padding
            and layer.groups == 1)


def conv2d_grad_sample(
    layer: nn.Conv2d,
    activations: list[torch.Tensor],
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of a Conv2d's weight (and bias), exact in any memory format.

    Args:
        layer: the convolution; ``weight`` is ``(O, I/groups, kH, kW)``.
        activations: ``[x]``, the layer's input ``(B, I, H, W)``, any strides.
        backprops: gradient of the (per-example summed) loss with respect to the layer's output,
            ``(B, O, H', W')``, any strides (opacus has already scaled it for a mean loss).

    Returns:
        ``{weight: (B, O, I/groups, kH, kW)}``, plus ``{bias: (B, O)}`` when the bias trains.
        For a 1x1 convolution (:func:`is_pointwise`) the weight gradient of example ``b`` is
        ``backprops[b].reshape(O, HW) @ x[b].reshape(I, HW).T``: one ``bmm`` of
        ``(B, O, HW) x (B, HW, I)``, where ``flatten(2)`` of a channels-last tensor is a view.
    """
    x = activations[0].to(backprops.dtype)
    if not is_pointwise(layer):
        # opacus' unfold is right on contiguous NCHW tensors.
        return compute_conv_grad_sample(layer, [x.contiguous()], backprops.contiguous())
    out: dict[nn.Parameter, torch.Tensor] = {}
    grads = backprops.flatten(2)  # (B, O, HW)
    if layer.weight.requires_grad:
        per_example = torch.bmm(grads, x.flatten(2).transpose(1, 2))  # (B, O, I)
        out[layer.weight] = per_example.view(x.shape[0], *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = grads.sum(dim=2)  # (B, O)
    return out


def make_grad_sample_module(model: nn.Module) -> GradSampleModule:
    """``model`` wrapped by opacus' hooks engine, with :func:`conv2d_grad_sample` for Conv2d.

    Pass the result to ``PrivacyEngine.make_private(module=..., grad_sample_mode=OPACUS_MODE)``
    with make_private's default ``loss_reduction="mean"`` and ``batch_first=True``, which the
    wrapper shares: opacus then keeps it instead of wrapping again. Call ``_close()`` on it (as
    ``privacy.dpsgd._unwrap`` does) to remove the hooks.
    """
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    # GradSampleHooks looks samplers up as self.GRAD_SAMPLERS at backward time: an instance
    # attribute overrides the class-wide registry for this wrapper only.
    wrapped.GRAD_SAMPLERS = {**GradSampleModule.GRAD_SAMPLERS, nn.Conv2d: conv2d_grad_sample}
    return wrapped


def engine_module(model: nn.Module, mode: str) -> tuple[nn.Module, str]:
    """What to pass opacus' ``make_private`` as ``module`` and ``grad_sample_mode`` for the
    per-example gradient engine ``mode`` (``privacy.config.GRAD_SAMPLE_MODES``): for
    :data:`GRAD_SAMPLE_MODE` the model wrapped by :func:`make_grad_sample_module` and opacus'
    hooks engine, for opacus' own engines the model and ``mode`` unchanged.

    Raises:
        ValueError: ``hooks`` or ``ghost`` on a model with a trainable Conv2d: opacus' unfold
            would make its per-example gradients wrong if the model runs channels-last (the
            default backbone does), and clipping that does not bound them voids the epsilon.
    """
    if mode == GRAD_SAMPLE_MODE:
        return make_grad_sample_module(model), OPACUS_MODE
    if mode in LAYOUT_UNSAFE_MODES and any(
        isinstance(m, nn.Conv2d) and any(p.requires_grad for p in m.parameters(recurse=False))
        for m in model.modules()
    ):
        raise ValueError(f"dp_grad_sample_mode '{mode}': opacus' own per-example gradients of "
                         "a Conv2d are wrong on channels-last models such as the default "
                         f"backbone; use '{GRAD_SAMPLE_MODE}' (or 'functorch')")
    return model, mode
