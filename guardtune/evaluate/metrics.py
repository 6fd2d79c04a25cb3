"""Scoring a fine-tuned model: held-out denoising loss, and scorers for its samples.

Every scorer turns generated images (with the prompts that drew them) and the task's held-out
real images into numbers, of which `recognisability` (share of samples recognised as the
prompted concept) and `quality` (higher is better: recognised and like the real images) are the
ones the summary uses. Two scorers ship:
- `DigitScorer`, for the embedded digits domain: the bundled digit classifier decides the digit,
  the bundled style classifier (`guardtune.digits.style`) decides whether a sample carries the
  stroke style of the task's real held-out images, and a Frechet distance in the digit
  classifier's feature space stands in for FID. So a legal style task scores well only if the
  style was learned, not merely if the digits stayed recognisable.
- `ClipScorer`, for real Stable Diffusion models: a CLIP model from a local folder (never a hub
  download) does zero-shot recognition among the evaluated prompts, CLIP score and a Frechet
  distance in CLIP's image space.
Any object with `name` and `score(images, prompts, all_prompts, reference)` can take their place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from guardtune.errors import DataError
from guardtune.training.loss import pose, predict


class Scorer(Protocol):
    name: str

    def score(
        self,
        images: torch.Tensor,
        prompts: list[str],
        all_prompts: list[str],
        reference: torch.Tensor,
    ) -> dict[str, float]: ...


def frechet_distance(first: np.ndarray, second: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets, as FID defines it.

    tr sqrt(C1 C2) is taken as tr sqrt(C1^1/2 C2 C1^1/2), a symmetric PSD matrix, by eigenvalues:
    stable where, with fewer samples than features, both covariances are singular.
    """
    mu1, mu2 = first.mean(0), second.mean(0)
    cov1, cov2 = (
        np.atleast_2d(np.cov(first, rowvar=False)),
        np.atleast_2d(np.cov(second, rowvar=False)),
    )
    values, vectors = np.linalg.eigh(cov1)
    root1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ cov2 @ root1).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross)


