"""Exporting a fine-tune to the files other tools load (`guardtune export`).

- `kohya`: a LoRA run's adapters in kohya's naming, the form ComfyUI's and AUTOMATIC1111's LoRA
  loaders and diffusers' `load_lora_weights` read: `lora_unet_<module>.lora_down.weight`,
  `.lora_up.weight` and `.alpha`, the module's name with dots as underscores. kohya's scripts
  train SD 1.x and 2.x on diffusers' UNet and SDXL on the original (sgm) one, so its files name
  SD 1.x/2.x modules as diffusers does and SDXL modules by their original names
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), numbered by the base's block
  layout; A1111 finds SDXL modules under those names only. Which it is comes from the base the
  run's provenance names (`_original_modules`).
- `single-file`: a full fine-tune as one original Stable Diffusion checkpoint (LDM names, in the
  layout of its family: SD 1.x, SD 2.x or SDXL, see `guardtune.ldm`).

Each export carries the run's provenance in its safetensors metadata, so `audit` checks an
export as it checks the run. Reads the run folder `finetune` wrote; writes one file atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from guardtune import atomic
from guardtune.contract import (
    LORA_FILE,
    PROVENANCE_FILE,
    PROVENANCE_METADATA_KEY,
    RunProvenance,
    read_small_file,
)
from guardtune.errors import DataError, UsageError
from guardtune.tensorfile import read_header_and_metadata

FORMATS = ("kohya", "single-file")
# `finetune --save-as`: the run's own output (diffusers), or that and an export beside it.
SAVE_AS = ("diffusers", *FORMATS)
SAVED_NAMES = {"kohya": "lora-kohya.safetensors", "single-file": "model.safetensors"}
KOHYA_PREFIX = "lora_unet_"
# diffusers' spelling of a LoRA tensor in files `finetune` writes -> kohya's.
_PARTS = {".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight"}


@dataclass(frozen=True)
class ExportResult:
    run: Path
    out: Path
    format: str
    tensors: int
    seconds: float


def export(run: Path, out: Path, *, to: str) -> ExportResult:
    """Write the fine-tune in `run` (a `finetune --out` folder) to `out` in format `to`."""
    start = time.perf_counter()
    run, out = Path(run), Path(out)
    if to not in FORMATS:
        raise UsageError(f"--to must be one of {', '.join(FORMATS)}, not {to!r}")
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out} must end in .safetensors")
    if not run.is_dir():
        raise DataError(f"{run} is not a run folder of `guardtune finetune`")
    state, provenance = _kohya(run) if to == "kohya" else _single_file(run)
    metadata = {"format": "pt"} | ({PROVENANCE_METADATA_KEY: provenance} if provenance else {})
    with atomic.replacing(out) as temporary:
        from safetensors.torch import save_file

        save_file(state, str(temporary), metadata=metadata)
    return ExportResult(run, out, to, len(state), time.perf_counter() - start)


def check_save_as(save_as: str, lora: bool) -> None:
    """UsageError (exit 2) unless `finetune --save-as` can write `save_as` for this run."""
    if save_as not in SAVE_AS:
        raise UsageError(f"--save-as must be one of {', '.join(SAVE_AS)}, not {save_as!r}")
    if save_as == "kohya" and not lora:
        raise UsageError("--save-as kohya writes LoRA adapters: add --lora")
    if save_as == "single-file" and lora:
        raise UsageError("--save-as single-file writes a full fine-tune: drop --lora")


def save_run_as(run: Path, save_as: str) -> Path | None:
    """After `finetune` wrote `run`: its export in `save_as`, beside its own output."""
    if save_as == "diffusers":
        return None
    return export(run, run / SAVED_NAMES[save_as], to=save_as).out


def _kohya(run: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    from safetensors.torch import load_file

    source = run / LORA_FILE
    if not source.is_file():
        raise DataError(f"{run} holds no LoRA file ({LORA_FILE}): was it a LoRA run?")
    _, metadata = read_header_and_metadata(source)
    provenance = metadata.get(PROVENANCE_METADATA_KEY)
    original = _original_modules(source, provenance)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(source)).items():
        part = next((p for p in _PARTS if key.endswith(p)), None)
        if not key.startswith("unet.") or part is None:
            raise DataError(f"{source.name}: cannot export tensor {key} in kohya naming")
        module = key[len("unet.") : -len(part)]
        if original is not None:
            if module not in original:
                raise DataError(f"{source.name}: {module} is not a UNet module of the base")
            module = original[module]
        stem = KOHYA_PREFIX + module.replace(".", "_")
        state[stem + _PARTS[part]] = tensor
        if part == ".lora.down.weight":
            # finetune trains with lora_alpha = rank: the update is scaled by alpha / rank = 1.
            rank = tensor.shape[0]
            state[f"{stem}.alpha"] = torch.tensor(float(rank))
    return state, provenance


def _original_modules(source: Path, provenance: str | None) -> dict[str, str] | None:
    """For a run on SDXL, each UNet module's original name; None for SD 1.x and 2.x.

    The run's provenance names its base. A policy binds every component with weights, so a
    recorded fingerprint without `text_encoder_2` is no SDXL and needs nothing more; otherwise
    the base's UNet config decides (SDXL: `text_time` added embeddings) and numbers the original
    blocks, so the base must be here. guardtune trains SDXL from diffusers folders only, so a
    base that is a single file is SD 1.x or 2.x.
    """
    from diffusers import UNet2DConditionModel

    from guardtune.enforce.keynames import diffusers_to_ldm_unet, module_of
    from guardtune.ldm import unet_names
    from guardtune.resolve import resolve_model

    if provenance is None:
        raise DataError(f"{source.name} names no base model: it carries no provenance")
    try:
        claims = RunProvenance.from_json(provenance)
    except ValueError as error:
        raise DataError(f"{source.name}: {error}") from None
    if claims.base_fingerprint is not None and "text_encoder_2" not in claims.base_fingerprint:
        return None
    named = claims.base_model
    if Path(named).suffix == ".safetensors":
        return None
    hub_id, _, commit = named.partition("@")  # a hub model is recorded as org/name@commit
    try:
        if commit and not Path(named).exists():
            base = resolve_model(hub_id, revision=commit)
        else:
            base = resolve_model(named)
    except DataError:
        raise DataError(
            f"the base model {named} that the run's provenance names is not here",
            hint="kohya names an SDXL LoRA's modules by the base's UNet layout: export where "
            "the base is (its folder, or the hub cache)",
        ) from None
    config = UNet2DConditionModel.load_config(base.path, subfolder="unet", local_files_only=True)
    if config.get("addition_embed_type") != "text_time":
        return None
    weights = diffusers_to_ldm_unet(unet_names(base.path))
    return {module_of(name): module_of(ldm) for name, ldm in weights.items()}


def _single_file(run: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    from guardtune.ldm import ldm_state
    from guardtune.models import load_pipeline

    folder = run / "model"
    if not (folder / "model_index.json").is_file():
        raise DataError(f"{run} holds no model folder: was it a full fine-tune?")
    pipeline = load_pipeline(str(folder), device=torch.device("cpu"), dtype=torch.float32)
    record = folder / PROVENANCE_FILE
    provenance = read_small_file(record, "provenance").decode() if record.exists() else None
    return ldm_state(pipeline), provenance
