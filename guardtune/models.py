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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from guardtune.contract import COMPONENTS, LDM_UNET_PREFIX, default_device, default_dtype
from guardtune.errors import DataError
from guardtune.ldm import bound_names
from guardtune.resolve import (
    EMBEDDED,
    TOKENIZERS,
    ComponentManifest,
    ModelSource,
    resolve_folder,
    resolve_model,
)
from guardtune.tensorfile import TensorRecord, read_header
from guardtune.trust.fingerprint import (
    ModelBinding,
    compare_binding,
    fingerprint_of,
    model_tensors,
    read_and_hash,
)


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
    expected: ModelBinding | None = None,
):  # -> StableDiffusionPipeline (diffusers is imported lazily: it costs ~10 s)
    """Load a Stable-Diffusion-style pipeline fully offline, ready on `device` in `dtype`.

    A folder is loaded from its manifest (`guardtune.resolve`): each tensor is copied out of
    its file and hashed as it is, each configuration file is parsed from the bytes that were
    hashed, and with `expected` (what a verified policy binds) the pipeline is handed out only
    if those digests match, so what was verified is what loads.
    """
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
            pipeline = load_folder(source, dtype, expected)
        elif any(k.startswith(LDM_UNET_PREFIX) for k in checkpoint_keys(source.path)):
            pipeline = _load_original(source, dtype, expected)
        else:
            records = model_tensors(source)
            state = _read_bound(records, expected)
            pipeline = StableDiffusionPipeline.from_pretrained(source.config_dir, **options)
            _load_guardtune_single_file(pipeline, source.path, state)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot load model {source.label}: {message}") from error
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def encoders(pipeline) -> tuple[torch.nn.Module, ...]:
    """The modules around the UNet that training never changes: the VAE and the text encoders."""
    names = ("vae", "text_encoder", "text_encoder_2")
    return tuple(m for m in (getattr(pipeline, n, None) for n in names) if m is not None)


def load_folder(source: ModelSource, dtype: torch.dtype, expected: ModelBinding | None = None):
    """A pipeline built from exactly the bytes its manifest names, hashed as they are read."""
    import diffusers

    manifest = resolve_folder(source.path, source.variant, source.root)
    parts = manifest.components
    modules, fingerprints = {}, {}
    for name in manifest.weighted:
        modules[name], fingerprints[name] = _build_model(parts[name], source.path / name, dtype)
    if expected is not None:
        compare_binding(expected, fingerprints, manifest.config_digests())
    for name in TOKENIZERS:
        if name in parts:
            modules[name] = _tokenizer(parts[name], source.path / name)
    scheduler = parts["scheduler"]
    scheduler_class = getattr(diffusers, scheduler.class_name, None)
    if scheduler_class is None:
        raise DataError(f"{source.label}: unknown scheduler class {scheduler.class_name}")
    modules["scheduler"] = scheduler_class.from_config(scheduler.config("scheduler_config.json"))
    if manifest.pipeline_class == "StableDiffusionXLPipeline":
        index = json.loads(manifest.index.data)
        return diffusers.StableDiffusionXLPipeline(
            **modules,
            # model_index.json carries this pipeline setting; from_pretrained would pass it on.
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            add_watermarker=False,  # an optional package that changes every image it touches
        )
    return diffusers.StableDiffusionPipeline(
        **modules, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _build_model(part: ComponentManifest, folder: Path, dtype: torch.dtype):
    """The component's module, its weights assigned from the copies `read_and_hash` made."""
    from accelerate import init_empty_weights

    library = __import__(part.library)
    model_class = getattr(library, part.class_name)
    config = part.config("config.json")
    # Parameters start on the meta device (no memory, no random init); buffers are real.
    with init_empty_weights():
        if part.library == "diffusers":
            module = model_class.from_config(config)
        else:
            module = model_class(model_class.config_class.from_dict(config))
    tensors, digests = read_and_hash(part.tensors)
    fingerprint = fingerprint_of(digests)
    prefix = f"{part.name}."
    state = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
    expected = module.state_dict().keys()
    # transformers saved CLIP text models under `text_model.` before 5.0, and `position_ids`
    # as a buffer; today's classes load either spelling, as transformers itself does.
    if not any(k.startswith("text_model.") for k in expected):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise DataError(
            f"the {part.name} weights do not fit its config.json: {len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors (e.g. {first})"
        )
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    # What from_pretrained records, so a saved copy's configs say what was loaded.
    if part.library == "diffusers":
        module.register_to_config(_name_or_path=str(folder))
    else:
        module.config.dtype = dtype
        module.config._name_or_path = str(folder)
    return module.eval(), fingerprint


def _tokenizer(part: ComponentManifest, folder: Path):
    """The tokenizer, loaded from the bytes the manifest read (and hashed): transformers reads
    files by name, so they are written to a private folder first, and nothing it reads can
    have changed in the model folder since."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="guardtune-tokenizer-") as private:
        for config in part.configs:
            path = Path(private) / config.name.removeprefix(f"{part.name}/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(config.data)
        tokenizer = CLIPTokenizer.from_pretrained(private, local_files_only=True)
    tokenizer.name_or_path = str(folder)
    return tokenizer


def _read_bound(
    components: dict[str, list[TensorRecord]], expected: ModelBinding | None
) -> dict[str, torch.Tensor]:
    """Every tensor of `components`, copied out of its file and hashed; with `expected`, handed
    out only if the digests match (a single file has no configs of its own to bind)."""
    state: dict[str, torch.Tensor] = {}
    fingerprints = {}
    for component, records in components.items():
        tensors, digests = read_and_hash(records)
        fingerprints[component] = fingerprint_of(digests)
        state |= tensors
    if expected is not None:
        compare_binding(expected, fingerprints, None)
    return state


def _load_original(source: ModelSource, dtype: torch.dtype, expected: ModelBinding | None):
    """An original (LDM) checkpoint, converted by diffusers from the hashed copies of its
    tensors; configs, tokenizer and scheduler come from `--model-config`."""
    import diffusers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    assert source.config_dir is not None  # resolve_model requires it for a single file
    components, in_file = bound_names(source.path, source.config_dir)
    checkpoint = {in_file[n]: t for n, t in _read_bound(components, expected).items()}
    config = str(source.config_dir)
    options = dict(config=config, torch_dtype=dtype, local_files_only=True)
    unet = diffusers.UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **options)
    vae = diffusers.AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **options)
    text_encoder = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint=checkpoint, config=config, subfolder="text_encoder",
        torch_dtype=dtype, local_files_only=True,
    )  # fmt: skip
    scheduler = json.loads((source.config_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, str(scheduler.get("_class_name")), None)
    if scheduler_class is None:
        raise DataError(f"{config}: unknown scheduler class {scheduler.get('_class_name')}")
    return diffusers.StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(source.config_dir / "tokenizer",
                                                local_files_only=True),
        scheduler=scheduler_class.from_config(scheduler), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _load_guardtune_single_file(pipeline, path: Path, state: dict[str, torch.Tensor]) -> None:
    """Load `unet.*`, `vae.*`, `text_encoder.*` tensors into the pipeline's components,
    strictly; any other tensor in the file is refused."""
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
    leftover = [r.name for r in read_header(path) if r.name.split(".", 1)[0] not in COMPONENTS]
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
