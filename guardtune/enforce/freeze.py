"""Applying a verified policy to a loaded model: the one place where tensors get frozen.

`freeze_for_training` leaves trainable exactly the UNet parameters the policy does not freeze
whole (text encoder and VAE are never trained by `finetune`), so the optimizer only ever sees
trainable tensors. Tensors frozen in part (a schema 3 policy's rows) stay trainable, and a
`RowHold` keeps their frozen rows bit-identical: it zeroes those gradient rows before every
optimizer step (so Adam's moments for them stay zero and clipping ignores them) and writes the
rows back after it (AdamW's weight decay, or a moment carried in from elsewhere, would still move
them). `lora_target_modules` lists the attention projections a LoRA adapter may wrap: an adapter
on a module whose weight is frozen whole would undo the freeze, so those are left out; on a
module frozen in part, `lora_row_hold` holds the adapter's output rows (lora_B's rows) for the
frozen channels at zero, so the adapter's update never reaches them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from guardtune.errors import PolicyError
from guardtune.rowranges import Ranges, height
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


def frozen_unet_rows(policy: FreezePolicy | None) -> dict[str, Ranges]:
    """The policy's tensors frozen in part, by bare UNet name, with their frozen row ranges."""
    if policy is None:
        return {}
    outside = [n for n in policy.frozen_rows if not n.startswith("unet.")]
    if outside:
        raise PolicyError(f"policy freezes rows of {outside[0]}, but only UNet tensors can be")
    return {n.removeprefix("unet."): r.ranges for n, r in policy.frozen_rows.items()}


class RowHold:
    """Frozen rows of trainable tensors, held bit-identical through training (see above).

    Call `before_step` after the backward (and before clipping) and `after_step` after the
    optimizer step; `after_step` is also what puts the rows back after anything else wrote the
    tensors (a resumed checkpoint, an EMA copy).
    """

    def __init__(self, parameters: Mapping[str, torch.Tensor], rows: dict[str, Ranges]) -> None:
        unknown = sorted(set(rows) - set(parameters))
        if unknown:
            raise PolicyError(f"policy freezes rows of {unknown[0]}, which this UNet does not have")
        self.held = []
        for name, ranges in sorted(rows.items()):
            parameter = parameters[name]
            rows_in = height(parameter.shape)
            if ranges and ranges[-1][1] > rows_in:
                raise PolicyError(f"policy freezes rows of {name} past its {rows_in} rows")
            saved = [parameter.detach()[start:stop].clone() for start, stop in ranges]
            self.held.append((parameter, ranges, saved))

    @property
    def parameters(self) -> int:
        """How many values the hold keeps."""
        return sum(t.numel() for *_, saved in self.held for t in saved)

    @torch.no_grad()
    def before_step(self) -> None:
        for parameter, ranges, _ in self.held:
            if parameter.grad is not None:
                for start, stop in ranges:
                    parameter.grad[start:stop].zero_()

    @torch.no_grad()
    def after_step(self) -> None:
        for parameter, ranges, saved in self.held:
            for (start, stop), values in zip(ranges, saved, strict=True):
                parameter[start:stop].copy_(values)


def freeze_for_training(
    unet: nn.Module,
    frozen: set[str],
    *others: nn.Module,
    rows: dict[str, Ranges] | None = None,
) -> tuple[FreezeSummary, RowHold]:
    """requires_grad only on the UNet's parameters not frozen whole, and the hold of the rows
    frozen in part; PolicyError on unknown names."""
    parameters = dict(unet.named_parameters())
    unknown = sorted(frozen - set(parameters))
    if unknown:
        raise PolicyError(f"policy freezes {unknown[0]}, which this UNet does not have")
    for module in others:
        module.requires_grad_(False)
    for name, parameter in parameters.items():
        parameter.requires_grad_(name not in frozen)
    hold = RowHold(parameters, {n: r for n, r in (rows or {}).items() if n not in frozen})
    summary = FreezeSummary(
        frozen_tensors=len(frozen),
        total_tensors=len(parameters),
        frozen_params=sum(parameters[n].numel() for n in frozen) + hold.parameters,
        total_params=sum(p.numel() for p in parameters.values()),
    )
    return summary, hold


def lora_target_modules(unet: nn.Module, frozen: set[str]) -> list[str]:
    """Full names of attention projections whose weight is not frozen whole (peft
    target_modules); rows frozen in a target's weight are held by `lora_row_hold`."""
    targets = []
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear) or not name.endswith(LORA_TARGET_SUFFIXES):
            continue
        if f"{name}.weight" in frozen or f"{name}.bias" in frozen:
            continue
        targets.append(name)
    return targets


def lora_row_hold(unet: nn.Module, rows: dict[str, Ranges]) -> RowHold:
    """Hold at zero the adapter output rows (lora_B) of every wrapped module whose weight has
    frozen rows, so that B @ A is zero on those output channels.

    Runs after the adapters are attached (peft names them `<module>.lora_B.<adapter>.weight`).
    Any other adapter tensor that reaches the output rows (a lora_B bias, a DoRA magnitude)
    cannot be held this way, and is refused.
    """
    parameters = dict(unet.named_parameters())
    held: dict[str, Ranges] = {}
    for name, ranges in rows.items():
        if not name.endswith(".weight"):
            continue  # our adapters carry no bias (peft's lora_bias is off): bias rows stay
        module = name.removesuffix(".weight")
        adapters = [n for n in parameters if n.startswith(f"{module}.lora_")]
        for adapter in adapters:
            if ".lora_B." in adapter and adapter.endswith(".weight"):
                held[adapter] = ranges
            elif ".lora_A." not in adapter:
                raise PolicyError(
                    f"adapter tensor {adapter} reaches frozen rows of {name} and cannot be held"
                )
    with torch.no_grad():
        for adapter, ranges in held.items():
            for start, stop in ranges:
                parameters[adapter][start:stop].zero_()
    return RowHold(parameters, held)
