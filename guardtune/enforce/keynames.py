"""Tensor and module names across the formats that fine-tuned derivatives come in.

A policy names UNet tensors the way diffusers does (`unet.down_blocks.0.attentions.0...`).
Derivatives arrive as diffusers folders, guardtune single files (`unet.*`), original Stable
Diffusion checkpoints (`model.diffusion_model.input_blocks.1.1...`), and LoRA files in
diffusers/peft naming (`unet.<module>.lora_A.weight`, `.lora.down.weight`, the older
`<attention>.processor.to_q_lora.down.weight`) or kohya naming (`lora_unet_<module, dots as
underscores>.lora_down.weight`, with diffusers or original module names). `guardtune audit`
maps all of them to the policy's names here; a name that cannot be mapped stays unmapped, and
the audit treats that as a violation (it cannot prove the tensor is not a frozen one).

The original-SD mapping is written out for the SD-style UNet layout (`UNet2DConditionModel`
with any number of blocks and layers per block, and transformer layers per block), which SD 1.x,
2.x and SDXL share; SDXL's added embedding (`add_embedding`, for pooled text and size
conditioning) is the original `label_emb.0`. The tests check it against diffusers' own
converter, which only goes the other way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from guardtune.contract import LDM_UNET_PREFIX

KOHYA_UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")

# diffusers resnet part -> original part
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's `text_time` embedding MLP; sgm's `label_emb` is Sequential(Sequential(lin, act, lin)).
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_BLOCK_LAYER = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_SAMPLER = re.compile(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def module_of(tensor_name: str) -> str:
    """`a.b.weight` -> `a.b`: the module that owns a parameter."""
    return tensor_name.rsplit(".", 1)[0]


def diffusers_to_ldm_unet(names: Iterable[str]) -> dict[str, str]:
    """Diffusers UNet tensor names (no `unet.` prefix) -> original SD names (no prefix).

    Names outside the SD layout (e.g. a class embedding) are left out of the mapping.
    """
    names = list(names)
    layers = [m for n in names if (m := _BLOCK_LAYER.fullmatch(n))]
    down = [int(m[4]) for m in layers if m[1] == "down" and m[3] == "resnets"]
    if not down:
        return {}
    per_block = max(down) + 1  # layers_per_block; original blocks add one slot per sampler
    up_with_attention = {int(m[2]) for m in layers if m[1] == "up" and m[3] == "attentions"}
    mapping = {}
    for name in names:
        ldm = _to_ldm(name, per_block, up_with_attention)
        if ldm is not None:
            mapping[name] = ldm
    return mapping


def _to_ldm(name: str, per_block: int, up_with_attention: set[int]) -> str | None:
    for prefix, target in _TOP_LEVEL.items():
        if name.startswith(prefix + "."):
            return target + name[len(prefix) :]
    if match := _BLOCK_LAYER.fullmatch(name):
        side, block, kind, layer, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if kind == "resnets":
            rest = _resnet_part(rest)
        slot = 0 if kind == "resnets" else 1
        if side == "down":
            return f"input_blocks.{1 + block * (per_block + 1) + layer}.{slot}.{rest}"
        return f"output_blocks.{block * (per_block + 1) + layer}.{slot}.{rest}"
    if match := _SAMPLER.fullmatch(name):
        side, block, rest = match[1], int(match[2]), match[4]
        if side == "down":
            return f"input_blocks.{(block + 1) * (per_block + 1)}.0.op.{rest}"
        slot = 2 if block in up_with_attention else 1
        return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{rest}"
    if match := _MID.fullmatch(name):
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_resnet_part(rest)}"
        return f"middle_block.{2 * index + 1}.{rest}"
    return None


def _resnet_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


@dataclass(frozen=True)
class ModuleIndex:
    """Every way a LoRA file may spell a UNet module, mapped to its diffusers module name."""

    dotted: dict[str, str]  # diffusers or original dotted module name -> diffusers module name
    kohya: dict[str, str | None]  # underscore form -> diffusers module (None: ambiguous)

    @classmethod
    def for_unet(cls, tensor_names: Iterable[str]) -> ModuleIndex:
        """Built from the base UNet's tensor names (no `unet.` prefix)."""
        names = list(tensor_names)
        dotted = {module_of(n): module_of(n) for n in names}
        for diffusers, ldm in diffusers_to_ldm_unet(names).items():
            dotted.setdefault(module_of(ldm), module_of(diffusers))
        kohya: dict[str, str | None] = {}
        for spelled, module in dotted.items():
            key = spelled.replace(".", "_")
            # Two modules that collapse to one underscore name cannot be told apart: fail closed.
            kohya[key] = module if kohya.get(key, module) == module else None
        return cls(dotted, kohya)


