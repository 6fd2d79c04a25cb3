"""The UNet's text conditioning for SD 1.x, 2.x and XL, carried as one tensor per example.

SD 1.x and 2.x condition the UNet on the text encoder's per-token states. SDXL adds two inputs:
the pooled, projected output of its second text encoder, and six size numbers (the original
height and width, the top-left crop, the target height and width). Every recipe batches its
conditioning by indexing, concatenating and moving one tensor, so for SDXL the token states get
one more row that holds the pooled embedding followed by the six numbers (zero-padded), and
`unet_inputs` splits that row off just before the UNet is called. No other module knows the
layout. Encoding, the training loss, the savings probe and PersGuard use it.
"""

from __future__ import annotations

from typing import Any

import torch

from guardtune.errors import DataError

TIME_IDS = 6  # original (h, w), crop (top, left), target (h, w)


def _config(unet) -> Any:
    """The UNet's config, also through a DDP or functional wrapper around it."""
    inner = getattr(unet, "module", unet)
    return getattr(unet, "config", None) or getattr(inner, "config", None)


def is_sdxl(unet) -> bool:
    """An SDXL-style UNet, conditioned on pooled text embeddings and time ids as well."""
    config = _config(unet)
    return getattr(config, "addition_embed_type", None) == "text_time"


def pooled_width(unet) -> int:
    config = _config(unet)
    return config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim


def pack(states: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's three inputs as (batch, tokens + 1, width): the last row is pooled, then time ids."""
    batch, _, width = states.shape
    used = pooled.shape[1] + time_ids.shape[1]
    if used > width:
        raise DataError(
            f"this SDXL model's pooled embedding and time ids ({used} values) are wider than "
            f"its token states ({width}); guardtune cannot carry them"
        )
    extra = torch.zeros(batch, 1, width, dtype=states.dtype)
    extra[:, 0, : pooled.shape[1]] = pooled
    extra[:, 0, pooled.shape[1] : used] = time_ids
    return torch.cat([states, extra], dim=1)


def unet_inputs(unet, states: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments that condition `unet` on `states` (as `encode_captions` made them)."""
    if not is_sdxl(unet):
        return {"encoder_hidden_states": states}
    width = pooled_width(unet)
    extra = states[:, -1]
    return {
        "encoder_hidden_states": states[:, :-1],
        "added_cond_kwargs": {
            "text_embeds": extra[:, :width],
            "time_ids": extra[:, width : width + TIME_IDS],
        },
    }


def with_time_ids(states: torch.Tensor, width: int, ids: torch.Tensor) -> torch.Tensor:
    """SDXL conditioning `states` with each example's six size numbers replaced by `ids`
    (pooled embeddings `width` wide): the numbers of the crop a draw actually trained on."""
    states = states.clone()
    states[:, -1, width : width + TIME_IDS] = ids.to(states.dtype)
    return states


def time_ids(resolution: int, count: int) -> torch.Tensor:
    """Size conditioning for square training images seen whole, as sampling at that size uses:
    original size = target size = (resolution, resolution), no crop."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return row.expand(count, TIME_IDS).clone()


def encode_captions(
    pipeline, captions: list[str], device: torch.device, resolution: int
) -> torch.Tensor:
    """The conditioning of each caption, in fp32 on the CPU (one row per caption)."""
    with torch.no_grad():
        if getattr(pipeline, "text_encoder_2", None) is not None:
            # SDXL's own encoding: both encoders' penultimate states side by side, and the
            # second encoder's projected pooled output.
            states, _, pooled, _ = pipeline.encode_prompt(
                captions, device=device, num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )  # fmt: skip
            return pack(
                states.float().cpu(), pooled.float().cpu(), time_ids(resolution, len(captions))
            )
        tokenizer = pipeline.tokenizer
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        return pipeline.text_encoder(ids.to(device))[0].float().cpu()


def random_conditioning(pipeline, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Random conditioning of the shape `encode_captions` gives, for probes that time the UNet."""
    unet = pipeline.unet
    tokens = pipeline.tokenizer.model_max_length
    states = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    if not is_sdxl(unet):
        return states
    pooled = torch.randn(batch, pooled_width(unet), generator=generator)
    return pack(states, pooled, time_ids(64, batch))
