"""The evaluation journal: every finished (method, seed, task) run, on disk as soon as it ends.

`evaluate` (run.py) opens the journal of its shared settings (what decides every run's numbers,
whichever method it is), skips the runs it already holds and records each new one whole. A
journal's file is named by the digest of those settings; within it, each run is filed under its
method, the digest of that method's own settings (its variant), its seed and its task. So a
rerun of a killed (or finished) evaluation picks up its runs, a wider one reuses those it
shares, and a changed one starts a journal of its own. This module owns the file's name, its
format and the records in it; run.py decides what the settings are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from guardtune import atomic


def digest(value) -> str:
    """SHA-256 of a JSON-able value in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Measurement:
    """One run's numbers at one checkpoint of the user's fine-tune."""

    method: str
    seed: int
    task: str
    kind: str
    step: int
    metrics: dict[str, float]


class RunKey(NamedTuple):
    """Where a run is filed: `variant` is the digest of its method's own settings."""

    method: str
    variant: str
    seed: int
    task: str


@dataclass(frozen=True)
class Run:
    """One finished run: the user's fine-tune of one task after one method's defence."""

    method: str
    variant: str
    seed: int
    task: str
    frozen_share: float  # of the UNet's parameters, under this run's defence
    measurements: tuple[Measurement, ...]

    @property
    def key(self) -> RunKey:
        return RunKey(self.method, self.variant, self.seed, self.task)

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "variant": self.variant,
            "seed": self.seed,
            "task": self.task,
            "frozen_share": self.frozen_share,
            "measurements": [dataclasses.asdict(m) for m in self.measurements],
        }

    @classmethod
    def from_json(cls, record: dict) -> Run:
        return cls(
            method=record["method"],
            variant=record["variant"],
            seed=record["seed"],
            task=record["task"],
            frozen_share=record["frozen_share"],
            measurements=tuple(Measurement(**m) for m in record["measurements"]),
        )


class Journal:
    """The finished runs under one set of shared settings, read once and rewritten per run."""

    def __init__(self, folder: Path, settings: dict) -> None:
        self.settings = settings
        self.path = folder / f"journal-{digest(settings)[:16]}.json"
        # A journal of an older format, without "runs", is read as empty.
        saved = json.loads(self.path.read_text()).get("runs", []) if self.path.is_file() else []
        self._runs = {run.key: run for run in map(Run.from_json, saved)}
        self._saved = frozenset(self._runs)

    def get(self, key: RunKey) -> Run | None:
        return self._runs.get(key)

    def finished(self, keys: Iterable[RunKey]) -> list[Run]:
        """The runs of these keys, every one of which has been journalled."""
        return [self._runs[key] for key in keys]

    def reused(self, keys: Iterable[RunKey]) -> int:
        """How many of these runs were journalled before this evaluation opened the journal."""
        return sum(key in self._saved for key in keys)

    def record(self, run: Run) -> None:
        """File a finished run and rewrite the journal: a run is on disk whole, or not at all."""
        self._runs[run.key] = run
        runs = [r.to_json() for r in self._runs.values()]
        atomic.write_json(self.path, {"settings": self.settings, "runs": runs})
