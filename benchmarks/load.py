"""Verified loading of an SD v1.5-size pipeline: guardtune's bound path vs diffusers alone.

Writes a pipeline folder whose UNet has the public SD v1.5 shape (859,520,964 parameters,
randomly initialised) beside the embedded model's small VAE, text encoder and tokenizer, in
fp32 and in fp16, signs a policy for each, and times in one run, page cache warm for both:
- diffusers: `StableDiffusionPipeline.from_pretrained(folder)` (what a user would run);
- guardtune: `verify_policy(fingerprint=False)` (signature, trust, expiry) followed by
  `load_pipeline(..., expected=policy)`, which copies each tensor out of its file, hashes the
  copy and hands it to the module, then compares the digests with the policy's: what
  `finetune` does. `policy verify` alone (which fingerprints the files) is timed too.
Both load into fp32 on the CPU. Prints the ratio (target: at most 1.2x diffusers' time).

    .venv/bin/python benchmarks/load.py [--dir DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from sd15 import best_of, write_unet

from guardtune.models import load_pipeline
from guardtune.resolve import EMBEDDED_DIR, ModelSource
from guardtune.trust.build import build_policy, sign_policy_file
from guardtune.trust.policy import Provenance
from guardtune.trust.signing import generate_key, public_pem
from guardtune.trust.verify import verify_policy

CPU = torch.device("cpu")


def write_model(folder: Path, dtype: torch.dtype) -> Path:
    """An SD v1.5-size UNet in the embedded pipeline, with a signed policy beside it."""
    shutil.copytree(EMBEDDED_DIR, folder, ignore=shutil.ignore_patterns("unet", "guardtune-*"))
    (folder / "unet").mkdir()
    write_unet(folder / "unet" / "diffusion_pytorch_model.safetensors", dtype, folder / "unet")
    key = generate_key()
    policy = build_policy(ModelSource("folder", folder), ["unet.conv_in.weight"], Provenance("x"))
    sign_policy_file(policy, [key], folder / "guardtune-policy.json")
    trusted = folder.parent / f"{folder.name}.pub"
    trusted.write_bytes(public_pem(key.public_key()))
    return trusted


def main() -> None:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the models.")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    table = Table(title=f"Verified load vs from_pretrained, SD v1.5 UNet, {os.cpu_count()} cores")
    columns = ("weights", "from_pretrained s", "+ every page read s", "policy verify s",
               "bound load s", "vs from_pretrained", "vs + read")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
            folder = Path(root) / label
            trusted = write_model(folder, dtype)

            def plain(folder=folder):
                StableDiffusionPipeline.from_pretrained(
                    folder, dtype=torch.float32, safety_checker=None,
                    requires_safety_checker=False, local_files_only=True,
                )  # fmt: skip

            def read_all(folder=folder):
                pipeline = StableDiffusionPipeline.from_pretrained(
                    folder, dtype=torch.float32, safety_checker=None,
                    requires_safety_checker=False, local_files_only=True,
                )  # fmt: skip
                for parameter in pipeline.unet.parameters():  # one value per 4 KiB page
                    parameter.detach().reshape(-1)[::1024].sum()

            def verify(folder=folder, trusted=trusted, fingerprint=True):
                return verify_policy(str(folder), trusted_files=(trusted,), use_trust_dirs=False,
                                     fingerprint=fingerprint)  # fmt: skip

            def bound(folder=folder, trusted=trusted):
                verified = verify(folder, trusted, fingerprint=False)  # the loader binds
                load_pipeline(str(folder), device=CPU, dtype=torch.float32,
                              expected=verified.policy.binding)  # fmt: skip

            plain()  # warm the page cache and the imports for both sides
            diffusers_s = best_of(args.repeats, plain)
            read_s = best_of(args.repeats, read_all)
            verify_s = best_of(args.repeats, verify)
            bound_s = best_of(args.repeats, bound)
            table.add_row(label, f"{diffusers_s:.2f}", f"{read_s:.2f}", f"{verify_s:.2f}",
                          f"{bound_s:.2f}", f"{bound_s / diffusers_s:.2f}x",
                          f"{bound_s / read_s:.2f}x")  # fmt: skip
            shutil.rmtree(folder)
    console = Console()
    console.print(table)
    console.print(
        "bound load = signature check + a load that hashes every tensor it copies in and "
        "compares with the policy; from_pretrained maps safetensors lazily, so its time "
        "excludes reading the weights, which '+ every page read' adds"
    )
    console.print("target: bound load <= 1.2x from_pretrained")


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
