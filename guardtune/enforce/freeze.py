"""Applying a verified policy to a loaded model: the one place where tensors get frozen.

`freeze_for_training` leaves trainable exactly the UNet parameters the policy does not freeze
(text encoder and VAE are never trained by `finetune`), so the optimizer only ever sees
trainable tensors. `lora_target_modules` lists the attention projections a LoRA adapter may
wrap: an adapter on a module whose weight is frozen would undo the freeze, so those are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from guardtune.errors import PolicyError
from guardtune.trust.policy import FreezePolicy

# diffusers' LoRA training scripts target these attention projections.
LORA_TARGET_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class FreezeSummary:
    frozen_tensors: int
    total_tensors: int
    frozen_params: int
    total_params: int

    @property
    def frozen_share(self) -> float:
        return self.frozen_params / self.total_params if self.total_params else 0.0


def frozen_unet_names(policy: FreezePolicy | None) -> set[str]:
    """Policy names without the `unet.` prefix, as `unet.named_parameters()` spells them."""
    if policy is None:
        return set()
    outside = [n for n in policy.frozen_tensors if not n.startswith("unet.")]
    if outside:
        raise PolicyError(f"policy freezes {outside[0]}, but only UNet tensors can be frozen")
    return {n.removeprefix("unet.") for n in policy.frozen_tensors}


def freeze_for_training(unet: nn.Module, frozen: set[str], *others: nn.Module) -> FreezeSummary:
    """requires_grad only on the UNet's unfrozen parameters; PolicyError on unknown names."""
    parameters = dict(unet.named_parameters())
    unknown = sorted(frozen - set(parameters))
    if unknown:
        raise PolicyError(f"policy freezes {unknown[0]}, which this UNet does not have")
    for module in others:
        module.requires_grad_(False)
    for name, parameter in parameters.items():
        parameter.requires_grad_(name not in frozen)
    return FreezeSummary(
        frozen_tensors=len(frozen),
        total_tensors=len(parameters),
        frozen_params=sum(parameters[n].numel() for n in frozen),
        total_params=sum(p.numel() for p in parameters.values()),
    )


def lora_target_modules(unet: nn.Module, frozen: set[str]) -> list[str]:
    """Full names of attention projections whose weight is not frozen (peft target_modules)."""
    targets = []
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or not name.endswith(LORA_TARGET_SUFFIXES):
            continue
        if f"{name}.weight" in frozen or f"{name}.bias" in frozen:
            continue
        targets.append(name)
    return targets
