"""The journal of finished runs: filing, reuse across evaluations, and whole-run writes."""

from __future__ import annotations

import json
import os

import pytest

from guardtune.evaluate.journal import Journal, Measurement, Run, RunKey, digest

SETTINGS = {"config": {"steps": [1, 2]}, "code": "c0de", "model": "root", "tasks": {}}


def _run(method: str = "full", variant: str = "v1", seed: int = 0, task: str = "sevens") -> Run:
    measurements = tuple(
        Measurement(method, seed, task, "illegal", step, {"held_out_loss": 0.1 * step + 1 / 3})
        for step in (1, 2)
    )
    return Run(method, variant, seed, task, 0.3, measurements)


def test_a_recorded_run_is_there_again_when_the_journal_is_reopened(tmp_path):
    journal = Journal(tmp_path, SETTINGS)
    assert journal.path == tmp_path / f"journal-{digest(SETTINGS)[:16]}.json"
    assert journal.get(RunKey("full", "v1", 0, "sevens")) is None
    run = _run()
    journal.record(run)
    assert journal.get(run.key) == run
    reopened = Journal(tmp_path, SETTINGS)
    assert reopened.get(RunKey("full", "v1", 0, "sevens")) == run  # floats survive exactly
    assert json.loads(journal.path.read_text())["settings"] == SETTINGS


def test_runs_are_filed_under_their_method_variant_seed_and_task(tmp_path):
    journal = Journal(tmp_path, SETTINGS)
    journal.record(_run("random", "share-0.2"))
    assert journal.get(RunKey("random", "share-0.25", 0, "sevens")) is None  # another variant
    assert journal.get(RunKey("random", "share-0.2", 1, "sevens")) is None  # another seed
    assert journal.get(RunKey("random", "share-0.2", 0, "bold")) is None  # another task
    journal.record(_run("random", "share-0.25"))
    reopened = Journal(tmp_path, SETTINGS)  # both variants kept side by side
    assert reopened.get(RunKey("random", "share-0.2", 0, "sevens")) == _run("random", "share-0.2")
    assert reopened.get(RunKey("random", "share-0.25", 0, "sevens")) is not None


def test_reused_counts_only_runs_journalled_before_the_evaluation_opened_it(tmp_path):
    Journal(tmp_path, SETTINGS).record(_run("full"))
    journal = Journal(tmp_path, SETTINGS)
    plan = [RunKey("full", "v1", 0, "sevens"), RunKey("blocks", "v1", 0, "sevens")]
    journal.record(_run("blocks"))  # trained by this evaluation, so not reused
    assert journal.reused(plan) == 1
    assert journal.finished(plan) == [_run("full"), _run("blocks")]


def test_other_shared_settings_open_another_journal(tmp_path):
    Journal(tmp_path, SETTINGS).record(_run())
    other = Journal(tmp_path, {**SETTINGS, "code": "f1xed"})
    assert other.path != Journal(tmp_path, SETTINGS).path
    assert other.get(_run().key) is None


def test_a_journal_without_runs_reads_as_empty(tmp_path):
    path = Journal(tmp_path, SETTINGS).path
    path.write_text(json.dumps({"settings": SETTINGS}))
    assert Journal(tmp_path, SETTINGS).reused([_run().key]) == 0


def test_a_run_is_journalled_whole_or_not_at_all(tmp_path, monkeypatch):
    journal = Journal(tmp_path, SETTINGS)
    journal.record(_run(seed=0))
    before = journal.path.read_bytes()

    def killed(source, target):
        raise KeyboardInterrupt  # the process dies as the finished journal is put in place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        journal.record(_run(seed=1))
    monkeypatch.undo()
    assert journal.path.read_bytes() == before  # the old journal, intact
    assert [p.name for p in tmp_path.iterdir()] == [journal.path.name]  # no half-written file
    reopened = Journal(tmp_path, SETTINGS)
    assert reopened.get(_run(seed=0).key) == _run(seed=0)
    assert reopened.get(_run(seed=1).key) is None
