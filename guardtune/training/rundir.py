"""The fine-tune's output folder: whether a run may write into it, and what it finds there.

A run checks its `--out` folder before anything else (`check_run_folder`, which writes
nothing, so a refused run leaves no trace) and claims it when training starts (`claim`) by
writing `guardtune-run.json` into it. A folder that holds
anything without that mark is the user's and is never written into. A marked folder that holds
a finished run, or checkpoints of an unfinished one, is continued only with `--resume`, so no
run is overwritten by accident. Staging files and folders that a killed run left behind (the
`.NAME.XXXX.tmp` siblings of `guardtune.atomic`) are removed when a run claims the folder, and
the result names them.

Two runs must never share a folder: the second would remove the first's staging files and
both would write the same checkpoints. So a claim also takes an exclusive lock on
`.guardtune-run.lock` in the folder, held until the run ends (the kernel drops it when a
process dies, so a killed run leaves no stale lock), and checks the folder again under it. A
run that finds the lock taken stops before it loads anything. Runs in one process follow one
another: a lock this process still holds is a run that ended by an exception, and the next
claim takes it over. Where the platform has no `fcntl` (Windows) folders are not locked.
`publish` locks its work folder with the same `lock_folder`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from guardtune import __version__, atomic
from guardtune.contract import PROVENANCE_FILE
from guardtune.errors import DataError
from guardtune.training.checkpoint import list_checkpoints

try:
    import fcntl
except ImportError:  # Windows: no advisory locks there, and folders are not locked
    fcntl = None  # type: ignore[assignment]

RUN_MARK = "guardtune-run.json"
# The effective options of the run, in the form `--config` reads, so it can be repeated.
RUN_CONFIG = "run.toml"
RUN_LOCK = ".guardtune-run.lock"
CHECKPOINTS = "checkpoints"
# What guardtune.atomic stages beside a target: `.{name}.{random}.tmp`, and `.old` once retired.
_STAGING = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp(\.old)?$")
# Locks this process holds: folder (resolved) -> descriptor of its lock file.
_HELD: dict[str, int] = {}


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
    if _locked_elsewhere(out):
        raise _in_use(out)
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
    """Mark a checked folder as this run's, lock it, and remove what a killed run left
    half-written. DataError if another run holds the folder, or took it since the check."""
    if not folder.main_process:
        return folder
    if folder.state == "new":
        # Marked before it is locked: two new runs racing here write the same mark, and the
        # lock then admits one of them.
        atomic.write_json(folder.path / RUN_MARK, {"tool": f"guardtune {__version__}"})
    lock_folder(folder.path)
    # What the folder holds now, under the lock: another run may have written checkpoints
    # or finished there while this one was loading. A new folder is now marked, which is all
    # a restart finds, so "new" and "restart" agree.
    try:
        check_run_folder(folder.path, "latest" if folder.state == "resume" else None)
    except DataError:
        unlock_folder(folder.path)
        raise
    if folder.state == "new":
        return folder
    return replace(folder, removed=_remove_staging(folder.path))


def _key(out: Path) -> str:
    return os.path.realpath(out)


def _in_use(out: Path, what: str = "output folder", option: str = "--out") -> DataError:
    return DataError(
        f"{what} {out} is in use by another guardtune run",
        hint=f"wait for that run to end, or choose a new {option}",
    )


def _try_lock(fd: int) -> bool:
    """False if another open lock file holds the lock. A file system without locks (some
    network mounts) leaves the folder unlocked, as on Windows, rather than stop every run."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    return True


def _locked_elsewhere(out: Path) -> bool:
    """Whether another process holds the folder's lock; opens the lock file only if it exists
    (a check writes nothing) and drops the probe's lock at once."""
    if fcntl is None or _key(out) in _HELD:
        return False
    try:
        fd = os.open(out / RUN_LOCK, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return False
    except OSError as error:  # a link or a folder in its place: not ours to open
        raise DataError(f"output folder {out} has an unusable {RUN_LOCK}: {error}") from None
    try:
        return not _try_lock(fd)
    finally:
        os.close(fd)  # releases the probe's lock, if it got one


def lock_folder(out: Path, what: str = "output folder", option: str = "--out") -> None:
    """Lock a folder a run writes into (creating it) until `unlock_folder` or the process's
    end; DataError if another run holds it. `what` and `option` name it in the error."""
    if fcntl is None:
        return
    unlock_folder(out)  # held by a run of this process that ended by an exception
    Path(out).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out / RUN_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as error:
        raise DataError(f"{what} {out} has an unusable {RUN_LOCK}: {error}") from None
    if not _try_lock(fd):
        os.close(fd)
        raise _in_use(out, what, option)
    _HELD[_key(out)] = fd


def unlock_folder(out: Path) -> None:
    """Drop a lock `lock_folder` took, at the end of a run (a process's exit does so too)."""
    fd = _HELD.pop(_key(out), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the lock file drops the lock


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
