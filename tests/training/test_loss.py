"""The one denoising objective: its draws, its target, and its Min-SNR weighting."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from guardtune.training.loss import diffusion_loss, draw_noise, pose
from tests.evaluate.zero_unet import ZeroUNet, expected_target


def _draws(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator)
    return noise, torch.randint(1000, (shape[0],), generator=generator)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_targets_what_the_scheduler_predicts(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    latents, states = torch.randn(4, 4, 8, 8), torch.randn(4, 3, 8)
    loss = diffusion_loss(ZeroUNet(), scheduler, latents, states, torch.Generator().manual_seed(3))
    noise, timesteps = _draws(3, tuple(latents.shape))
    assert torch.allclose(loss, expected_target(scheduler, latents, noise, timesteps).pow(2).mean())


def test_draws_and_problem_match_diffusers_training_script():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(3, 4, 8, 8)
    noise, timesteps = draw_noise(scheduler, tuple(latents.shape), torch.Generator().manual_seed(5))
    want_noise, want_timesteps = _draws(5, tuple(latents.shape))
    assert torch.equal(noise, want_noise) and torch.equal(timesteps, want_timesteps)
    problem = pose(scheduler, latents, noise, timesteps)
    assert torch.equal(problem.noisy, scheduler.add_noise(latents, noise, timesteps))
    assert torch.equal(problem.target, noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting(prediction_type):
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    latents, states = torch.randn(64, 4, 8, 8), torch.randn(64, 3, 8)
    loss = diffusion_loss(ZeroUNet(), scheduler, latents, states,
                          torch.Generator().manual_seed(7), snr_gamma=5.0)  # fmt: skip
    noise, timesteps = _draws(7, tuple(latents.shape))
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert (weights < 0.99).any()  # some draws are weighted down, so the test can tell
    per_example = expected_target(scheduler, latents, noise, timesteps).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (per_example * weights).mean())
    unweighted = diffusion_loss(ZeroUNet(), scheduler, latents, states,
                                torch.Generator().manual_seed(7))  # fmt: skip
    assert not torch.allclose(loss, unweighted)
