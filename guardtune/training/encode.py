"""Encoding training data once: VAE latents and text embeddings, cached for every step.

The VAE and the text encoders are never trained here, so every recipe (fine-tune, mask learner,
evaluate's simulated user and defences) encodes its data up front and draws batches from the
cache. `data_digest` names a data folder's content for run identities and journals.
"""

from __future__ import annotations

import hashlib
import itertools

import torch

from guardtune.data import FolderScan, ImageCaptionDataset
from guardtune.training.conditioning import encode_captions
from guardtune.training.progress import track


def data_digest(scan: FolderScan) -> str:
    """sha256 over every example's caption and image bytes, in order."""
    digest = hashlib.sha256()
    for example in scan.examples:
        digest.update(example.caption.encode() + b"\x00")
        digest.update(hashlib.sha256(example.image_path.read_bytes()).digest())
    return digest.hexdigest()


class EncodedData:
    """VAE latents (mean, std) per example and text conditioning per caption, computed once
    (`guardtune.training.conditioning` says what a row holds)."""

    def __init__(
        self, pipeline, dataset: ImageCaptionDataset, device: torch.device,
        show_progress: bool = False,
    ) -> None:  # fmt: skip
        vae = pipeline.vae
        self.scaling = float(vae.config.scaling_factor)
        means, stds = [], []
        starts = range(0, len(dataset), 32)
        with torch.no_grad(), track("encode", len(starts) + 1, device, show_progress) as report:
            for start in starts:
                pixels = torch.stack(dataset.pixels[start : start + 32]).to(device, vae.dtype)
                posterior = vae.encode(pixels).latent_dist
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
                report()
            captions = sorted(set(dataset.captions))
            resolution = int(dataset.pixels[0].shape[-1]) if len(dataset) else 0
            embeddings = encode_captions(pipeline, captions, device, resolution)
            report()
        # The VAE hands back channels-last latents. oneDNN's CPU convolution backward in torch
        # 2.13 segfaults on channels-last inputs once some (not all) conv weights are frozen, so
        # every latent leaves here in the default memory format.
        self.latent_mean = torch.cat(means).contiguous()
        self.latent_std = torch.cat(stds).contiguous()
        row = {c: i for i, c in enumerate(captions)}
        self.caption_row = torch.tensor([row[c] for c in dataset.captions])
        self.captions = captions  # embeddings[i] encodes captions[i]
        self.embeddings = embeddings

    @classmethod
    def concat(cls, parts: list[EncodedData]) -> EncodedData:
        """One set over several encoded with the same model (e.g. all illegal classes)."""
        joined = cls.__new__(cls)
        joined.scaling = parts[0].scaling
        joined.latent_mean = torch.cat([p.latent_mean for p in parts])
        joined.latent_std = torch.cat([p.latent_std for p in parts])
        offsets = list(itertools.accumulate([0] + [p.embeddings.shape[0] for p in parts[:-1]]))
        rows = [p.caption_row + o for p, o in zip(parts, offsets, strict=True)]
        joined.caption_row = torch.cat(rows)
        joined.embeddings = torch.cat([p.embeddings for p in parts])
        joined.captions = [c for p in parts for c in p.captions]
        return joined

    def __len__(self) -> int:
        return int(self.latent_mean.shape[0])

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self), (size,), generator=generator)
        noise = torch.randn(self.latent_mean[idx].shape, generator=generator)
        latents = (self.latent_mean[idx] + self.latent_std[idx] * noise) * self.scaling
        return latents, self.embeddings[self.caption_row[idx]]
