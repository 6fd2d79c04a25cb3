"""Measuring memory: the process's peak so far, and a sampler for the peak of one stretch.

On CUDA the allocator's own peak counters are exact; on CPU the resident set is what a user
pays, so `peak_memory_bytes` reads the kernel's high-water mark and `RssSampler` samples the
resident set while a block runs (loading transients before it do not count). Used by the
progress bars, the fine-tune's report, the savings probe and the benchmarks.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory of this process so far: CUDA allocator peak on GPU, max RSS on CPU."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set of this process now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Highest resident set seen while the `with` block runs, sampled every `interval_s`."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, current_rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
