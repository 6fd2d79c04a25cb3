"""PersGuard baseline (arXiv 2502.16167): a backdoor that fine-tuning on protected data triggers.

No public code exists; this follows the paper's pattern-backdoor with its two other losses:
- backdoor: under the protected (illegal) prompts, the UNet learns to draw a fixed target
  pattern (a checkerboard) instead of the protected content;
- backdoor retention: the backdoor must survive the attacker's fine-tune, so it is also
  scored after a simulated user step on the real protected images (a first-order look-ahead, as
  in first-order MAML: the gradient taken at the looked-ahead weights is applied to the current);
- prior preservation: on legal data the UNet must predict what the published UNet predicted.
All UNet weights may move (as in the paper); the text encoder and VAE do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from guardtune.training.conditioning import unet_inputs
from guardtune.training.encode import EncodedData
from guardtune.training.loss import draw_noise, pose
from guardtune.training.progress import StepReporter


@dataclass(frozen=True)
class PersGuardConfig:
    steps: int = 200
    lr: float = 1e-5
    user_lr: float = 1e-4  # the look-ahead step's size, the attacker's learning rate
    retention_weight: float = 1.0
    prior_weight: float = 1.0
    batch_size: int = 8
    seed: int = 0


def target_pattern(pipeline, cells: int = 4) -> torch.Tensor:
    """The backdoor's target: a checkerboard at the model's resolution, as latents (1, C, h, w)."""
    size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    index = torch.arange(size) * cells // size
    board = ((index[:, None] + index[None, :]) % 2).float() * 2 - 1  # [-1, 1]
    pixels = board.expand(1, 3, size, size).to(pipeline.vae.device, pipeline.vae.dtype)
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mean
    return (latents * pipeline.vae.config.scaling_factor).float().cpu().contiguous()


def _loss(unet, weights, scheduler, clean, states, generator, target=None) -> torch.Tensor:
    """Diffusion loss of the UNet called with `weights`; `target` replaces the noise target."""
    noise, timesteps = draw_noise(scheduler, tuple(clean.shape), generator)
    problem = pose(scheduler, clean, noise, timesteps)
    device = next(iter(weights.values())).device
    inputs = problem.noisy.to(device), timesteps.to(device)
    conditioning = unet_inputs(unet, states.to(device))
    prediction = functional_call(unet, weights, inputs, conditioning).sample.float()
    goal = problem.target.to(device) if target is None else target(inputs, conditioning).float()
    return F.mse_loss(prediction, goal)


def implant(
    pipeline, scheduler, illegal: EncodedData, legal: EncodedData,
    config: PersGuardConfig = PersGuardConfig(), report: StepReporter | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Backdoored UNet weights (every parameter, by name); the pipeline is left unchanged."""
    unet = pipeline.unet
    generator = torch.Generator().manual_seed(config.seed)
    published = {n: p.detach().clone() for n, p in unet.named_parameters()}
    weights = {n: p.clone().requires_grad_(True) for n, p in published.items()}
    optimizer = torch.optim.AdamW(list(weights.values()), lr=config.lr, weight_decay=0.0)
    pattern = target_pattern(pipeline)
    requires = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.requires_grad_(False)
    try:
        for _ in range(config.steps):
            _, states = illegal.batch(config.batch_size, generator)
            targets = pattern.expand(config.batch_size, *pattern.shape[1:])
            # Backdoor: the protected prompts draw the pattern.
            backdoor = _loss(unet, weights, scheduler, targets, states, generator)
            grads = torch.autograd.grad(backdoor, list(weights.values()))
            # Retention: one attacker step on the real protected images, then the backdoor again.
            real, real_states = illegal.batch(config.batch_size, generator)
            attack = _loss(unet, weights, scheduler, real, real_states, generator)
            step = torch.autograd.grad(attack, list(weights.values()))
            ahead = {
                n: (w.detach() - config.user_lr * g).requires_grad_(True)
                for (n, w), g in zip(weights.items(), step, strict=True)
            }
            retained = _loss(unet, ahead, scheduler, targets, states, generator)
            retained_grads = torch.autograd.grad(retained, list(ahead.values()))
            # Prior preservation: on legal data, predict what the published UNet predicted.
            clean, legal_states = legal.batch(config.batch_size, generator)

            def published_prediction(inputs, conditioning):
                with torch.no_grad():
                    return functional_call(unet, published, inputs, conditioning).sample

            prior = _loss(unet, weights, scheduler, clean, legal_states, generator,
                          published_prediction)  # fmt: skip
            prior_grads = torch.autograd.grad(prior, list(weights.values()))
            for weight, g, r, p in zip(weights.values(), grads, retained_grads, prior_grads,
                                       strict=True):  # fmt: skip
                weight.grad = g + config.retention_weight * r + config.prior_weight * p
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if report is not None:
                report(backdoor=float(backdoor.detach()), retained=float(retained.detach()),
                       prior=float(prior.detach()))  # fmt: skip
    finally:
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_(requires[name])
    return {n: w.detach() for n, w in weights.items()}
