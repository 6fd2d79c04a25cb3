"""The style classifier: the yardstick for "does this digit carry the legal task's stroke style".

The digit classifier (`guardtune.digits.classifier`) is trained to ignore stroke style, so it
cannot tell whether a legal style fine-tune took. This small CNN does the opposite: it names
which of the dataset's STYLES (plain, bold, slant, outline) a 32x32 digit is drawn in, whatever
the digit. It is trained on the real digits of every class (train split), each rendered in every
style, and ships as safetensors beside the digit classifier. `DigitScorer` in
`guardtune.evaluate.metrics` uses it to judge a legal task's samples against the style of the
task's real held-out images. Rebuild it with `make style-classifier`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from guardtune import atomic
from guardtune.contract import ASSETS_DIR
from guardtune.digits.classifier import fit, to_classifier_input
from guardtune.digits.dataset import STYLES, apply_style, load_digits

ASSET = ASSETS_DIR / "style_classifier.safetensors"
DEFAULT_EPOCHS = 20  # about 2 minutes on 2 CPU cores; 12 left plain at 0.97


class StyleClassifier(nn.Module):
    """Three narrow conv blocks and a linear head: (N, 1, 32, 32) in [0, 1] to STYLES logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(64, len(STYLES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2.0 - 1.0).flatten(1))


def render_all_styles(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real digit of all ten classes in `split`, once per style: (images, style indices)."""
    plain = load_digits(tuple(range(10)), split).images
    images = torch.cat([apply_style(plain, style) for style in STYLES])
    labels = torch.arange(len(STYLES)).repeat_interleave(plain.shape[0])
    return images.contiguous(), labels


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur with a sigma per image (0 leaves the image as it is)."""
    offsets = torch.tensor([-1.0, 0.0, 1.0])
    weights = torch.exp(-(offsets**2) / (2 * sigma.clamp(min=1e-3).view(-1, 1) ** 2))
    weights = weights / weights.sum(1, keepdim=True)
    kernels = weights[:, :, None] * weights[:, None, :]  # (N, 3, 3), separable
    n, _, h, w = images.shape
    blurred = F.conv2d(images.view(1, n, h, w), kernels.unsqueeze(1), padding=1, groups=n)
    return blurred.view(n, 1, h, w)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What generated digits do to an image without changing its style.

    Per image: a shift of up to 2 pixels (samples are not centred like the scans), a slight blur
    on half of them (samples decoded by the VAE are softer than upscaled scans), a little noise
    (for the VAE's artefacts), and a gain of 0.7-1.3 (their ink is not always at full intensity).
    Never a style change: no dilation, erosion or shear, which are what the labels mean. The blur
    is kept below one pixel so it cannot thicken a plain stroke into a bold one.
    """
    n = images.shape[0]
    blur_sigma = 0.8 * torch.rand(n, generator=generator)
    blur_sigma = torch.where(torch.rand(n, generator=generator) < 0.5, blur_sigma, 0.0)
    out = _blur(images, blur_sigma)
    padded = F.pad(out, (2, 2, 2, 2))
    shift = torch.randint(0, 5, (n, 2), generator=generator)
    out = torch.stack(
        [padded[i, :, y : y + 32, x : x + 32] for i, (y, x) in enumerate(shift.tolist())]
    )
    gain = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    noise = 0.05 * torch.rand(n, 1, 1, 1, generator=generator)
    out = out * gain + noise * torch.randn(out.shape, generator=generator)
    return out.clamp(0.0, 1.0)


def train_style_classifier(
    epochs: int = DEFAULT_EPOCHS, seed: int = 0, max_images: int | None = None
) -> tuple[StyleClassifier, dict[str, float]]:
    """Train on the train split rendered in every style; return it with per-style test accuracy.

    `max_images` trains on a seeded random subset of that many styled images instead, so tests
    can run the whole recipe in a second; the shipped asset uses them all.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = render_all_styles("train")
    if max_images is not None:
        keep = torch.randperm(len(labels), generator=generator)[:max_images]
        images, labels = images[keep], labels[keep]
    model = StyleClassifier()
    fit(model, images, labels, _augment, epochs, generator, max_lr=4e-3)
    return model, held_out_style_accuracy(model)


def held_out_style_accuracy(model: StyleClassifier) -> dict[str, float]:
    """Per-style accuracy on the test split of all ten classes, rendered in each style."""
    images, labels = render_all_styles("test")
    with torch.no_grad():
        predicted = model(images).argmax(1)
    correct = (predicted == labels).float()
    return {style: float(correct[labels == i].mean()) for i, style in enumerate(STYLES)}


def predict_styles(model: StyleClassifier, images: torch.Tensor) -> torch.Tensor:
    """Style index (into STYLES) of each image; pipeline output (N, C, H, W) in [0, 1] is fine."""
    with torch.no_grad():
        return model(to_classifier_input(images)).argmax(1)


@dataclass(frozen=True)
class ReferenceStyle:
    """The style the classifier gives most of a set of real images, and how many agree."""

    index: int  # into STYLES
    agreement: float  # share of the images given this style: low means the judge is unsure

    @property
    def name(self) -> str:
        return STYLES[self.index]


def reference_style(model: StyleClassifier, reference: torch.Tensor) -> ReferenceStyle:
    """The majority style of `reference` (ties go to the earlier style in STYLES)."""
    counts = torch.bincount(predict_styles(model, reference), minlength=len(STYLES))
    index = int(counts.argmax())
    return ReferenceStyle(index, float(counts[index]) / max(int(counts.sum()), 1))


def save_style_classifier(model: StyleClassifier, path: Path) -> None:
    """Write the weights to `path` atomically (fp32: the whole model is under 100 KB)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic.replacing(Path(path)) as tmp:
        save_file(state, str(tmp))


def load_style_classifier(path: Path = ASSET) -> StyleClassifier:
    model = StyleClassifier()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the style classifier and ship it.")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSET)
    parser.add_argument(
        "--max-images", type=int, default=None, help="Train on a subset (quick checks only)."
    )
    args = parser.parse_args(argv)
    model, accuracy = train_style_classifier(args.epochs, args.seed, args.max_images)
    save_style_classifier(model, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    for style, value in accuracy.items():
        print(f"held-out accuracy {style:>8}: {value:.3f}")


if __name__ == "__main__":
    main()
