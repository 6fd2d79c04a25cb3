"""The embedded dataset: scikit-learn's handwritten digits as 32x32 text-to-image pairs.

Owns everything that turns the 1797 real 8x8 scans into training examples: upscaling, the
deterministic train/test split, the stroke styles used as "legal" adaptations, the prompts, and
the export to an ordinary image folder (`guardtune data digits`). Called by the embedded-model
build, the digit classifier, and the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from guardtune import atomic
from guardtune.errors import DataError

IMAGE_SIZE = 32
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BASE_CLASSES = (0, 1, 2, 3, 4, 5, 6)
STYLES = ("plain", "bold", "slant", "outline")
SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
_SPLIT_SEED = 20261123


def prompt_for(digit: int) -> str:
    """The caption the embedded model was trained with, e.g. 'a handwritten digit seven'."""
    return f"a handwritten digit {NUMBER_WORDS[digit]}"


def parse_classes(text: str) -> tuple[int, ...]:
    """Parse '7,9' or '0-6' (or a mix) into sorted unique digits; ValueError on anything else."""
    found: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            low, high = (int(x) for x in part.split("-", 1))
            found.update(range(low, high + 1))
        else:
            found.add(int(part))
    if not found or min(found) < 0 or max(found) > 9:
        raise ValueError(f"classes must be digits 0-9, got {text!r}")
    return tuple(sorted(found))


@dataclass(frozen=True)
class DigitSet:
    """Images in [0, 1] (N, 1, 32, 32), ink bright on dark, their labels and source rows."""

    images: torch.Tensor
    labels: torch.Tensor
    source_index: torch.Tensor  # row of each image in scikit-learn's 1797 digits

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def _split_mask(labels: np.ndarray) -> np.ndarray:
    """True for test examples: a fixed TEST_FRACTION of every class, never seen in training."""
    rng = np.random.RandomState(_SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        chosen = rng.permutation(idx)[: round(len(idx) * TEST_FRACTION)]
        is_test[chosen] = True
    return is_test


def upscale(images_8x8: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) scans to (N, 1, 32, 32): bicubic to 28x28 plus a 2-pixel margin, like MNIST."""
    x = images_8x8.unsqueeze(1)
    x = F.interpolate(x, size=(IMAGE_SIZE - 4, IMAGE_SIZE - 4), mode="bicubic", align_corners=False)
    return F.pad(x.clamp(0.0, 1.0), (2, 2, 2, 2))


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """Restyle (N, 1, H, W) digits in [0, 1]: the kinds of change a legal fine-tune teaches."""
    if style == "plain":
        return images
    if style == "bold":  # 3x3 grey dilation thickens every stroke by one pixel each side
        return F.max_pool2d(images, kernel_size=3, stride=1, padding=1)
    if style == "outline":  # dilation minus erosion keeps only the stroke borders
        dilated = F.max_pool2d(images, kernel_size=3, stride=1, padding=1)
        eroded = -F.max_pool2d(-images, kernel_size=3, stride=1, padding=1)
        return (dilated - eroded).clamp(0.0, 1.0)
    if style == "slant":  # shear to the right, as in cursive handwriting
        n = images.shape[0]
        theta = torch.tensor([[1.0, 0.35, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")


def load_digits(
    classes: tuple[int, ...] = BASE_CLASSES, split: str = "train", style: str = "plain"
) -> DigitSet:
    """The real digits of `classes` from one split, upscaled to 32x32 and restyled."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    images, labels = _raw_digits()
    keep = np.isin(labels, classes)
    if split != "all":
        is_test = _split_mask(labels)
        keep &= is_test if split == "test" else ~is_test
    x = upscale(torch.from_numpy(images[keep]))
    rows = torch.from_numpy(np.flatnonzero(keep))
    return DigitSet(apply_style(x, style).contiguous(), torch.from_numpy(labels[keep]), rows)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) in [0, 1] to (N, H, W) uint8 for PNG files."""
    return (images[:, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


@dataclass(frozen=True)
class ExportReport:
    out: Path
    classes: tuple[int, ...]
    split: str
    style: str
    images: int
    per_class: dict[int, int]


def export_digits(
    out: Path,
    classes: tuple[int, ...],
    split: str = "train",
    style: str = "plain",
    overwrite: bool = False,
) -> ExportReport:
    """Write real digits as PNG files plus metadata.jsonl, atomically, into `out`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise DataError(f"{out} already exists and is not empty", hint="pass --overwrite")
    try:
        digits = load_digits(classes, split, style)
    except ValueError as error:
        raise DataError(str(error)) from error
    pixels = to_uint8(digits.images)
    records = []
    counters: dict[int, int] = {}
    with atomic.staged_dir(out) as staging:
        rows = zip(pixels, digits.labels.tolist(), digits.source_index.tolist(), strict=True)
        for array, label, source_index in rows:
            index = counters.get(label, 0)
            counters[label] = index + 1
            name = f"{label}_{split}_{index:04d}.png"
            Image.fromarray(array).save(staging / name)
            records.append(
                {
                    "file_name": name,
                    "text": prompt_for(label),
                    "label": label,
                    "source_index": source_index,  # row in sklearn's digits, to audit splits
                }
            )
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        (staging / "metadata.jsonl").write_text(lines, encoding="utf-8")
    return ExportReport(out, classes, split, style, len(records), dict(sorted(counters.items())))
