"""Training checkpoints: atomic, self-verifying, and refused when corrupt or tampered.

A checkpoint is a folder `checkpoints/step-NNNNNN/` written in one rename, holding the
trainable tensors (`trainable.safetensors`), their EMA when the run keeps one
(`ema.safetensors`), the optimizer and LR-scheduler state, and
`state.json` with the step, the run's identity (config digest, base model root digest, policy
digest) and the sha256 of every file. Loading re-hashes every file and checks the identity, so a
checkpoint from another run, a corrupted file or an edited tensor is refused (exit 3), and a
checkpoint that carries a frozen tensor is an integrity violation (exit 7). The step is bound
to what the hashed files say: the folder's name, the optimizer's step counts and the LR
schedule's position must all agree with it, so an edited step counter is refused too.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from guardtune import atomic
from guardtune.errors import DataError, IntegrityError

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.json")
EMA_FILE = "ema.safetensors"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    folder: Path,
    step: int,
    run_identity: dict[str, str],
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    keep: int = 2,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically; keep only the newest `keep` checkpoints."""
    target = folder / f"step-{step:06d}"
    with atomic.staged_dir(target) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                  str(staging / "trainable.safetensors"))  # fmt: skip
        torch.save(optimizer_state, staging / "optimizer.pt")
        (staging / "scheduler.json").write_text(json.dumps(scheduler_state, sort_keys=True))
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()},
                      str(staging / EMA_FILE))  # fmt: skip
        names = (*FILES, EMA_FILE) if ema is not None else FILES
        state = {
            "step": step,
            "run": run_identity,
            "files": {name: _sha256(staging / name) for name in names},
        }
        (staging / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_resume(folder: Path, resume: str) -> Path:
    """'latest' or a checkpoint path to a checkpoint folder; DataError if there is none."""
    if resume == "latest":
        found = list_checkpoints(folder)
        if not found:
            raise DataError(f"--resume latest: no checkpoint in {folder}")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise DataError(f"--resume {resume}: not a checkpoint folder")
    return path


def load_checkpoint(
    path: Path, run_identity: dict[str, str], trainable_names: set[str], frozen: set[str],
    ema: bool = False,
) -> Checkpoint:  # fmt: skip
    """Load and check a checkpoint of this very run (with its EMA if `ema`); refuse anything
    else."""
    try:
        state = json.loads((path / "state.json").read_text())
        step, files, run = int(state["step"]), dict(state["files"]), dict(state["run"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"checkpoint {path} has no valid state.json ({error})") from error
    for name in (*FILES, EMA_FILE) if ema else FILES:
        if not (path / name).is_file() or _sha256(path / name) != files.get(name):
            raise DataError(f"checkpoint {path}: {name} is corrupt or was modified; refusing it")
    if run != run_identity:
        changed = sorted(k for k in run_identity if run.get(k) != run_identity[k])
        raise DataError(
            f"checkpoint {path} is from another run ({', '.join(changed) or 'identity'} differs)",
            hint="resume with the same model, policy, data and options",
        )
    optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    scheduler = json.loads((path / "scheduler.json").read_text())
    _check_step(path, step, optimizer, scheduler)
    trainable = load_file(str(path / "trainable.safetensors"))
    smuggled = sorted(set(trainable) & frozen)
    if smuggled:
        raise IntegrityError(f"checkpoint {path} carries frozen tensor unet.{smuggled[0]}")
    if set(trainable) != trainable_names:
        raise DataError(f"checkpoint {path} does not hold this run's trainable tensors")
    averaged = load_file(str(path / EMA_FILE)) if ema else None
    if averaged is not None and set(averaged) != trainable_names:
        raise DataError(f"checkpoint {path}: its EMA does not hold this run's trainable tensors")
    return Checkpoint(step, trainable, optimizer, scheduler, averaged)


def _check_step(path: Path, step: int, optimizer: dict[str, Any], scheduler: dict[str, Any]):
    """DataError unless every record of how far the run got says `step`."""
    named = _STEP_DIR.match(path.name)
    counts = {
        "folder name": int(named.group(1)) if named else None,
        "LR schedule": scheduler.get("last_epoch"),
    }
    for state in optimizer.get("state", {}).values():
        if isinstance(state, dict) and "step" in state:
            counts["optimizer"] = int(state["step"])  # one count per parameter, all equal
            if counts["optimizer"] != step:
                break
    for source, count in counts.items():
        if count is not None and count != step:
            raise DataError(
                f"checkpoint {path}: state.json says step {step} but its {source} says {count}; "
                "refusing it"
            )
