"""What freezing saves on an SD v1.5-size UNet: measured vs the analytic limit.

For freeze shares 0, 0.3, 0.5 and 0.7 of the parameters (whole tensors in a seeded random order,
evaluate's random-p mask), each configuration runs `guardtune.training.savings.run_probe`, the
probe behind `finetune`'s savings report, in its own process: fp32 AdamW (fused), batch 1,
32x32 latents, 77x768 text states, on a model folder written to --dir whose UNet is randomly
initialised with the public SD v1.5 config (859,520,964 parameters, 3.2 GiB). The probe reports
the resident set sampled while training (CPU) or the CUDA allocator peak, and the median step
time. The analytic limit of the saving is frozen parameters x (4 bytes of gradient + 8 bytes of
AdamW state); target: measured saving at least 90% of it.

    .venv/bin/python benchmarks/savings.py [--steps 11] [--shares 0,0.3,0.5,0.7] [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from sd15 import SD15_UNET, write_unet

from guardtune.evaluate.defenses import random_mask
from guardtune.resolve import EMBEDDED_DIR
from guardtune.training.config import TrainConfig
from guardtune.training.savings import PROBE_STEPS, optimizer_bytes_per_param, run_probe

# A frozen parameter needs no fp32 gradient and no optimizer state.
BYTES_PER_FROZEN_PARAM = 4 + optimizer_bytes_per_param("adamw")
LATENT_SIZE = 32
TEXT_TOKENS, TEXT_WIDTH = 77, 768  # SD v1.5's CLIP text states, which its UNet attends to


def write_model(folder: Path) -> int:
    """An SD v1.5-size model folder; returns the training resolution that gives 32x32 latents.

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
    return LATENT_SIZE * 2 ** (len(vae["block_out_channels"]) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=PROBE_STEPS, help="At least 2.")
    parser.add_argument("--shares", default="0,0.3,0.5,0.7", help="Share 0 is always probed.")
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the model.")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    numel = {name: parameter.numel() for name, parameter in unet.named_parameters()}
    shares = sorted({0.0, *(float(s) for s in args.shares.split(","))})
    config = TrainConfig(batch_size=1, mixed_precision="no")
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        model = Path(folder) / "sd15"
        spec = {"kind": "folder", "path": str(model), "config_dir": None,
                "config": dataclasses.asdict(config), "resolution": write_model(model),
                "optimizer": config.optimizer, "mixed_precision": "no",
                "steps": args.steps}  # fmt: skip
        for share in shares:
            frozen = sorted(random_mask(numel, share, 0)) if share else []
            # Each probe is a fresh interpreter, so peaks do not carry over between shares.
            results[share] = (frozen, run_probe(spec | {"frozen": frozen}))
    base = results[0.0][1]
    table = Table(title="Freezing an SD v1.5-size UNet (batch 1, 32x32 latents, fp32 AdamW)")
    for column in ("share", "frozen params", "peak GiB", "step s", "measured saving GiB",
                   "analytic limit GiB", "measured / analytic"):  # fmt: skip
        table.add_column(column, justify="right")
    gib = 2**30
    for share, (frozen, result) in results.items():
        measured = base.peak_memory_bytes - result.peak_memory_bytes
        frozen_params = sum(numel[n] for n in frozen)
        analytic = frozen_params * BYTES_PER_FROZEN_PARAM
        table.add_row(
            f"{share:.1f}", f"{frozen_params:,}", f"{result.peak_memory_bytes / gib:.2f}",
            f"{result.step_time_s:.2f}", f"{measured / gib:.2f}", f"{analytic / gib:.2f}",
            f"{measured / analytic:.2f}" if analytic else "-",
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(f"peak: {base.measurement}; {args.steps} steps, the first not timed")
    console.print("target: measured / analytic >= 0.90")


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
