"""The simulated user: the same full fine-tune for every method, scored along the way.

A plain diffusers-style text-to-image fine-tune (AdamW, lr 1e-4 by default, batch 16, the
frozen tensors excluded, frozen rows held as `finetune` holds them) from the weights a method
hands over. Every method and seed sees the
same batches, noise and timesteps for a given seed, so rows differ only by the defence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from guardtune.enforce.freeze import RowHold
from guardtune.rowranges import Ranges
from guardtune.training.encode import EncodedData
from guardtune.training.loss import diffusion_loss
from guardtune.training.progress import StepReporter


@dataclass(frozen=True)
class AttackConfig:
    lr: float = 1e-4
    batch_size: int = 16
    weight_decay: float = 1e-2


def user_finetune(
    unet,
    scheduler,
    start: dict[str, torch.Tensor],
    frozen: frozenset[str] | set[str],
    data: EncodedData,
    checkpoints: list[int],
    at_checkpoint: Callable[[int], None],
    seed: int,
    config: AttackConfig = AttackConfig(),
    report: StepReporter | None = None,
    rows: dict[str, Ranges] | None = None,
) -> None:
    """Fine-tune `unet` from `start` with `frozen` (and the `rows` of others) held fixed; call
    `at_checkpoint(step)`."""
    unet.load_state_dict(start)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(name not in frozen)
    hold = RowHold(dict(unet.named_parameters()), rows or {})
    trainable = [p for p in unet.parameters() if p.requires_grad]
    # fused AdamW is several times faster on CPU; it takes only floating-point tensors.
    fused = all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(
        trainable, lr=config.lr, weight_decay=config.weight_decay, fused=fused
    )
    unet.train()
    try:
        for step in range(1, max(checkpoints) + 1):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            latents, states = data.batch(config.batch_size, generator)
            loss = diffusion_loss(unet, scheduler, latents, states, generator, None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hold.before_step()
            optimizer.step()
            hold.after_step()
            if report is not None:
                report(loss=float(loss.detach()))
            if step in checkpoints:
                unet.eval()
                at_checkpoint(step)
                unet.train()
    finally:
        unet.requires_grad_(False)
        unet.eval()
