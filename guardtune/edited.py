"""An edited model: a copy of a diffusers folder whose UNet carries new values for some tensors.

`publish --method freezeasguard+uce` edits the base (UCE on the illegal prompts), learns the mask
on the edited model and signs a policy bound to it, so the publisher ships this folder. The copy
holds exactly what the resolver says the base loads (`guardtune.resolve`): model_index.json,
every component's configuration and tokenizer files byte for byte, every other component's
weight files byte for byte, and the UNet rewritten with the edited tensors in their stored
dtypes. Variants and anything else beside the base are left behind, and weights are written
under the plain (variant-free) names, so the copy loads one way only. Written atomically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from guardtune import atomic
from guardtune.errors import DataError
from guardtune.resolve import WEIGHT_STEMS, ModelSource, resolve_folder, resolve_model
from guardtune.tensorfile import SAFETENSORS_TO_TORCH, load_record


def write_edited(source: ModelSource, weights: dict[str, torch.Tensor], out: Path) -> ModelSource:
    """Copy the model `source` to `out` with UNet tensors replaced by `weights` (bare UNet
    names, any dtype: each is cast to the dtype the base stores it in)."""
    if source.kind == "single_file":
        raise DataError("an edited model is written as a folder; give the base as a folder")
    manifest = resolve_folder(source.path, source.variant, source.root)
    unet = manifest.components["unet"]
    stored = {r.name.removeprefix("unet."): r for r in unet.tensors}
    unknown = sorted(set(weights) - set(stored))
    if unknown:
        raise DataError(f"the edit names {unknown[0]}, which is not a UNet tensor of the base")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(stored[name].shape):
            raise DataError(f"the edit changes the shape of {name}")
    out = Path(out)
    check_free(out)
    with atomic.staged_dir(out) as staging:
        for config in [
            manifest.index,
            *(c for p in manifest.components.values() for c in p.configs),
        ]:
            target = staging / config.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(config.data)
        for name, part in manifest.components.items():
            if not part.weight_files:
                continue
            folder = staging / name
            folder.mkdir(parents=True, exist_ok=True)
            stem = WEIGHT_STEMS[part.library]
            if name == "unet":
                from safetensors.torch import save_file

                tensors = {
                    local: (
                        weights[local].detach().to("cpu", SAFETENSORS_TO_TORCH[record.dtype])
                        if local in weights
                        else load_record(record)
                    ).contiguous()
                    for local, record in stored.items()
                }
                save_file(tensors, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
                continue
            _copy_weights(part.weight_files, part.tensors, folder, stem, name)
    return resolve_model(str(out))


def check_free(out: Path) -> None:
    """Refuse to write an edited model over anything: `out` must be absent or an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty", hint="choose a new folder")


def _copy_weights(files, records, folder: Path, stem: str, component: str) -> None:
    """A component's weight files byte for byte, under plain names (with a fresh index if it
    is sharded: the base's index may name a variant's shards)."""
    if len(files) == 1:
        shutil.copyfile(Path(files[0]).resolve(), folder / f"{stem}.safetensors")
        return
    names = {}
    for number, path in enumerate(files, 1):
        shard = f"{stem}-{number:05d}-of-{len(files):05d}.safetensors"
        shutil.copyfile(Path(path).resolve(), folder / shard)
        names[Path(path)] = shard
    weight_map = {r.name.removeprefix(f"{component}."): names[Path(r.path)] for r in records}
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
