"""Loading text-to-image pipelines, always offline: the one entry point for `--model`.

A model is named by one string: `digits` (the embedded default shipped in the package), a
local diffusers folder (with `model_index.json`), or a single `.safetensors` checkpoint, which
also needs a local folder with the component configs (`--model-config`). A single file may be
an original Stable Diffusion checkpoint (`model.diffusion_model.*` keys, converted by diffusers)
or guardtune's own layout (`unet.*`, `vae.*`, `text_encoder.*` keys, as `save_single_file`
writes). Every command that touches a model calls `load_pipeline`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from guardtune.contract import (
    ASSETS_DIR,
    COMPONENTS,
    LDM_UNET_PREFIX,
    default_device,
    default_dtype,
)
from guardtune.errors import DataError

EMBEDDED = "digits"
EMBEDDED_DIR = ASSETS_DIR / "digits"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is 'embedded', 'folder' or 'single_file'."""

    kind: str
    path: Path
    config_dir: Path | None = None

    @property
    def label(self) -> str:
        return EMBEDDED if self.kind == "embedded" else str(self.path)


def resolve_model(model: str, config_dir: Path | None = None) -> ModelSource:
    """Turn a `--model` string into a checked ModelSource; DataError if it cannot be one."""
    if model == EMBEDDED:
        if not (EMBEDDED_DIR / "model_index.json").is_file():
            raise DataError(
                "the embedded model's weights are missing from the package",
                hint="reinstall guardtune or run `make embedded`",
            )
        return ModelSource("embedded", EMBEDDED_DIR)
    path = Path(model).expanduser()
    if not path.exists():
        raise DataError(
            f"model {model!r} not found",
            hint="give 'digits', a diffusers folder, or a .safetensors file with --model-config",
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DataError(
                f"{path} is not a diffusers pipeline folder: it has no model_index.json",
                hint="point --model at the folder that save_pretrained wrote",
            )
        return ModelSource("folder", path)
    if path.suffix != ".safetensors":
        raise DataError(f"{path} is not a .safetensors checkpoint", hint="convert it first")
    if config_dir is None:
        raise DataError(
            f"the single-file checkpoint {path.name} needs its component configs",
            hint="pass --model-config with a diffusers folder of the same architecture",
        )
    if not (config_dir / "model_index.json").is_file():
        raise DataError(f"--model-config {config_dir} has no model_index.json")
    return ModelSource("single_file", path, config_dir)


def checkpoint_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path} is not a readable safetensors file: {error}") from error


def load_pipeline(
    model: str | ModelSource = EMBEDDED,
    config_dir: Path | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
):  # -> StableDiffusionPipeline (diffusers is imported lazily: it costs ~10 s)
    """Load a Stable-Diffusion-style pipeline fully offline, ready on `device` in `dtype`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Loading bars for a few local files are noise; training and sampling have their own.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    source = model if isinstance(model, ModelSource) else resolve_model(model, config_dir)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    options = dict(
        dtype=dtype,
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    try:
        if source.kind in ("embedded", "folder"):
            pipeline = StableDiffusionPipeline.from_pretrained(source.path, **options)
        elif any(k.startswith(LDM_UNET_PREFIX) for k in checkpoint_keys(source.path)):
            pipeline = StableDiffusionPipeline.from_single_file(
                str(source.path), config=str(source.config_dir), **options
            )
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(source.config_dir, **options)
            _load_guardtune_single_file(pipeline, source.path)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot load model {source.label}: {message}") from error
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _load_guardtune_single_file(pipeline, path: Path) -> None:
    """Load `unet.*`, `vae.*`, `text_encoder.*` keys into the pipeline's components, strictly."""
    state = load_file(str(path))
    for name in COMPONENTS:
        prefix = f"{name}."
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            raise DataError(f"{path.name} has no '{prefix}*' tensors for the {name}")
        module = getattr(pipeline, name)
        dtype = next(module.parameters()).dtype
        missing, unexpected = module.load_state_dict(part, strict=False)
        # Buffers such as position_ids are not saved by everyone; weights must all be there.
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            first = (missing or unexpected)[0]
            raise DataError(
                f"{path.name} does not fit the {name} of --model-config: "
                f"{len(missing)} missing and {len(unexpected)} unexpected tensors (e.g. {first})"
            )
        module.to(dtype)
    leftover = [k for k in state if k.split(".", 1)[0] not in COMPONENTS]
    if leftover:
        raise DataError(f"{path.name} has tensors of no known component (e.g. {leftover[0]})")


def save_single_file(pipeline, path: Path) -> None:
    """Write UNet, VAE and text encoder into one safetensors file with component prefixes."""
    state: dict[str, torch.Tensor] = {}
    for name in COMPONENTS:
        for key, tensor in getattr(pipeline, name).state_dict().items():
            state[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    tmp = path.with_name(f".{path.name}.partial")
    save_file(state, str(tmp), metadata={"format": "pt", "layout": "guardtune"})
    tmp.replace(path)  # atomic: a reader never sees half a checkpoint
