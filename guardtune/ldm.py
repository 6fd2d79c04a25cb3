"""Original Stable Diffusion (LDM) single-file checkpoints: their names, and what a policy binds.

The checkpoints that CompVis and Stability released, and that A1111 and ComfyUI load, hold the
whole pipeline in one file under LDM names: the UNet under `model.diffusion_model.`, the VAE
under `first_stage_model.` and the CLIP text encoder under `cond_stage_model.transformer.`, and
often more (EMA copies, the noise schedule). guardtune binds such a file as it is:

- the `unet` component is every UNet tensor of the file, named as diffusers names it (the same
  bytes, renamed through `guardtune.enforce.keynames`), so a policy freezes the tensors that
  `finetune` trains and `audit` checks under one name whatever the file layout;
- the `checkpoint` component is every other tensor of the file under its own name, so no byte
  of the file is left out of the binding.

`guardtune.models` loads such a file from these components: each tensor copied out of the file
and hashed, compared with the policy, and only then handed to diffusers' converters, so what was
verified is what loads. Configs come from the `--model-config` folder and are not bound. SDXL
and SD 2.x (OpenCLIP) single files are refused as models here: their text encoders need
conversions on reading that this module does not do.

`ldm_state` writes the other way, for `guardtune export` (a pipeline under LDM names), in the
layout of the pipeline's family (`family`), as the released checkpoints hold it and diffusers'
`from_single_file`, A1111 and ComfyUI read it:

- SD 1.x: the OpenAI CLIP text encoder under `cond_stage_model.transformer.text_model.`;
- SD 2.x: the OpenCLIP text encoder under `cond_stage_model.model.` in OpenCLIP's own names
  (`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N` with q, k and v
  fused into `attn.in_proj_weight`/`in_proj_bias`, `ln_final`). diffusers' SD 2 encoder is
  OpenCLIP without its last layer and projection, which SD 2 never uses: the file holds the
  layers it has, as diffusers' own diffusers-to-original converter writes them, and loaders
  leave the absent ones unused;
- SDXL: the UNet with its added embedding as `label_emb.0`, the first (OpenAI CLIP) text
  encoder under `conditioner.embedders.0.transformer.text_model.`, the second (OpenCLIP bigG)
  under `conditioner.embedders.1.model.` in OpenCLIP names with its `text_projection`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from guardtune.contract import LDM_UNET_PREFIX
from guardtune.enforce.keynames import diffusers_to_ldm_unet
from guardtune.errors import DataError
from guardtune.tensorfile import TensorRecord, read_header, renamed

LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
OTHER = "checkpoint"  # the component that binds every tensor outside the UNet


def is_ldm_checkpoint(records: list[TensorRecord]) -> bool:
    return any(r.name.startswith(LDM_UNET_PREFIX) for r in records)


def unet_names(config_dir: Path) -> list[str]:
    """The diffusers UNet's parameter and buffer names for the config in `config_dir/unet`."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(config_dir, subfolder="unet", local_files_only=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return list(unet.state_dict())


def ldm_components(path: Path, config_dir: Path) -> dict[str, list[TensorRecord]]:
    """The file's tensors as the two components a policy binds (see the module docstring)."""
    return bound_names(path, config_dir)[0]


def bound_names(
    path: Path, config_dir: Path
) -> tuple[dict[str, list[TensorRecord]], dict[str, str]]:
    """The components, and the name in the file of each tensor they bind."""
    records = read_header(path)
    to_ldm = diffusers_to_ldm_unet(unet_names(config_dir))
    from_ldm = {LDM_UNET_PREFIX + ldm: name for name, ldm in to_ldm.items()}
    in_unet = [r for r in records if r.name.startswith(LDM_UNET_PREFIX)]
    unknown = [r.name for r in in_unet if r.name not in from_ldm]
    if unknown:
        raise DataError(
            f"{path.name}: UNet tensor {unknown[0]} does not fit the UNet of --model-config "
            f"({len(unknown)} unknown)",
            hint="guardtune reads SD 1.x and 2.x original checkpoints; pass their config folder",
        )
    missing = sorted(set(from_ldm) - {r.name for r in in_unet})
    if missing:
        raise DataError(f"{path.name} lacks UNet tensor {missing[0]} ({len(missing)} missing)")
    if not any(r.name.startswith(LDM_CLIP_PREFIX) for r in records):
        raise DataError(
            f"{path.name} has no CLIP text encoder under {LDM_CLIP_PREFIX}",
            hint="SDXL and SD 2.x (OpenCLIP) original checkpoints are not served; use diffusers "
            "folders for them",
        )
    bound = {
        r.name: f"unet.{from_ldm[r.name]}" if r.name in from_ldm else f"{OTHER}.{r.name}"
        for r in records
    }
    unet = [renamed(r, bound[r.name]) for r in in_unet]
    other = [renamed(r, bound[r.name]) for r in records if r.name not in from_ldm]
    return {"unet": unet, OTHER: other}, {name: original for original, name in bound.items()}


# ----------------------------------------------------------------------------- writing


