"""guardtune's fine-tune step vs a plain diffusers-style training loop, nothing frozen.

Both run in their own process on the same model (the embedded `digits` model by default),
the same data and batch size, with fp32 AdamW: the plain loop is what diffusers'
train_text_to_image.py does per step (VAE encode, text encode, noise, UNet, backward, step);
guardtune's recipe runs with `--no-policy`. Prints the median step time and peak memory (RSS
sampled while training) of each, and their ratios (target: guardtune at most 1.05x).

    .venv/bin/python benchmarks/overhead.py [--steps 40] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def plain_loop(data: Path, steps: int, batch_size: int) -> dict:
    from statistics import median

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from guardtune.data import ImageCaptionDataset, scan_folder
    from guardtune.models import load_pipeline
    from guardtune.training.memory import RssSampler

    torch.manual_seed(0)
    pipeline = load_pipeline("digits", device=torch.device("cpu"), dtype=torch.float32)
    unet, vae, text_encoder, tokenizer = (pipeline.unet, pipeline.vae, pipeline.text_encoder,
                                          pipeline.tokenizer)  # fmt: skip
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    dataset = ImageCaptionDataset(scan_folder(data), 32)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2, fused=True)
    times = []
    with RssSampler() as sampler:
        for _ in range(steps):
            began = time.perf_counter()
            idx = torch.randint(len(dataset), (batch_size,)).tolist()
            pixels = torch.stack([dataset[i][0] for i in idx])
            captions = [dataset[i][1] for i in idx]
            ids = tokenizer(
                captions, padding="max_length", truncation=True,
                max_length=tokenizer.model_max_length, return_tensors="pt",
            ).input_ids  # fmt: skip
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                states = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (batch_size,))
            noisy = scheduler.add_noise(latents, noise, timesteps)
            loss = F.mse_loss(unet(noisy, timesteps, states).sample.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - began)
    return {"step_s": median(times[2:]), "peak_bytes": sampler.peak}


def guardtune_loop(data: Path, steps: int, batch_size: int, out: Path) -> dict:
    from guardtune.training.config import TrainConfig
    from guardtune.training.finetune import finetune
    from guardtune.training.memory import RssSampler

    config = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-5)
    with RssSampler() as sampler:
        # Both sides train every tensor: the embedded model's policy is set aside on purpose.
        result = finetune(data, out, no_policy=True, ignore_shipped_policy=True, config=config,
                          compare=False, show_progress=False)  # fmt: skip
    return {"step_s": result.step_time_s, "peak_bytes": sampler.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "plain":
        print(json.dumps(plain_loop(args.data, args.steps, args.batch_size)))
        return
    if args.child == "guardtune":
        with tempfile.TemporaryDirectory() as folder:
            print(
                json.dumps(
                    guardtune_loop(args.data, args.steps, args.batch_size, Path(folder) / "o")
                )
            )
        return
    from guardtune.digits.dataset import export_digits

    with tempfile.TemporaryDirectory() as folder:
        data = export_digits(Path(folder) / "data", (7, 9), "train").out
        results = {}
        for name in ("plain", "guardtune"):
            sizes = ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
            command = [sys.executable, __file__, "--child", name, "--data", str(data), *sizes]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    table = Table(title=f"Unfrozen fine-tune step, embedded model, batch {args.batch_size}")
    for column in ("loop", "median step ms", "peak RSS MiB"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['step_s'] * 1000:.1f}", f"{r['peak_bytes'] / 2**20:.0f}")
    console = Console()
    console.print(table)
    time_ratio = results["guardtune"]["step_s"] / results["plain"]["step_s"]
    memory_ratio = results["guardtune"]["peak_bytes"] / results["plain"]["peak_bytes"]
    console.print(
        f"guardtune / plain: step time {time_ratio:.2f}x, peak memory {memory_ratio:.2f}x "
        "(target <= 1.05x)"
    )


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
