"""Name mapping across derivative formats, checked against diffusers' own converter."""

from __future__ import annotations

import pytest
import torch

from guardtune.enforce.keynames import (
    LDM_UNET_PREFIX,
    ModuleIndex,
    diffusers_to_ldm_unet,
    is_lora_key,
    parse_lora_key,
)
from guardtune.resolve import EMBEDDED_DIR


def _unet_names(config: dict) -> list[str]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [name for name, _ in unet.named_parameters()]


def _embedded_config() -> dict:
    import json

    config = json.loads((EMBEDDED_DIR / "unet" / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


SD15 = dict(
    sample_size=64, cross_attention_dim=768, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
SD2 = SD15 | dict(
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
)
SDXL = dict(
    sample_size=128, cross_attention_dim=2048, layers_per_block=2,
    block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
    transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip


@pytest.mark.parametrize("config", [SD15, SD2, SDXL, None], ids=["sd15", "sd2", "sdxl", "embedded"])
def test_original_names_convert_back_with_diffusers_converter(config):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = config or _embedded_config()
    names = _unet_names(config)
    mapping = diffusers_to_ldm_unet(names)
    assert set(mapping) == set(names) and len(set(mapping.values())) == len(names)
    # diffusers only converts original -> diffusers; feed it our names, valued by the answer.
    checkpoint = {LDM_UNET_PREFIX + ldm: name for name, ldm in mapping.items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    assert converted == {name: name for name in names}


def test_known_stable_diffusion_v1_names():
    mapping = diffusers_to_ldm_unet(_unet_names(SD15))
    assert mapping["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == (
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    )
    assert mapping["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.3.0.op.weight"
    assert mapping["down_blocks.1.resnets.0.conv_shortcut.weight"] == (
        "input_blocks.4.0.skip_connection.weight"
    )
    assert mapping["mid_block.resnets.1.norm1.weight"] == "middle_block.2.in_layers.0.weight"
    assert mapping["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert mapping["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert mapping["conv_out.bias"] == "out.2.bias"


def test_known_stable_diffusion_xl_names():
    names = _unet_names(SDXL)
    mapping = diffusers_to_ldm_unet(names)
    assert mapping["add_embedding.linear_1.weight"] == "label_emb.0.0.weight"
    assert mapping["add_embedding.linear_2.bias"] == "label_emb.0.2.bias"
    assert mapping["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight"] == (
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight"
    )
    assert mapping["mid_block.attentions.0.transformer_blocks.9.attn2.to_k.weight"] == (
        "middle_block.1.transformer_blocks.9.attn2.to_k.weight"
    )
    assert mapping["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    # kohya's SDXL LoRAs spell modules by these names: each maps back to one module.
    index = ModuleIndex.for_unet(names)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight"
    module = "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"
    assert parse_lora_key(key, index).module == module
    assert parse_lora_key("lora_unet_label_emb_0_0.lora_up.weight", index).module == (
        "add_embedding.linear_1"
    )


def test_lora_keys_in_every_naming_map_to_their_module():
    index = ModuleIndex.for_unet(_unet_names(SD15))
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    kohya = "lora_unet_" + module.replace(".", "_")
    keys = [
        f"unet.{module}.lora_A.weight",
        f"unet.{module}.lora.down.weight",
        f"base_model.model.{module}.lora_B.default.weight",
        f"{module}.lora_magnitude_vector",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight",
        f"{kohya}.lora_down.weight",
        f"{kohya}.alpha",
        f"{kohya}.hada_w1_a",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight",
        f"{LDM_UNET_PREFIX}input_blocks.4.1.transformer_blocks.0.attn2.to_k.lora_A.weight",
    ]
    for key in keys:
        assert is_lora_key(key), key
        parsed = parse_lora_key(key, index)
        assert (parsed.component, parsed.module, parsed.parameter) == ("unet", module, "weight")
    assert parse_lora_key(f"{kohya}.diff_b", index).parameter == "bias"
    out = parse_lora_key("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor."
                         "to_out_lora.down.weight", index)  # fmt: skip
    assert out.module == "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert parse_lora_key(
        "lora_te_text_model_encoder_layers_0.lora_up.weight", index
    ).component == ("text_encoder")
    unknown = parse_lora_key("lora_unet_not_a_module.lora_down.weight", index)
    assert unknown.module is None
    assert not is_lora_key("unet.down_blocks.0.resnets.0.norm1.weight")
