"""A UNet stand-in that predicts zeros, so a denoising loss is its target's mean square.

Shared by the tests that check which target (noise or velocity) a loss compares against.
"""

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput


class ZeroUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        return UNet2DConditionOutput(sample=sample * self.scale)


def expected_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """Written out here, independently of guardtune, as diffusers' training scripts do."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise
