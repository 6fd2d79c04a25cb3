"""The public Stable Diffusion v1.5 UNet config, shared by the SD-size benchmarks.

859,520,964 parameters in 686 tensors; `sample_size` only sets the default latent size.
`write_unet` saves randomly initialised weights of that shape without building the model;
`best_of` times a call, keeping the fastest of a few runs.
"""

import time
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip


def write_unet(path: Path, dtype: torch.dtype, config_dir: Path | None = None) -> tuple[int, int]:
    """Random SD v1.5-shaped UNet weights (and its config.json, if asked); (parameters, tensors)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    if config_dir is not None:
        unet.save_config(config_dir)
    generator = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(p.shape, generator=generator) * 0.02).to(dtype)
        for name, p in unet.named_parameters()
    }
    save_file(state, str(path))
    return sum(t.numel() for t in state.values()), len(state)


def best_of(repeats: int, run) -> float:
    """The fastest of `repeats` timed calls of `run`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
