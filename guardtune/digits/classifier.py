"""The digit classifier: the project's yardstick for "is this generated digit recognisable".

A small CNN trained on the real digits of every class (train split, all stroke styles), shipped
as safetensors beside the embedded model. `recognition` turns generated images into the
per-class share judged correct, which the embedded build, `evaluate` and the benchmarks report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from guardtune.contract import ASSETS_DIR
from guardtune.digits.dataset import STYLES, apply_style, load_digits

ASSET = ASSETS_DIR / "digit_classifier.safetensors"


class DigitClassifier(nn.Module):
    """Three conv blocks and a linear head over (N, 1, 32, 32) images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2.0 - 1.0).flatten(1))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random style, shift of up to 2 pixels and contrast: generated digits vary in all three."""
    n = images.shape[0]
    style_index = torch.randint(len(STYLES), (n,), generator=generator)
    out = images.clone()
    for i, style in enumerate(STYLES):
        chosen = style_index == i
        if chosen.any():
            out[chosen] = apply_style(images[chosen], style)
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(2, 3))
    gain = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    return (out * gain).clamp(0.0, 1.0)


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    epochs: int,
    generator: torch.Generator,
    max_lr: float,
) -> None:
    """The yardsticks' training loop: AdamW under a one-cycle schedule, batches of 64 drawn
    in a seeded order, each augmented; leaves the model in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch_size = 64
    steps_per_epoch = -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=epochs * steps_per_epoch
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(augment(images[idx], generator)), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def train_classifier(epochs: int = 30, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on the train split of all ten classes; return it with its held-out accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = load_digits(tuple(range(10)), "train")
    model = DigitClassifier()
    fit(model, train.images, train.labels, _augment, epochs, generator, max_lr=3e-3)
    return model, held_out_accuracy(model)


def held_out_accuracy(model: DigitClassifier) -> float:
    """Accuracy on the test split of all ten classes (plain style)."""
    test = load_digits(tuple(range(10)), "test")
    with torch.no_grad():
        predicted = model(test.images).argmax(1)
    return float((predicted == test.labels).float().mean())


def save_classifier(model: DigitClassifier, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Path = ASSET) -> DigitClassifier:
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """Pipeline output (N, C, H, W) in [0, 1] to grayscale (N, 1, 32, 32)."""
    gray = images.float().mean(dim=1, keepdim=True)
    if gray.shape[-1] != 32 or gray.shape[-2] != 32:
        gray = F.interpolate(gray, size=(32, 32), mode="bilinear", antialias=True)
    return gray


@dataclass(frozen=True)
class Recognition:
    """Share of images the classifier assigns to the intended class, overall and per class."""

    mean: float
    per_class: dict[int, float]


def recognition(
    classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor
) -> Recognition:
    with torch.no_grad():
        predicted = classifier(to_classifier_input(images)).argmax(1)
    correct = (predicted == labels).float()
    per_class = {int(d): float(correct[labels == d].mean()) for d in labels.unique()}
    return Recognition(mean=float(correct.mean()), per_class=per_class)
