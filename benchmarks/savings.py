"""What freezing saves on an SD v1.5-size UNet, in step time and peak memory, against no freezing.

For freeze shares 0.3, 0.5 and 0.7 of the parameters, chosen two ways, and for no freezing
(share 0): `random` draws whole tensors in a seeded random order (evaluate's random-p mask, where
a FreezeAsGuard policy's tensors also lie: all over the network); `front` takes whole tensors in
the order data flows through the UNet (conv_in, time embedding, down blocks, mid, up blocks,
out), so everything upstream of some point is frozen and backward stops there. Both fill to the
share as a policy does (`fill_to_share`). The model is a folder written to --dir whose UNet is
randomly initialised with the public SD v1.5 config (859,520,964 parameters, 3.2 GiB), fine-tuned
fully with fp32 AdamW (fused), batch 1, 77x768 text states, at --latent x --latent latents.

It runs the probe behind `finetune`'s savings report (`guardtune.training.savings`): memory in one
fresh process per configuration (the peak resident set on CPU, the CUDA allocator peak on GPU),
then the step times of all configurations in one process, one step of each per round, the order
reversed every other round. Time saved is the median over rounds of 1 - frozen / unfrozen step
time of the same round, with a distribution-free confidence interval of that median; on CPU a
step is timed as one thread's CPU time, which other processes' load does not enter. The analytic
memory limit is frozen parameters x (4 bytes of gradient + 8 bytes of AdamW state).

    .venv/bin/python benchmarks/savings.py [--rounds 6] [--steps 3] [--latent 32]
        [--shares 0.3,0.5,0.7] [--selections random,front] [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from rich.console import Console
from rich.table import Table
from sd15 import SD15_UNET, write_unet

from guardtune.evaluate.defenses import random_mask
from guardtune.learn.binarize import fill_to_share
from guardtune.resolve import EMBEDDED_DIR
from guardtune.training.config import TrainConfig
from guardtune.training.savings import (
    PROBE_STEPS,
    median_interval,
    memory_range,
    optimizer_bytes_per_param,
    paired_savings,
    run_probe,
    spread,
    verdict,
)

# A frozen parameter needs no fp32 gradient and no optimizer state.
BYTES_PER_FROZEN_PARAM = 4 + optimizer_bytes_per_param("adamw")
TEXT_TOKENS, TEXT_WIDTH = 77, 768  # SD v1.5's CLIP text states, which its UNet attends to
# The UNet's top-level modules in the order its forward pass runs them.
FLOW = ("conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
        "conv_out")  # fmt: skip


def write_model(folder: Path, latent: int) -> int:
    """An SD v1.5-size model folder; returns the training resolution that gives latent x latent.

    The probe takes the text states' shape from the text encoder and tokenizer and drops both
    (and the VAE) before training, so a random one-layer CLIP text encoder of SD v1.5's width
    and the embedded tokenizer raised to 77 tokens stand in for the real ones.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    shutil.copytree(EMBEDDED_DIR, folder, ignore=shutil.ignore_patterns("unet", "guardtune-*"))
    (folder / "unet").mkdir()
    write_unet(folder / "unet" / "diffusion_pytorch_model.safetensors", torch.float32,
               folder / "unet")  # fmt: skip
    text = CLIPTextConfig.from_pretrained(
        folder / "text_encoder", hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        projection_dim=TEXT_WIDTH, num_attention_heads=12, num_hidden_layers=1,
        max_position_embeddings=TEXT_TOKENS,
    )  # fmt: skip
    CLIPTextModel(text).save_pretrained(folder / "text_encoder")
    tokenizer = folder / "tokenizer" / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer.read_text())
    tokenizer.write_text(json.dumps(tokenizer_config | {"model_max_length": TEXT_TOKENS}))
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return latent * 2 ** (len(vae["block_out_channels"]) - 1)


def flow_order(names: list[str]) -> list[str]:
    """Parameter names in the order the forward pass reaches them, block by block."""

    def position(name: str) -> tuple[int, int]:
        top, _, rest = name.partition(".")
        index = int(rest.split(".")[0]) if top in ("down_blocks", "up_blocks") else 0
        return FLOW.index(top), index

    return sorted(names, key=position)  # stable: registration order within a block


