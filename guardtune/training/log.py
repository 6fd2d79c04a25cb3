"""The fine-tune's training log: one row per optimizer step, kept in the run folder.

`train_log.csv` holds step, loss, learning rate, steps per second and memory (the process's
resident set on CPU, the CUDA allocator's bytes on GPU); `loss.png` draws the loss. Both are
written atomically at every checkpoint and at the end, so a resumed run starts from the rows its
checkpoint had and its log reads as one run. Written by the fine-tune recipe.
"""

from __future__ import annotations

import csv
import io
from dataclasses import astuple, dataclass, fields
from pathlib import Path

import torch

from guardtune import atomic
from guardtune.training.memory import current_rss_bytes

LOG_FILE = "train_log.csv"
CURVE_FILE = "loss.png"


@dataclass(frozen=True)
class LogRow:
    step: int  # optimizer steps done, 1 for the first
    loss: float
    lr: float
    it_per_s: float
    memory_bytes: int


def memory_now(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()


class TrainLog:
    def __init__(self, rows: list[LogRow] | None = None) -> None:
        self.rows = list(rows or [])

    @classmethod
    def resumed(cls, folder: Path, step: int) -> TrainLog:
        """The rows of steps up to `step` from the log in `folder` (none if it is unreadable)."""
        path = Path(folder) / LOG_FILE
        try:
            reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
            rows = [_row(record) for record in reader]
        except (OSError, ValueError, KeyError, TypeError):
            return cls()  # the log is a report, not state: a lost one restarts empty
        return cls([row for row in rows if row.step <= step])

    def add(self, row: LogRow) -> None:
        self.rows.append(row)

    def write(self, folder: Path) -> None:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow([f.name for f in fields(LogRow)])
        writer.writerows(astuple(row) for row in self.rows)
        atomic.write_text(Path(folder) / LOG_FILE, text.getvalue())
        if self.rows:
            atomic.write_bytes(Path(folder) / CURVE_FILE, self._curve())

    def _curve(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
        axis.plot([r.step for r in self.rows], [r.loss for r in self.rows], linewidth=1)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        return buffer.getvalue()


def _row(record: dict[str, str]) -> LogRow:
    return LogRow(
        int(record["step"]), float(record["loss"]), float(record["lr"]),
        float(record["it_per_s"]), int(record["memory_bytes"]),
    )  # fmt: skip