@torch.no_grad()
def held_out_losses(unet, scheduler, latents: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Per-example denoising loss on held-out examples, at fixed noise and spread timesteps.

    Timesteps are spread evenly over the schedule (in example order) and the noise is seeded,
    so two models are compared on exactly the same denoising problems.
    """
    generator = torch.Generator().manual_seed(1234)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0, steps - 1, latents.shape[0]).long()
    noise = torch.randn(latents.shape, generator=generator)
    losses = []
    for start in range(0, latents.shape[0], 32):
        chunk = slice(start, start + 32)
        problem = pose(scheduler, latents[chunk], noise[chunk], timesteps[chunk])
        prediction = predict(unet, problem, states[chunk])
        losses.append((prediction.cpu() - problem.target).pow(2).mean(dim=(1, 2, 3)))
    return torch.cat(losses)


class DigitScorer:
    """The embedded domain's judge: the bundled digit classifier and style classifier.

    Metrics: `recognisability` (share of samples the digit classifier gives the prompted
    digit), `in_style` (share the style classifier gives the style it gives most of the real
    reference images), `quality` (share both recognised and in style), `frechet` (digit-feature
    Frechet distance to the reference), `reference_style` (that majority style as an index into
    `guardtune.digits.dataset.STYLES`, a float like every metric) and
    `style_agreement_reference` (share of reference images given it: near 1 when the judge is
    sure what style the task teaches).
    """

    name = "digits"

    def __init__(self) -> None:
        from guardtune.digits.classifier import load_classifier
        from guardtune.digits.style import load_style_classifier

        self.classifier = load_classifier()
        self.style_classifier = load_style_classifier()

    @staticmethod
    def digit_of(prompt: str) -> int:
        from guardtune.digits.dataset import NUMBER_WORDS

        words = set(prompt.lower().replace(",", " ").split())
        found = [d for d, word in enumerate(NUMBER_WORDS) if word in words]
        if len(found) != 1:
            raise DataError(f"the digits scorer needs prompts naming one digit, got {prompt!r}")
        return found[0]

    @torch.no_grad()
    def score(
        self,
        images: torch.Tensor,
        prompts: list[str],
        all_prompts: list[str],
        reference: torch.Tensor,
    ) -> dict[str, float]:
        from guardtune.digits.classifier import to_classifier_input
        from guardtune.digits.style import predict_styles, reference_style

        gray, real = to_classifier_input(images), to_classifier_input(reference)
        digits = torch.tensor([self.digit_of(p) for p in prompts])
        recognised = self.classifier(gray).argmax(1) == digits
        # In style: the style classifier, trained on real digits in every style, names the same
        # style for the sample as for most of the task's real images. The reference's style is
        # read from the images rather than taken from the task, so a folder of real images is
        # all a legal task needs. No ink-share check on top: slant and outline have about plain's
        # ink, so it cannot tell them apart; where it can (bold) the classifier already does; and
        # its 5th-95th percentile band fails a tenth of the real in-style images by construction
        # (and 7% of the base model's plain samples the classifier accepts).
        target = reference_style(self.style_classifier, real)
        in_style = predict_styles(self.style_classifier, gray) == target.index
        features = self.classifier.features(gray * 2.0 - 1.0).flatten(1).numpy()
        real_features = self.classifier.features(real * 2.0 - 1.0).flatten(1).numpy()
        return {
            "recognisability": float(recognised.float().mean()),
            "in_style": float(in_style.float().mean()),
            "quality": float((recognised & in_style).float().mean()),
            "frechet": frechet_distance(
                features.astype(np.float64), real_features.astype(np.float64)
            ),
            "reference_style": float(target.index),
            "style_agreement_reference": target.agreement,
        }


class ClipScorer:
    """Zero-shot recognition, CLIP score and a CLIP-space Frechet distance, from a local folder."""

    name = "clip"
    _MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation
    _STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, folder: Path) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        if not (Path(folder) / "config.json").is_file():
            raise DataError(f"{folder} is not a CLIP model folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot load CLIP from {folder}: {error}") from error

    @torch.no_grad()
    def _images(self, images: torch.Tensor) -> torch.Tensor:
        size = self.model.config.vision_config.image_size
        pixels = F.interpolate(
            images.float(), size=(size, size), mode="bicubic", antialias=True
        ).clamp(0, 1)
        mean = torch.tensor(self._MEAN).view(1, 3, 1, 1)
        std = torch.tensor(self._STD).view(1, 3, 1, 1)
        embedded = self.model.get_image_features(pixel_values=(pixels - mean) / std)
        return F.normalize(_as_tensor(embedded), dim=-1)

    @torch.no_grad()
    def _texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        embedded = self.model.get_text_features(**tokens)
        return F.normalize(_as_tensor(embedded), dim=-1)

    @torch.no_grad()
    def score(
        self,
        images: torch.Tensor,
        prompts: list[str],
        all_prompts: list[str],
        reference: torch.Tensor,
    ) -> dict[str, float]:
        candidates = sorted(set(all_prompts) | set(prompts))
        image_features, texts = self._images(images), self._texts(candidates)
        similarity = image_features @ texts.T
        own = torch.tensor([candidates.index(p) for p in prompts])
        recognised = similarity.argmax(1) == own
        clip_score = 100 * similarity[torch.arange(len(prompts)), own].clamp(min=0)
        real_features = self._images(reference)
        return {
            "recognisability": float(recognised.float().mean()),
            "quality": float(clip_score.mean() / 100),
            "clip_score": float(clip_score.mean()),
            "frechet": frechet_distance(
                image_features.double().numpy(), real_features.double().numpy()
            ),
        }


def _as_tensor(output) -> torch.Tensor:
    """transformers 5 may return a model output object where 4 returned the tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for attribute in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, attribute, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP output {type(output).__name__}")


def make_scorer(spec: str) -> Scorer | None:
    """'digits', 'clip:FOLDER', or 'loss' (held-out loss only: no sampling)."""
    if spec == "digits":
        return DigitScorer()
    if spec.startswith("clip:"):
        return ClipScorer(Path(spec.removeprefix("clip:")))
    if spec == "loss":
        return None
    raise DataError(f"unknown scorer {spec!r}; use digits, clip:FOLDER or loss")