def family(pipeline) -> str:
    """sd1, sd2 or sdxl: which original layout the pipeline is written in.

    SDXL is the pipeline with a second text encoder. Otherwise the text encoder decides, since
    a loader picks the encoder's architecture from the file's layout: OpenCLIP (SD 2.x) runs
    exact GELU, OpenAI's CLIP (SD 1.x) its `quick_gelu`, so an encoder configured with GELU is
    written as OpenCLIP. Neither the prediction type (SD 2 base predicts noise, SD 2 768 the
    velocity) nor the UNet (a UNet with linear projections trains on SD 1.x encoders too)
    tells the encoders apart.
    """
    if getattr(pipeline, "text_encoder_2", None) is not None:
        if getattr(pipeline, "text_encoder", None) is None:
            raise DataError("an SDXL refiner (no first text encoder) is not written here")
        return "sdxl"
    if pipeline.text_encoder.config.hidden_act == "gelu":
        return "sd2"
    return "sd1"


def ldm_state(pipeline) -> dict[str, torch.Tensor]:
    """An SD 1.x, 2.x or XL pipeline's UNet, VAE and text encoders under original (LDM) names."""
    kind = family(pipeline)
    state: dict[str, torch.Tensor] = {}
    unet = pipeline.unet.state_dict()
    to_ldm = diffusers_to_ldm_unet(unet)
    left = sorted(set(unet) - set(to_ldm))
    if left:
        raise DataError(f"UNet tensor {left[0]} has no original name")
    for name, ldm in to_ldm.items():
        state[LDM_UNET_PREFIX + ldm] = unet[name]
    vae = pipeline.vae.state_dict()
    up_blocks = len(pipeline.vae.config.up_block_types)
    for name, tensor in vae.items():
        ldm, conv = _vae_to_ldm(name, up_blocks)
        state[LDM_VAE_PREFIX + ldm] = tensor[:, :, None, None] if conv else tensor
    text = pipeline.text_encoder.state_dict()
    if kind == "sd1":
        state |= _clip_state(text, LDM_CLIP_PREFIX)
    elif kind == "sd2":
        state |= _openclip_state(text, LDM_OPENCLIP_PREFIX)
    else:
        state |= _clip_state(text, SDXL_CLIP_PREFIX)
        state |= _openclip_state(pipeline.text_encoder_2.state_dict(), SDXL_OPENCLIP_PREFIX)
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def _clip_state(text: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP text encoder as original checkpoints keep it: transformers' names."""
    # transformers 5 dropped the `text_model.` level that original checkpoints keep.
    return {
        prefix + (name if name.startswith("text_model.") else f"text_model.{name}"): tensor
        for name, tensor in text.items()
    }


# transformers' CLIP text encoder -> OpenCLIP's names (per layer, and outside the layers)
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_ENCODER_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def _openclip_state(text: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder (with or without projection) in OpenCLIP's names under `prefix`.

    OpenCLIP's attention holds q, k and v as one `in_proj` (q, then k, then v, as loaders split
    it in thirds) and its projection is applied as `x @ text_projection`: the transpose of
    transformers' Linear weight. A tensor with no OpenCLIP name is an error, not left out.
    """
    state: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for qualified, tensor in text.items():
        name = qualified.removeprefix("text_model.")
        if name == "text_projection.weight":
            state[prefix + "text_projection"] = tensor.t()
        elif name in _OPENCLIP_TOP:
            state[prefix + _OPENCLIP_TOP[name]] = tensor
        elif (match := _ENCODER_LAYER.fullmatch(name)) and match[2] in _QKV:
            fused.setdefault((match[1], match[3]), {})[match[2]] = tensor
        elif match and match[2] in _OPENCLIP_LAYER:
            layer = f"transformer.resblocks.{match[1]}.{_OPENCLIP_LAYER[match[2]]}.{match[3]}"
            state[prefix + layer] = tensor
        else:
            raise DataError(f"text encoder tensor {qualified} has no OpenCLIP name")
    for (layer, part), projections in fused.items():
        missing = [p for p in _QKV if p not in projections]
        if missing:
            raise DataError(f"text encoder layer {layer} lacks {missing[0]}.{part}")
        joined = torch.cat([projections[p] for p in _QKV])
        state[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{part}"] = joined
    return state


_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _vae_to_ldm(name: str, up_blocks: int) -> tuple[str, bool]:
    """A diffusers AutoencoderKL name in LDM naming, and whether it becomes a 1x1 convolution."""
    parts = name.split(".")
    if parts[1] == "mid_block" and parts[2] == "attentions":
        module = ".".join(parts[4:-1])
        ldm = f"{parts[0]}.mid.attn_1.{_VAE_ATTENTION[module]}.{parts[-1]}"
        return ldm, parts[-1] == "weight" and module != "group_norm"
    if parts[1] == "mid_block":  # resnets.0 / resnets.1 -> block_1 / block_2
        rest = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
        return f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{rest}", False
    if parts[1] in ("down_blocks", "up_blocks"):
        index = int(parts[2])
        level = index if parts[1] == "down_blocks" else up_blocks - 1 - index
        kind = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] == "resnets":
            rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            return f"{parts[0]}.{kind}.{level}.block.{parts[4]}.{rest}", False
        sampler = "downsample" if kind == "down" else "upsample"
        return f"{parts[0]}.{kind}.{level}.{sampler}.{'.'.join(parts[5:])}", False
    renames = {"conv_norm_out": "norm_out"}
    return ".".join(renames.get(p, p) for p in parts), False
