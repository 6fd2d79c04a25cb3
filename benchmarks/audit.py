"""Audit speed on an SD v1.5-size derivative, against `sha256sum` of the derivative's UNet file.

Builds a base model (the embedded model's VAE, text encoder and tokenizer around a randomly
initialised UNet with the public SD v1.5 config, fp32, 3.2 GiB), signs a random 30% policy for
it, and writes a full-weight derivative whose unfrozen tensors changed. Then times, in one run
with the page cache warm for both, `sha256sum` of the derivative's UNet file and the whole
`audit` (policy verification, which fingerprints the base, plus the frozen tensors of the
derivative). Target: at most 1.2x.

    .venv/bin/python benchmarks/audit.py [--dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from sd15 import write_unet

from guardtune.enforce.audit import audit
from guardtune.evaluate.defenses import random_mask
from guardtune.resolve import EMBEDDED_DIR, ModelSource
from guardtune.trust.build import build_policy, sign_policy_file
from guardtune.trust.policy import Provenance
from guardtune.trust.signing import generate_key, public_pem


def best_of(repeats: int, run) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the models.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        base, derivative = Path(folder) / "base", Path(folder) / "derivative"
        shutil.copytree(EMBEDDED_DIR, base, ignore=shutil.ignore_patterns("unet", "guardtune-*"))
        (base / "unet").mkdir()
        unet_file = base / "unet" / "diffusion_pytorch_model.safetensors"
        write_unet(unet_file, torch.float32, base / "unet")
        state = load_file(str(unet_file))
        numel = {name: tensor.numel() for name, tensor in state.items()}
        frozen = sorted(random_mask(numel, 0.3, 0))
        key = generate_key()
        trusted = Path(folder) / "publisher.pub"
        trusted.write_bytes(public_pem(key.public_key()))
        policy = build_policy(ModelSource("folder", base), [f"unet.{n}" for n in frozen],
                             Provenance("random"))  # fmt: skip
        sign_policy_file(policy, [key], base / "guardtune-policy.json")
        shutil.copytree(base, derivative, ignore=shutil.ignore_patterns("unet"))
        (derivative / "unet").mkdir()
        shutil.copy(base / "unet" / "config.json", derivative / "unet")
        frozen_set = set(frozen)
        for name, tensor in state.items():  # a fine-tune: every unfrozen tensor moved
            if name not in frozen_set:
                tensor.add_(1e-3)
        target = derivative / "unet" / "diffusion_pytorch_model.safetensors"
        save_file(state, str(target))
        del state

        def run_audit():
            return audit(derivative, str(base), trusted_files=[trusted], use_trust_dirs=False)

        subprocess.run(["sha256sum", str(target)], check=True, capture_output=True)  # warm
        run_audit()
        sha, _ = best_of(args.repeats, lambda: subprocess.run(
            ["sha256sum", str(target)], check=True, capture_output=True))  # fmt: skip
        ours, report = best_of(args.repeats, run_audit)
        assert report.compliant and report.counts["identical"] == len(frozen), report
        size = target.stat().st_size / 2**30
    table = Table(title=f"Audit vs sha256sum, SD v1.5-size derivative, {os.cpu_count()} CPU cores")
    for column in ("UNet file GiB", "frozen tensors", "sha256sum s", "audit s", "ratio"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{size:.2f}", str(len(frozen)), f"{sha:.2f}", f"{ours:.2f}", f"{ours / sha:.2f}x"
    )
    console.print(table)
    console.print("audit = verify the policy (fingerprint the whole base) + check the derivative's")
    console.print("frozen tensors; ratio = audit time / sha256sum time (target <= 1.2x)")


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
