"""The output folder rules: a run writes only into a folder it claimed, never over a finished
run, continues an unfinished one only with --resume, and cleans what a killed run left."""

from __future__ import annotations

import os
import re

import pytest

from guardtune.contract import PROVENANCE_FILE
from guardtune.errors import DataError
from guardtune.training.rundir import (
    RUN_LOCK,
    RUN_MARK,
    RunFolder,
    check_run_folder,
    claim,
    fcntl,
    unlock_folder,
)


def _claim(out, resume=None):
    return claim(check_run_folder(out, resume))


def test_a_new_or_empty_folder_is_claimed_only_when_training_starts(tmp_path):
    folder = check_run_folder(tmp_path / "new", resume=None)
    assert folder.state == "new" and not (tmp_path / "new").exists()
    claim(folder)
    assert (tmp_path / "new" / RUN_MARK).is_file()
    (tmp_path / "empty").mkdir()
    assert _claim(tmp_path / "empty").state == "new"


def test_a_regular_file_is_no_output_folder(tmp_path):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(DataError, match=re.escape(f"--out {tmp_path / 'out'} is a file")):
        check_run_folder(tmp_path / "out", resume=None)
    assert (tmp_path / "out").read_text() == "notes"


@pytest.mark.parametrize("content", ["checkpoints", "model", "notes.txt"])
def test_a_users_folder_is_never_written_into(tmp_path, content):
    out = tmp_path / "mine"
    out.mkdir()
    if content.endswith(".txt"):
        (out / content).write_text("mine")
    else:
        (out / content).mkdir()  # an empty checkpoints/ or model/ is no run of ours
    with pytest.raises(DataError, match="holds files guardtune did not write"):
        check_run_folder(out, resume="latest")
    assert not (out / RUN_MARK).exists()


def test_a_finished_run_is_not_overwritten(tmp_path):
    _claim(tmp_path / "run")
    (tmp_path / "run" / PROVENANCE_FILE).write_text("{}")
    with pytest.raises(DataError, match="holds a finished run"):
        _claim(tmp_path / "run")


def test_an_unfinished_run_continues_only_with_resume(tmp_path):
    _claim(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-000004").mkdir(parents=True)
    with pytest.raises(DataError, match=r"unfinished run \(checkpoint step-000004\)"):
        _claim(tmp_path / "run")
    assert check_run_folder(tmp_path / "run", resume="latest").state == "resume"


def test_a_run_killed_before_its_first_checkpoint_restarts(tmp_path):
    _claim(tmp_path / "run")
    assert check_run_folder(tmp_path / "run", resume=None).state == "restart"


def test_what_a_killed_run_left_half_written_is_removed_and_named(tmp_path):
    out = tmp_path / "run"
    _claim(out)
    left = [out / ".model.k2j4x_9.tmp", out / "checkpoints" / ".step-000010.ab12cd.tmp",
            out / ".model.q1w2e3.tmp.old"]  # fmt: skip
    for folder in left:
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "weights.safetensors").write_bytes(b"\0" * 64)
    (out / ".guardtune-provenance.json.zz91.tmp").write_text("{")
    kept = out / "checkpoints" / "step-000005"
    kept.mkdir()
    folder = _claim(out, resume="latest")
    assert sorted(folder.removed) == sorted(
        [
            ".guardtune-provenance.json.zz91.tmp",
            ".model.k2j4x_9.tmp",
            ".model.q1w2e3.tmp.old",
            "checkpoints/.step-000010.ab12cd.tmp",
        ]
    )
    assert not any(path.exists() for path in left) and kept.is_dir()


def test_other_processes_of_a_launch_leave_the_folder_to_the_main_one(tmp_path):
    folder = claim(check_run_folder(tmp_path / "run", resume=None, main_process=False))
    assert folder.state == "new" and not (tmp_path / "run").exists()


def _held_by_another_process(out):
    """A lock as another run holds it: its own open file description (flock locks conflict
    between descriptions even within one process)."""
    fd = os.open(out / RUN_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.mark.skipif(fcntl is None, reason="no advisory locks on this platform")
def test_a_folder_another_run_is_training_in_is_refused_before_anything_is_removed(tmp_path):
    out = tmp_path / "run"
    unlock_folder(_claim(out).path)
    staging = out / "checkpoints" / ".step-000010.ab12cd.tmp"  # the other run's, mid-write
    staging.mkdir(parents=True)
    other = _held_by_another_process(out)
    try:
        message = f"output folder {out} is in use by another guardtune run"
        with pytest.raises(DataError, match=re.escape(message)):
            check_run_folder(out, resume="latest")
        # Checked before the other run locked, claimed after: the claim refuses too.
        folder = RunFolder(out, "resume")
        with pytest.raises(DataError, match=re.escape(message)):
            claim(folder)
        assert staging.is_dir()
    finally:
        os.close(other)
    assert _claim(out, resume="latest").removed == ("checkpoints/.step-000010.ab12cd.tmp",)


@pytest.mark.skipif(fcntl is None, reason="no advisory locks on this platform")
def test_a_run_that_took_the_folder_while_this_one_loaded_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    checked = check_run_folder(out, resume=None)  # new: nothing there yet
    unlock_folder(_claim(out).path)  # another run claims, trains, checkpoints and is killed
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    with pytest.raises(DataError, match=r"unfinished run \(checkpoint step-000004\)"):
        claim(checked)
    assert (out / "checkpoints" / "step-000004").is_dir()


@pytest.mark.skipif(fcntl is None, reason="no advisory locks on this platform")
def test_a_run_ended_by_an_exception_in_this_process_leaves_the_folder_usable(tmp_path):
    out = tmp_path / "run"
    _claim(out)  # never released, as when training raises in-process
    assert _claim(out, resume="latest").state == "resume"
    other = os.open(out / RUN_LOCK, os.O_RDWR)
    try:  # and the folder is locked against other processes meanwhile
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
    unlock_folder(out)


@pytest.mark.skipif(fcntl is None, reason="no advisory locks on this platform")
def test_a_lock_file_that_is_a_link_stops_the_run(tmp_path):
    out = tmp_path / "run"
    unlock_folder(_claim(out).path)
    (out / RUN_LOCK).unlink()
    (out / RUN_LOCK).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DataError, match=re.escape(f"output folder {out} has an unusable")):
        check_run_folder(out, resume=None)
    assert not (tmp_path / "elsewhere").exists()
