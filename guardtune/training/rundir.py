"""The fine-tune's output folder: whether a run may write into it, and what it finds there.

A run checks its `--out` folder before anything else (`check_run_folder`, which writes
nothing, so a refused run leaves no trace) and claims it when training starts (`claim`) by
writing `guardtune-run.json` into it. A folder that holds
anything without that mark is the user's and is never written into. A marked folder that holds
a finished run, or checkpoints of an unfinished one, is continued only with `--resume`, so no
run is overwritten by accident. Staging files and folders that a killed run left behind (the
`.NAME.XXXX.tmp` siblings of `guardtune.atomic`) are removed when a run claims the folder, and
the result names them.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from guardtune import __version__, atomic
from guardtune.contract import PROVENANCE_FILE
from guardtune.errors import DataError
from guardtune.training.checkpoint import list_checkpoints

RUN_MARK = "guardtune-run.json"
# The effective options of the run, in the form `--config` reads, so it can be repeated.
RUN_CONFIG = "run.toml"
CHECKPOINTS = "checkpoints"
# What guardtune.atomic stages beside a target: `.{name}.{random}.tmp`, and `.old` once retired.
_STAGING = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp(\.old)?$")


@dataclass(frozen=True)
class RunFolder:
    path: Path
    state: str  # "new", "restart" (a run of ours with nothing to keep) or "resume"
    main_process: bool = True
    removed: tuple[str, ...] = ()  # staging left by a killed run, relative to `path`

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS


def check_run_folder(out: Path, resume: str | None, main_process: bool = True) -> RunFolder:
    """Whether a run may write into `out`; DataError (exit 3) if it may not. Writes nothing.

    Only the main process of a distributed run checks and claims (the others would race its
    writes); if it refuses, the launcher stops the others.
    """
    out = Path(out)
    if not main_process:
        return RunFolder(out, "resume" if resume is not None else "new", main_process=False)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a folder", hint="choose a folder for --out")
    if not out.exists() or not any(out.iterdir()):
        return RunFolder(out, "new")
    if not (out / RUN_MARK).is_file():
        raise DataError(
            f"output folder {out} holds files guardtune did not write", hint="choose a new --out"
        )
    if resume is not None:
        return RunFolder(out, "resume")
    if (out / PROVENANCE_FILE).exists():
        raise DataError(
            f"output folder {out} holds a finished run",
            hint="choose a new --out, or delete the folder to train again",
        )
    found = list_checkpoints(out / CHECKPOINTS)
    if found:
        raise DataError(
            f"output folder {out} holds an unfinished run (checkpoint {found[-1].name})",
            hint="pass --resume latest to continue it, or choose a new --out",
        )
    return RunFolder(out, "restart")


def claim(folder: RunFolder) -> RunFolder:
    """Mark a checked folder as this run's and remove what a killed run left half-written."""
    if not folder.main_process:
        return folder
    if folder.state == "new":
        atomic.write_json(folder.path / RUN_MARK, {"tool": f"guardtune {__version__}"})
        return folder
    return replace(folder, removed=_remove_staging(folder.path))


def _remove_staging(out: Path) -> tuple[str, ...]:
    """Remove what a killed run left half-written in `out` and its checkpoints folder."""
    removed = []
    for folder in (out, out / CHECKPOINTS):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in sorted(folder.iterdir()):
            if not _STAGING.match(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(str(entry.relative_to(out)))
    return tuple(removed)
