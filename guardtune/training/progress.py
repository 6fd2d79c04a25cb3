"""Rich progress bars for long loops: loss, iterations per second and memory, in one place.

Used by every training loop (embedded build, fine-tune recipe, mask learner) so that all long
work looks the same. Memory is the peak resident set on CPU and peak allocated memory on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from guardtune.training.memory import peak_memory_bytes

console = Console(stderr=True)


class StepReporter(Protocol):
    def __call__(self, advance: int = 1, **fields: float) -> None: ...


@contextmanager
def track(
    description: str, total: int, device: torch.device | None = None, enabled: bool = True
) -> Iterator[StepReporter]:
    """A progress bar; call the yielded function once per step with the numbers to show.

    Where stderr is not a terminal (CI logs, background runs) a plain line is printed at every
    tenth of the way instead, so logs still show loss and speed.
    """
    if enabled and not console.is_terminal:
        yield _line_reporter(description, total, device)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, stats="")

        def report(advance: int = 1, **fields: float) -> None:
            speed = progress.tasks[task].speed or 0.0
            shown = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
            memory_mib = peak_memory_bytes(device) / 2**20
            stats = f"{shown}  {speed:.2f} it/s  {memory_mib:.0f} MiB"
            progress.update(task, advance=advance, stats=stats)

        yield report


def _line_reporter(description: str, total: int, device: torch.device | None) -> StepReporter:
    import time

    start = time.perf_counter()
    done = 0
    every = max(1, total // 10)

    def report(advance: int = 1, **fields: float) -> None:
        nonlocal done
        done += advance
        if done % every and done != total:
            return
        speed = done / max(time.perf_counter() - start, 1e-9)
        shown = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        memory_mib = peak_memory_bytes(device) / 2**20
        console.print(
            f"{description} {done}/{total}  {shown}  {speed:.2f} it/s  {memory_mib:.0f} MiB",
            highlight=False,
        )

    return report