def masks(numel: dict[str, int], shares: list[float], selections: list[str]):
    """(label, selection, share, frozen names) of every frozen configuration."""
    front = flow_order(list(numel))
    for selection in selections:
        for share in shares:
            if selection == "random":
                frozen = random_mask(numel, share, 0)
            else:
                frozen = fill_to_share(front, numel, share)
            yield f"{selection} {share:.1f}", selection, share, sorted(frozen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="Timed steps per configuration.")
    parser.add_argument("--steps", type=int, default=PROBE_STEPS, help="Memory steps, >= 2.")
    parser.add_argument("--latent", type=int, default=32, help="Latent height and width.")
    parser.add_argument("--shares", default="0.3,0.5,0.7")
    parser.add_argument("--selections", default="random,front", help="random and/or front")
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the model.")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step pays for lazy initialisation")
    selections = args.selections.split(",")
    if not set(selections) <= {"random", "front"}:
        parser.error("--selections takes random and front")
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    numel = {name: parameter.numel() for name, parameter in unet.named_parameters()}
    shares = [float(s) for s in args.shares.split(",")]
    configurations = {"unfrozen": ("none", 0.0, [])}
    for label, selection, share, frozen in masks(numel, shares, selections):
        configurations[label] = (selection, share, frozen)
    config = TrainConfig(batch_size=1, mixed_precision="no")
    began = time.perf_counter()
    console = Console(width=200)  # the table is wide; a log file gets it whole
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        model = Path(folder) / "sd15"
        spec = {"kind": "folder", "path": str(model), "config_dir": None,
                "config": dataclasses.asdict(config),
                "resolution": write_model(model, args.latent), "optimizer": config.optimizer,
                "mixed_precision": "no", "steps": args.steps}  # fmt: skip
        # Memory: one fresh process per configuration, so no peak carries over.
        probes = {}
        for label, (_, _, frozen) in configurations.items():
            if label != "unfrozen":
                probes[label] = run_probe(spec | {"frozen": frozen})
                console.print(f"memory of {label}: {probes[label].peak_memory_bytes / 2**30:.2f}"
                              f" GiB ({time.perf_counter() - began:.0f} s)")  # fmt: skip
        # Time: the unfrozen process (its optimizer covers every tensor) runs all of them.
        alternate = {label: frozen for label, (_, _, frozen) in configurations.items()}
        probes["unfrozen"] = run_probe(
            spec | {"frozen": [], "alternate": alternate, "rounds": args.rounds}
        )
    base = probes["unfrozen"]
    times = base.round_times_s
    table = Table(
        title=f"Freezing an SD v1.5-size UNet (batch 1, {args.latent}x{args.latent} latents, "
        f"fp32 AdamW)"
    )
    for column in ("frozen", "frozen params", "step s, median (IQR)", "time saved (interval)",
                   "peak GiB", "memory saved (interval)", "analytic limit GiB",
                   "measured / analytic"):  # fmt: skip
        table.add_column(column, justify="right")
    gib = 2**30
    coverage = 1.0
    for label, (_, _, frozen) in configurations.items():
        probe = probes[label]
        low, high = spread(times[label])
        step = f"{median(times[label]):.2f} ({low:.2f}-{high:.2f})"
        frozen_params = sum(numel[n] for n in frozen)
        if label == "unfrozen":
            table.add_row(label, "0", step, "-", f"{probe.peak_memory_bytes / gib:.2f}", "-",
                          "-", "-")  # fmt: skip
            continue
        savings = paired_savings(times[label], times["unfrozen"])
        t_low, t_high, coverage = median_interval(savings)
        memory = 1 - probe.peak_memory_bytes / base.peak_memory_bytes
        m_low, m_high = memory_range(probe, base)
        measured = base.peak_memory_bytes - probe.peak_memory_bytes
        analytic = frozen_params * BYTES_PER_FROZEN_PARAM
        table.add_row(
            label, f"{frozen_params:,} ({frozen_params / sum(numel.values()):.0%})", step,
            verdict(median(savings), t_low, t_high), f"{probe.peak_memory_bytes / gib:.2f}",
            verdict(memory, m_low, m_high), f"{analytic / gib:.2f}", f"{measured / analytic:.2f}",
        )  # fmt: skip
    console.print(table)
    console.print(f"memory: {base.measurement}; {args.steps} steps per configuration, the first "
                  f"left out of the interval")  # fmt: skip
    clock = "wall time" if base.device == "cuda" else "CPU time of one thread"
    console.print(
        f"time: {clock} per step, {args.rounds} rounds alternating all configurations in one "
        f"process; time saved: median of the rounds' paired savings, interval {coverage:.0%} "
        f"confidence; load average {base.load_average:.1f} on {base.cpus} CPUs "
        f"(at the end); {time.perf_counter() - began:.0f} s in all"
    )
    console.print("target: measured / analytic >= 0.90; the FreezeAsGuard paper measured 13-21% "
                  "time saved at shares 0.3-0.7 on a GPU")  # fmt: skip


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
