"""A tiny Stable Diffusion XL pipeline, built offline in a second or two, for SDXL tests.

The pipeline borrows the embedded digits model's tokenizer and VAE, so guardtune's prompts and
images go through it unchanged, and pairs them with freshly initialised (random, seeded) text
encoders and UNet that have the real SDXL layout: two CLIP encoders whose penultimate hidden
states are concatenated, a pooled projection from the second one, and a UNet conditioned on
``text_time`` added embeddings. Only the sizes are shrunk.
"""

from __future__ import annotations

import json
from pathlib import Path

from guardtune.resolve import EMBEDDED_DIR

# SDXL's micro-conditioning: original (h, w), crop (top, left) and target (h, w) sizes.
_NUM_TIME_IDS = 6
_TEXT_HIDDEN = 32
_TEXT_2_HIDDEN = 32
_PROJECTION_DIM = 32
_ADDITION_TIME_EMBED_DIM = 8


def make_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Write a tiny StableDiffusionXLPipeline (save_pretrained, safetensors) into `folder`.

    Weights are fp32 and depend only on `seed`. Returns `folder`.
    """
    # Imported here so that collecting tests that never build the model stays cheap.
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    folder = Path(folder)
    text_config = json.loads((EMBEDDED_DIR / "text_encoder" / "config.json").read_text())
    unet_config = json.loads((EMBEDDED_DIR / "unet" / "config.json").read_text())

    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_DIR / "tokenizer")
    # The embedded weights are stored in fp16; tests want full precision on CPU.
    vae = AutoencoderKL.from_pretrained(EMBEDDED_DIR / "vae", torch_dtype=torch.float32)

    # The encoders must share the tokenizer's vocabulary, context length and special ids: CLIP
    # pools at the first end-of-text id, so a wrong eos_token_id would pool the wrong token.
    shared = {
        "vocab_size": max(text_config["vocab_size"], len(tokenizer)),
        "max_position_embeddings": text_config["max_position_embeddings"],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-5,
    }

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**shared, hidden_size=_TEXT_HIDDEN, hidden_act="quick_gelu")
    )
    # The real second encoder (OpenCLIP bigG) uses exact GELU and a pooled projection.
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **shared,
            hidden_size=_TEXT_2_HIDDEN,
            projection_dim=_PROJECTION_DIM,
            hidden_act="gelu",
        )
    )
    unet = UNet2DConditionModel(
        sample_size=unet_config["sample_size"],
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        # The UNet sees both encoders' penultimate hidden states side by side.
        cross_attention_dim=_TEXT_HIDDEN + _TEXT_2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_ADDITION_TIME_EMBED_DIM,
        # Pooled text embedding followed by the sinusoidally embedded time ids.
        projection_class_embeddings_input_dim=(
            _PROJECTION_DIM + _NUM_TIME_IDS * _ADDITION_TIME_EMBED_DIM
        ),
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )

    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder
