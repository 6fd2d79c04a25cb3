"""Fingerprint speed on an SD v1.5-size UNet, against `sha256sum` of the same file.

Builds a randomly initialised UNet with the public Stable Diffusion v1.5 UNet config
(859,520,964 parameters in 686 tensors), saves it as fp32 and fp16 safetensors, and times, in
one run and with the page cache warm for both, `sha256sum FILE` and guardtune's per-tensor
fingerprint of the same file. Prints the ratio (target: at most 1.0x sha256sum's time).

    .venv/bin/python benchmarks/fingerprint.py [--dir DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from sd15 import best_of, write_unet

from guardtune.tensorfile import read_header
from guardtune.trust.fingerprint import fingerprint_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the test files.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"Fingerprint vs sha256sum, SD v1.5 UNet, {os.cpu_count()} CPU cores")
    for column in ("file", "size GiB", "sha256sum s", "fingerprint s", "1 worker s", "ratio"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
            path = Path(folder) / f"unet-{label}.safetensors"
            parameters, tensors = write_unet(path, dtype)
            assert (parameters, tensors) == (859_520_964, 686), (parameters, tensors)
            records = read_header(path)
            subprocess.run(["sha256sum", str(path)], check=True, capture_output=True)  # warm cache
            sha = best_of(args.repeats, lambda p=path: subprocess.run(
                ["sha256sum", str(p)], check=True, capture_output=True))  # fmt: skip
            ours = best_of(args.repeats, lambda r=records: fingerprint_records(r))
            from guardtune.trust.fingerprint import hash_records

            single = best_of(1, lambda r=records: hash_records(r, workers=1))
            size = path.stat().st_size / 2**30
            table.add_row(
                label,
                f"{size:.2f}",
                f"{sha:.2f}",
                f"{ours:.2f}",
                f"{single:.2f}",
                f"{ours / sha:.2f}x",
            )
            path.unlink()
    console.print(table)
    console.print("ratio = fingerprint time / sha256sum time (target <= 1.0x)")


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
