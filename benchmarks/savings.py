"""What freezing saves on an SD v1.5-size UNet: measured vs the analytic limit.

For freeze shares 0, 0.3, 0.5 and 0.7 (of parameters; whole tensors drawn at random with a fixed
seed), each configuration runs in its own process: a randomly initialised UNet with the public
SD v1.5 config (859,520,964 parameters), fp32 AdamW (fused), 32x32 latents, batch 1, a few
steps. Peak memory is the resident set sampled while training (CPU) or the CUDA allocator peak.
The analytic limit of the saving is frozen parameters x (4 bytes of gradient + 8 bytes of AdamW
state); target: measured saving at least 90% of it.

    .venv/bin/python benchmarks/savings.py [--steps 3] [--shares 0,0.3,0.5,0.7]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table
from sd15 import SD15_UNET

BYTES_PER_FROZEN_PARAM = 4 + 8  # fp32 gradient + two fp32 AdamW moments


def probe(share: float, steps: int) -> dict:
    """Runs in a child process: build, freeze `share` of the parameters, train, measure."""
    from statistics import median

    import torch
    from diffusers import UNet2DConditionModel

    from guardtune.training.memory import RssSampler

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    unet = UNet2DConditionModel(**SD15_UNET).to(device)
    parameters = dict(unet.named_parameters())
    total = sum(p.numel() for p in parameters.values())
    order = torch.randperm(len(parameters), generator=torch.Generator().manual_seed(1)).tolist()
    names = list(parameters)
    frozen, frozen_params = set(), 0
    for index in order:
        if frozen_params >= share * total:
            break
        frozen.add(names[index])
        frozen_params += parameters[names[index]].numel()
    for name, parameter in parameters.items():
        parameter.requires_grad_(name not in frozen)
    trainable = [p for p in parameters.values() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    latents = torch.randn(1, 4, 32, 32, device=device)
    states = torch.randn(1, 77, 768, device=device)
    timestep = torch.tensor([500], device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with RssSampler() as sampler:
        for _ in range(steps):
            began = time.perf_counter()
            unet(latents, timestep, states).sample.pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak
    return {"share": share, "frozen_params": frozen_params, "total_params": total,
            "peak_bytes": int(peak), "step_s": median(times[1:] or times)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shares", default="0,0.3,0.5,0.7")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(probe(args.child, args.steps)))
        return
    results = []
    for share in (float(s) for s in args.shares.split(",")):
        command = [sys.executable, __file__, "--child", str(share), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = next(r for r in results if r["share"] == 0)
    table = Table(title="Freezing an SD v1.5-size UNet (batch 1, 32x32 latents, fp32 AdamW)")
    for column in ("share", "frozen params", "peak GiB", "step s", "measured saving GiB",
                   "analytic limit GiB", "measured / analytic"):  # fmt: skip
        table.add_column(column, justify="right")
    for r in results:
        measured = base["peak_bytes"] - r["peak_bytes"]
        analytic = r["frozen_params"] * BYTES_PER_FROZEN_PARAM
        ratio = f"{measured / analytic:.2f}" if analytic else "-"
        gib = 2**30
        table.add_row(
            f"{r['share']:.1f}", f"{r['frozen_params']:,}", f"{r['peak_bytes'] / gib:.2f}",
            f"{r['step_s']:.2f}", f"{measured / gib:.2f}", f"{analytic / gib:.2f}", ratio,
        )  # fmt: skip
    Console().print(table)
    Console().print("target: measured / analytic >= 0.90")


if __name__ == "__main__":
    main()
