"""Peak memory of a fine-tune on 10,000 images vs 100 images of the same size.

The encodings of the data go to disk in batches and are memory-mapped (`training/encode.py`),
so a fine-tune's memory should not grow with the data. Each run is `guardtune finetune` on the
embedded model under its policy, in its own process (the same steps and batch), on a folder of
distinct 32x32 images, each with its own caption (so text embeddings grow with the data too),
with a fresh encoding cache; the peak resident set of that process is compared. Target: the
large set at most 1.1x the small one.

    .venv/bin/python benchmarks/data_memory.py [--large 10000] [--small 100] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` distinct 32x32 digit images (sklearn's digits, shifted and noised), captioned."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        k = i % len(digits.images)
        small = (digits.images[k] * 16).astype(np.uint8)
        image = np.kron(small, np.ones((4, 4), np.uint8))
        image = np.roll(image, rng.integers(-2, 3, 2), axis=(0, 1))
        noisy = np.clip(image.astype(int) + rng.integers(-12, 13, image.shape), 0, 255)
        rgb = np.repeat(noisy.astype(np.uint8)[:, :, None], 3, axis=2)
        Image.fromarray(rgb).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"a photo of the digit {digits.target[k]}, no. {i}")
    return folder


def run(data: Path, out: Path, cache: Path, steps: int, batch_size: int) -> dict:
    command = [sys.executable, "-m", "guardtune.cli", "finetune", str(data),
               "--out", str(out), "--steps", str(steps), "--batch-size", str(batch_size),
               "--no-compare", "--cache-dir", str(cache),
               "--json", str(out / "result.json")]  # fmt: skip
    began = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": "."}
    )
    if done.returncode != 0:
        raise SystemExit(f"finetune failed: {done.stderr.strip().splitlines()[-1]}")
    result = json.loads((out / "result.json").read_text())
    return {"peak": result["peak_memory_bytes"], "seconds": time.perf_counter() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        for count in (args.small, args.large):
            data = make_images(root / f"data-{count}", count)
            measured = run(data, root / f"run-{count}", root / f"cache-{count}", args.steps,
                           args.batch_size)  # fmt: skip
            rows.append((count, measured))
    table = Table(title=f"Fine-tune peak memory ({args.steps} steps, batch {args.batch_size})")
    for column in ("images", "peak RSS (MiB)", "seconds"):
        table.add_column(column, justify="right")
    for count, measured in rows:
        table.add_row(f"{count:,}", f"{measured['peak'] / 2**20:.0f}", f"{measured['seconds']:.0f}")
    console = Console()
    console.print(table)
    ratio = rows[1][1]["peak"] / rows[0][1]["peak"]
    console.print(f"{args.large:,} vs {args.small:,} images: {ratio:.3f}x peak memory "
                  "(target: at most 1.1x)")  # fmt: skip


if __name__ == "__main__":
    main()
