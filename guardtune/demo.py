"""The main job on the embedded default (`make demo`, `guardtune demo`).

Exports the data a user would fine-tune on (unseen digits 7 and 9, and a bold-stroke set of the
known digits), samples every digit from the embedded model, and scores the samples with the
digit classifier: the base digits 0-6 are drawn, the unseen ones are not, which is exactly the
gap a fine-tune closes and a freeze policy keeps open for the illegal classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guardtune.classifier import load_classifier, recognition
from guardtune.data import export_digits
from guardtune.digits import BASE_CLASSES, prompt_for
from guardtune.generate import DEFAULT_STEPS, make_grid, sample, save_png
from guardtune.models import load_pipeline


@dataclass(frozen=True)
class DemoRow:
    digit: int
    prompt: str
    pretrained: bool
    recognised: float


@dataclass(frozen=True)
class DemoReport:
    rows: tuple[DemoRow, ...]
    grid: Path
    data: tuple[Path, ...]


def run_demo(out: Path, samples_per_digit: int = 16, seed: int = 0) -> DemoReport:
    out = Path(out)
    data = (
        export_digits(out / "data" / "digits-7-9", (7, 9), "train", overwrite=True).out,
        export_digits(out / "data" / "bold-0-6", BASE_CLASSES, "train", "bold", True).out,
    )
    pipeline = load_pipeline()
    classifier = load_classifier()
    rows, grid_images = [], []
    for digit in range(10):
        images = sample(pipeline, prompt_for(digit), samples_per_digit, DEFAULT_STEPS, seed)
        pixels = torch.stack([torch.from_numpy(np.array(i)) for i in images])
        pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
        score = recognition(classifier, pixels, torch.full((len(images),), digit))
        rows.append(DemoRow(digit, prompt_for(digit), digit in BASE_CLASSES, score.mean))
        grid_images.extend(images[:8])
    grid = out / "samples.png"
    save_png(make_grid(grid_images, columns=8, scale=2), grid)
    return DemoReport(tuple(rows), grid, data)
