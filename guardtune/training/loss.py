"""The denoising objective: one place that poses the problem every training loop solves.

A clean latent is noised at a random timestep and the UNet learns to predict the noise (or the
velocity, on v-prediction models such as SD 2.x). The fine-tune recipe, the mask learner,
PersGuard and the held-out loss of `evaluate` all draw their noise and timesteps, noise the
latents and build the target here, so a change to the objective reaches all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from guardtune.training.conditioning import unet_inputs


def denoising_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity on v-prediction models."""
    if scheduler.config.prediction_type == "v_prediction":  # SD 2.x-style models
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def draw_noise(
    scheduler, shape: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of `shape` and one training timestep per example, drawn in this order."""
    noise = torch.randn(shape, generator=generator)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(steps, (shape[0],), generator=generator)
    return noise, timesteps


@dataclass(frozen=True)
class DenoisingProblem:
    """UNet inputs (noisy latents at `timesteps`) and what it should predict for them."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def pose(scheduler, latents, noise, timesteps) -> DenoisingProblem:
    noisy = scheduler.add_noise(latents, noise, timesteps)
    return DenoisingProblem(
        noisy, timesteps, denoising_target(scheduler, latents, noise, timesteps)
    )


def predict(unet, problem: DenoisingProblem, states: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction for `problem` on the UNet's device, in fp32."""
    device = next(unet.parameters()).device
    conditioning = unet_inputs(unet, states.to(device))
    return unet(
        problem.noisy.to(device), problem.timesteps.to(device), **conditioning
    ).sample.float()


def diffusion_loss(
    unet, scheduler, latents: torch.Tensor, states: torch.Tensor, generator: torch.Generator,
    snr_gamma: float | None = None, noise_offset: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """diffusers' text-to-image objective, with optional Min-SNR-gamma weighting."""
    noise, timesteps = draw_noise(scheduler, tuple(latents.shape), generator)
    if noise_offset:
        # diffusers' --noise_offset: a per-image, per-channel constant lets the model learn
        # overall brightness, which zero-mean noise alone never moves.
        batch, channels = latents.shape[:2]
        noise = noise + noise_offset * torch.randn(batch, channels, 1, 1, generator=generator)
    problem = pose(scheduler, latents, noise, timesteps)
    prediction = predict(unet, problem, states)
    target = problem.target.to(prediction.device)
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).to(prediction.device)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = (
        weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
    )
    per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_example * weights).mean()
