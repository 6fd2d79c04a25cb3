"""IMMA baseline (Zheng and Yeh, Immunizing text-to-image Models against Malicious Adaptation).

Before release, alternate two first-order steps on the illegal data:
- adaptation: a rank-4 LoRA on every attention projection takes an AdamW step (lr 1e-4) that
  lowers the diffusion loss, as the attacker's fine-tune would;
- defence: the attention projections themselves (to_q, to_k, to_v, to_out of self- and
  cross-attention) take an AdamW step (lr 1e-5) that raises the loss of the adapted model.
The LoRA is thrown away at the end; only the attention projections change. The authors' LoRA
defaults (rank 4, lrs 1e-4 / 1e-5, one inner and one outer step per round) are kept.

LoRA is written out as weight + B @ A through `torch.func.functional_call`, so the UNet is never
wrapped: its parameter names and every other tensor stay exactly as published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

from guardtune.evaluate.defenses import attention_projections
from guardtune.training.encode import EncodedData
from guardtune.training.loss import diffusion_loss
from guardtune.training.progress import StepReporter


@dataclass(frozen=True)
class ImmaConfig:
    steps: int = 200
    rank: int = 4
    lora_lr: float = 1e-4
    defense_lr: float = 1e-5
    batch_size: int = 8
    seed: int = 0


class _Adapted(torch.nn.Module):
    """The UNet called with some parameters replaced, for `diffusion_loss`."""

    def __init__(self, unet, overrides: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.unet, self.overrides = unet, overrides

    def forward(self, *args, **kwargs):
        return functional_call(self.unet, self.overrides, args, kwargs, strict=False)


def immunize(
    unet,
    scheduler,
    illegal: EncodedData,
    config: ImmaConfig = ImmaConfig(),
    report: StepReporter | None = None,
) -> dict[str, torch.Tensor]:
    """Immunised attention projections (parameter name -> tensor); `unet` is left unchanged."""
    generator = torch.Generator().manual_seed(config.seed)
    parameters = dict(unet.named_parameters())
    defended = {n: parameters[n].detach().clone() for n in attention_projections(list(parameters))}
    for tensor in defended.values():
        tensor.requires_grad_(True)
    weights = [n for n in defended if n.endswith(".weight")]
    lora = {}
    for name in weights:
        out_features, in_features = defended[name].shape
        down = torch.randn(config.rank, in_features, generator=generator) / config.rank
        up = torch.zeros(out_features, config.rank)
        lora[name] = (
            down.to(defended[name]).requires_grad_(True),
            up.to(defended[name]).requires_grad_(True),
        )
    lora_optimizer = torch.optim.AdamW(
        [t for pair in lora.values() for t in pair], lr=config.lora_lr
    )
    defense_optimizer = torch.optim.AdamW(
        list(defended.values()), lr=config.defense_lr, weight_decay=0.0
    )
    was_training = unet.training
    requires = {n: p.requires_grad for n, p in parameters.items()}
    unet.requires_grad_(False)  # only the copies above carry gradients
    unet.train()
    try:
        for _ in range(config.steps):
            # Adaptation: the attacker's LoRA lowers the loss on the current defended weights.
            overrides = {n: t.detach() for n, t in defended.items()}
            for name, (down, up) in lora.items():
                overrides[name] = defended[name].detach() + up @ down
            latents, states = illegal.batch(config.batch_size, generator)
            adapt_loss = diffusion_loss(
                _Adapted(unet, overrides), scheduler, latents, states, generator, None
            )
            lora_optimizer.zero_grad(set_to_none=True)
            adapt_loss.backward()
            lora_optimizer.step()
            # Defence: the projections raise the adapted model's loss (gradient ascent).
            overrides = dict(defended)
            for name, (down, up) in lora.items():
                overrides[name] = defended[name] + (up @ down).detach()
            latents, states = illegal.batch(config.batch_size, generator)
            defense_loss = diffusion_loss(
                _Adapted(unet, overrides), scheduler, latents, states, generator, None
            )
            defense_optimizer.zero_grad(set_to_none=True)
            (-defense_loss).backward()
            defense_optimizer.step()
            if report is not None:
                report(
                    adapted_loss=float(adapt_loss.detach()),
                    defended_loss=float(defense_loss.detach()),
                )
    finally:
        for name, parameter in parameters.items():
            parameter.requires_grad_(requires[name])
        unet.train(was_training)
    return {n: t.detach() for n, t in defended.items()}