@dataclass(frozen=True)
class LoraKey:
    """What one LoRA tensor adapts: its UNet module (None if unknown) and which parameter."""

    key: str
    component: str  # "unet", "text_encoder" or "unknown"
    module: str | None  # diffusers module name, without the `unet.` prefix
    parameter: str  # "weight" or "bias": what the adapter's update is added to
    # How the tensor reaches the adapted parameter's rows (output channels): "up" (its dim 0
    # is the output rows: lora_B / lora_up), "down" (through an up tensor only: lora_A,
    # lora_down, lora_mid), "scalar" (alpha, scale), "diff" (a full difference added to the
    # parameter), or "other" (DoRA magnitudes, LoHa, LoKr: every row at once).
    role: str = "other"


def _role(part: str) -> str:
    if part in ("lora_B", "lora_up", "lora.up", "lora_linear_layer.up"):
        return "up"
    if part in ("lora_A", "lora_down", "lora.down", "lora_linear_layer.down", "lora_mid"):
        return "down"
    if part in ("alpha", "scale"):
        return "scalar"
    return "diff" if part in ("diff", "diff_b") else "other"


# The adapter part of a key, after the module name: LoRA, DoRA, LoHa, LoKr and full-diff files.
_ADAPTER = re.compile(
    r"\.(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.down"
    r"|lora_linear_layer\.up|lora_mid|lora_magnitude_vector|alpha|dora_scale|scale"
    r"|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|diff|diff_b)((?:\.[^.]+)*)$"
)
_OLD_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(?:down|up)\.weight$")
_PEFT_PREFIX = "base_model.model."


def _adapter(key: str) -> re.Match[str] | None:
    """`_ADAPTER.search(key)` in linear time. No match can start before the last '..' or end in
    a final '.', and trying each such start would rescan the rest of the key (quadratic)."""
    return None if key.endswith(".") else _ADAPTER.search(key, key.rfind("..") + 1)


def is_lora_key(key: str) -> bool:
    return (
        key.startswith(("lora_unet_", *TEXT_ENCODER_PREFIXES[2:]))
        or _adapter(key) is not None
        or _OLD_PROCESSOR.match(key) is not None
    )


def parse_lora_key(key: str, index: ModuleIndex) -> LoraKey:
    """Map one LoRA file key to the UNet module it adapts."""
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return LoraKey(key, "text_encoder", None, "weight")
    if match := _OLD_PROCESSOR.match(key):
        attention, projection = match[1], match[2]
        projection = "to_out.0" if projection == "to_out" else projection
        body, parameter = f"{attention}.{projection}", "weight"
        role = "up" if key.endswith(".up.weight") else "down"
    elif match := _adapter(key):
        body = key[: match.start()]
        part, tail = match[1], match[2]
        parameter = "bias" if part == "diff_b" or tail.endswith(".bias") else "weight"
        role = _role(part)
    else:
        return LoraKey(key, "unknown", None, "weight")
    if body.startswith(KOHYA_UNET_PREFIX):
        module = index.kohya.get(body[len(KOHYA_UNET_PREFIX) :])
        return LoraKey(key, "unet", module, parameter, role)
    for prefix in ("unet.", _PEFT_PREFIX, LDM_UNET_PREFIX):
        body = body.removeprefix(prefix)
    module = index.dotted.get(body)
    return LoraKey(key, "unet" if module else "unknown", module, parameter, role)
