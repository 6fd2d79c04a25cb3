"""The main job on the embedded default (`make demo`, `guardtune demo`).

1. Sample every digit from the embedded model and score the samples with the digit classifier:
   the base digits 0-6 are drawn, the unseen 7 and 9 are not.
2. Export real 7s and 9s, and fine-tune the embedded model on them under its signed freeze policy
   (verified first; the frozen tensors stay bit-identical), with the measured savings report.
3. Sample 7 and 9 from the fine-tuned model and score them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guardtune.digits.classifier import DigitClassifier, load_classifier, recognition
from guardtune.digits.dataset import BASE_CLASSES, export_digits, prompt_for
from guardtune.generate import make_grid, sample, save_png
from guardtune.models import load_pipeline
from guardtune.training.config import TrainConfig
from guardtune.training.finetune import TrainResult, finetune

DEMO_CLASSES = (7, 9)


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
    finetune: TrainResult | None = None
    after: tuple[DemoRow, ...] = ()
    after_grid: Path | None = None


def _score(pipeline, classifier: DigitClassifier, digit: int, count: int, seed: int):
    images = sample(pipeline, prompt_for(digit), count, seed=seed)
    pixels = torch.stack([torch.from_numpy(np.array(i)) for i in images])
    pixels = pixels.permute(0, 3, 1, 2).float() / 255.0
    score = recognition(classifier, pixels, torch.full((len(images),), digit))
    return DemoRow(digit, prompt_for(digit), digit in BASE_CLASSES, score.mean), images


def run_demo(
    out: Path, samples_per_digit: int = 16, seed: int = 0, finetune_steps: int = 150
) -> DemoReport:
    out = Path(out)
    data = (
        export_digits(out / "data" / "digits-7-9", DEMO_CLASSES, "train", overwrite=True).out,
        export_digits(out / "data" / "bold-0-6", BASE_CLASSES, "train", "bold", True).out,
    )
    pipeline = load_pipeline()
    classifier = load_classifier()
    rows, grid_images = [], []
    for digit in range(10):
        row, images = _score(pipeline, classifier, digit, samples_per_digit, seed)
        rows.append(row)
        grid_images.extend(images[:8])
    grid = out / "samples.png"
    save_png(make_grid(grid_images, columns=8, scale=2), grid)
    if finetune_steps == 0:
        return DemoReport(tuple(rows), grid, data)

    # The end user's job: fine-tune on the unseen digits under the model's signed policy.
    run = out / "finetune"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    config = TrainConfig(steps=finetune_steps, batch_size=8, lr=1e-4, seed=seed)
    result = finetune(data[0], run, config=config)
    tuned = load_pipeline(str(run / "model"))
    after, after_images = [], []
    for digit in DEMO_CLASSES:
        row, images = _score(tuned, classifier, digit, samples_per_digit, seed)
        after.append(row)
        after_images.extend(images[:8])
    after_grid = out / "finetuned-samples.png"
    save_png(make_grid(after_images, columns=8, scale=2), after_grid)
    return DemoReport(tuple(rows), grid, data, result, tuple(after), after_grid)
