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
verified is what loads. `ldm_state` writes the other way (a pipeline under LDM names) for SD 1.x
pipelines. Configs come from the `--model-config` folder and are not bound. SDXL and SD 2.x
(OpenCLIP) single files are refused here: their text encoders need conversions this module does
not do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from guardtune.contract import LDM_UNET_PREFIX
from guardtune.enforce.keynames import diffusers_to_ldm_unet
from guardtune.errors import DataError
from guardtune.tensorfile import TensorRecord, read_header, renamed

LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
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


def ldm_state(pipeline) -> dict[str, torch.Tensor]:
    """An SD 1.x pipeline's UNet, VAE and text encoder under original (LDM) names."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        raise DataError("only SD 1.x and 2.x pipelines can be written as original checkpoints")
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
    for name, tensor in pipeline.text_encoder.state_dict().items():
        # transformers 5 dropped the `text_model.` level that original checkpoints keep.
        qualified = name if name.startswith("text_model.") else f"text_model.{name}"
        state[LDM_CLIP_PREFIX + qualified] = tensor
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


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
