"""Cost of FreezeAsGuard's mask learning vs plain fine-tuning, in time and peak memory.

One mask-update cycle (its simulated-user steps plus the mask step) against the same number of
plain fine-tune steps (fused AdamW) on the same UNet and batch, each in its own process, on the
embedded model and on an SD v1.5-size UNet at small latents. Targets: time at most 1.15x, peak
memory at most 1.3x. Both sides run with the CPU allocator setting guardtune uses
(THP_MEM_ALLOC_ENABLE=1, see guardtune/runtime.py); `--small-pages` runs both without it.
`--granularity channel` times the learner with a mask entry per output row instead of per tensor.

    .venv/bin/python benchmarks/learner.py [--cycles 6] [--skip-sd] [--granularity channel]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from statistics import median

from rich.console import Console
from rich.table import Table
from sd15 import SD15_UNET

USER_STEPS = 4


class _Data:
    """Synthetic cached latents and text embeddings, the shape EncodedData hands out."""

    def __init__(self, channels: int, size: int, tokens: int, hidden: int) -> None:
        self.shape = (channels, size, size)
        self.states = (tokens, hidden)

    def batch(self, batch_size: int, generator):
        import torch

        latents = torch.randn(batch_size, *self.shape, generator=generator)
        return latents, torch.randn(batch_size, *self.states, generator=generator)


def child(kind: str, model: str, cycles: int, granularity: str = "tensor") -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from guardtune.learn.freezeasguard import LearnerConfig, learn_mask
    from guardtune.training.loss import diffusion_loss
    from guardtune.training.memory import RssSampler

    torch.manual_seed(0)
    if model == "digits":
        from guardtune.models import load_pipeline

        pipeline = load_pipeline("digits", device=torch.device("cpu"), dtype=torch.float32)
        unet, batch, data = pipeline.unet, 8, _Data(4, 8, 32, 64)
    else:
        unet, batch, data = UNet2DConditionModel(**SD15_UNET), 1, _Data(4, 16, 77, 768)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)  # fmt: skip
    unet.train()
    times: list[float] = []
    if kind == "plain":
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=True)
        with RssSampler() as sampler:
            for cycle in range(cycles + 1):
                began = time.perf_counter()
                for step in range(USER_STEPS + 1):  # as many forward/backward passes as a cycle
                    generator = torch.Generator().manual_seed(cycle * 10 + step)
                    latents, states = data.batch(2 * batch, generator)
                    loss = diffusion_loss(unet, scheduler, latents, states, generator, None)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                times.append(time.perf_counter() - began)
    else:
        config = LearnerConfig(relearn_steps=1, rounds=cycles + 1, user_steps=USER_STEPS,
                               batch_size=batch, granularity=granularity)  # fmt: skip
        stamps: list[float] = []

        def report(advance: int = 1, **fields: float) -> None:
            if "share" in fields:  # a mask round ended
                stamps.append(time.perf_counter())

        with RssSampler() as sampler:
            stamps.append(time.perf_counter())
            learn_mask(unet, scheduler, data, data, config, report)
        times = [b - a for a, b in itertools.pairwise(stamps[1:])]  # whole cycles only
    return {"cycle_s": median(times[1:] or times), "peak_bytes": sampler.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--skip-sd", action="store_true")
    parser.add_argument("--small-pages", action="store_true", help="4 KiB pages on both sides")
    parser.add_argument("--granularity", choices=("tensor", "channel"), default="tensor",
                        help="a mask entry per tensor or per output row")  # fmt: skip
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.cycles, args.granularity)))
        return
    table = Table(title=f"One mask-update cycle ({USER_STEPS} user steps + 1 mask step, a mask "
                  f"per {args.granularity}) vs as many plain fine-tune steps")  # fmt: skip
    for column in ("model", "plain s", "learner s", "time ratio", "plain GiB", "learner GiB",
                   "memory ratio"):  # fmt: skip
        table.add_column(column, justify="right")
    for model in ("digits",) if args.skip_sd else ("digits", "sd15"):
        result = {}
        for kind in ("plain", "learner"):
            command = [
                sys.executable,
                __file__,
                "--child",
                kind,
                model,
                "--cycles",
                str(args.cycles),
                "--granularity",
                args.granularity,
            ]
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0" if args.small_pages else "1"}
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            result[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        plain, learner = result["plain"], result["learner"]
        table.add_row(
            model, f"{plain['cycle_s']:.2f}", f"{learner['cycle_s']:.2f}",
            f"{learner['cycle_s'] / plain['cycle_s']:.2f}x", f"{plain['peak_bytes'] / 2**30:.2f}",
            f"{learner['peak_bytes'] / 2**30:.2f}",
            f"{learner['peak_bytes'] / plain['peak_bytes']:.2f}x",
        )  # fmt: skip
    Console().print(table)
    pages = "4 KiB pages" if args.small_pages else "huge pages (THP_MEM_ALLOC_ENABLE=1)"
    Console().print(f"targets: time <= 1.15x, memory <= 1.3x; both sides on {pages}")


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
