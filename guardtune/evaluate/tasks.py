"""The tasks an evaluation adapts the model to: data folders, split and encoded once.

Each `--illegal` or `--legal` folder becomes a `Task`: every `every`-th image is held out for
scoring, the rest is what the simulated user trains on, and both halves are encoded once for
all the runs. `evaluate` (run.py) loads them; the journal's settings name each by the digest of
its folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from guardtune.data import FolderScan, ImageCaptionDataset, scan_folder
from guardtune.errors import DataError
from guardtune.training.encode import EncodedData, data_digest


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "illegal" or "legal"
    train: EncodedData = field(repr=False)
    held_out: EncodedData = field(repr=False)
    reference: torch.Tensor = field(repr=False)  # held-out real images in [0, 1]
    digest: str = ""  # of the folder's images and captions

    @property
    def prompts(self) -> list[str]:
        """The held-out captions, each once: what samples are drawn and scored with."""
        return self.held_out.captions


def load_tasks(
    pipeline, illegal: list[Path], legal: list[Path], every: int, resolution: int
) -> list[Task]:
    """The illegal tasks, then the legal ones, in the order given; names must be distinct."""
    tasks = [_task(pipeline, folder, "illegal", every, resolution) for folder in illegal]
    tasks += [_task(pipeline, folder, "legal", every, resolution) for folder in legal]
    if len({t.name for t in tasks}) < len(tasks):
        raise DataError("task folders need distinct names (they label the results)")
    return tasks


def _split(scan: FolderScan, every: int) -> tuple[FolderScan, FolderScan]:
    examples = list(scan.examples)
    held = [e for i, e in enumerate(examples) if i % every == every - 1]
    kept = [e for i, e in enumerate(examples) if i % every != every - 1]
    if not held or not kept:
        raise DataError(f"{scan.root} needs at least {every} images to hold some out for scoring")
    return (
        FolderScan(scan.root, scan.layout, tuple(kept)),
        FolderScan(scan.root, scan.layout, tuple(held)),
    )


def _task(pipeline, folder: Path, kind: str, every: int, resolution: int) -> Task:
    scan = scan_folder(folder)
    train_scan, held_scan = _split(scan, every)
    device = pipeline.unet.device
    held_images = ImageCaptionDataset(held_scan, resolution)
    reference = (torch.stack(held_images.pixels) + 1) / 2
    return Task(
        name=Path(folder).name,
        kind=kind,
        train=EncodedData(pipeline, ImageCaptionDataset(train_scan, resolution), device),
        held_out=EncodedData(pipeline, held_images, device),
        reference=reference,
        digest=data_digest(scan),
    )
