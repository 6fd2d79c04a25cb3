"""The training log: rows survive a resume up to the checkpoint's step, and a lost or damaged
log never stops a run."""

from __future__ import annotations

from guardtune.training.log import CURVE_FILE, LOG_FILE, LogRow, TrainLog


def _log(steps: int) -> TrainLog:
    return TrainLog([LogRow(s, 1.0 / s, 1e-4, 2.5, 1000 + s) for s in range(1, steps + 1)])


def test_the_log_and_its_curve_are_written_and_read_back(tmp_path):
    _log(6).write(tmp_path)
    assert (tmp_path / LOG_FILE).read_text().splitlines()[0] == "step,loss,lr,it_per_s,memory_bytes"
    assert (tmp_path / CURVE_FILE).read_bytes().startswith(b"\x89PNG")
    assert TrainLog.resumed(tmp_path, 6).rows == _log(6).rows


def test_a_resumed_run_keeps_only_the_rows_up_to_its_checkpoint(tmp_path):
    _log(8).write(tmp_path)  # the interrupted run logged past its last checkpoint
    assert [row.step for row in TrainLog.resumed(tmp_path, 5).rows] == [1, 2, 3, 4, 5]


def test_a_missing_or_damaged_log_restarts_empty(tmp_path):
    assert TrainLog.resumed(tmp_path, 5).rows == []
    (tmp_path / LOG_FILE).write_text("step,loss\nnot a number,1\n")
    assert TrainLog.resumed(tmp_path, 5).rows == []
