"""Measuring memory: the process's peak so far, and a sampler for the peak of one stretch.

On CUDA the allocator's own peak counters are exact; on CPU the resident set is what a user
pays, so `peak_memory_bytes` reads the kernel's high-water mark and `RssSampler` gives the peak
of the resident set while a block runs, and of each stretch of it (loading transients before it
do not count): from that mark, reset where Linux allows, else by sampling. Used by the progress
bars, the fine-tune's report, the savings probe and the benchmarks.
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


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set of this process to now; False where it cannot.

    Linux (3.19 and later) resets it on writing 5 to /proc/self/clear_refs. `peak_memory_bytes`
    reads the same mark on Linux, so afterwards it reports the peak since the reset.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """The kernel's peak resident set of this process (VmHWM), since start or the last reset."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmHWM")


class RssSampler:
    """Highest resident set while the `with` block runs, and of each stretch of it (`restart`).

    Where the kernel's high-water mark can be reset (Linux), it is reset when the block starts
    and read when it ends: exact, however busy the machine is. Elsewhere a thread samples the
    resident set every `interval_s`, which can miss a short peak when the machine is busy and
    the sampling thread is not scheduled in time.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.peak = current_rss_bytes()  # of the whole block
        self.exact = False
        self._stretch = self.peak  # since the last restart, when sampling
        self._interval_s = interval_s
        self._lock = threading.Lock()  # restart() must not lose a sample taken meanwhile
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            with self._lock:
                self._stretch = max(self._stretch, current_rss_bytes())
                self.peak = max(self.peak, self._stretch)

    def restart(self) -> int:
        """The peak since the last restart (or the start); the next stretch starts from now.

        Lets one sampler give the peak of each training step, so a report can say how much the
        peak varies from step to step, not only its maximum.
        """
        if self.exact:
            stretch = peak_rss_bytes()
            reset_peak_rss()
        else:
            now = current_rss_bytes()
            with self._lock:
                stretch = max(self._stretch, now)
                self._stretch = now
        self.peak = max(self.peak, stretch)
        return stretch

    def __enter__(self) -> RssSampler:
        self.exact = reset_peak_rss()
        self.peak = self._stretch = current_rss_bytes()
        if not self.exact:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.exact:
            self.peak = max(self.peak, peak_rss_bytes())  # left as it is for whoever reads next
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, self._stretch, current_rss_bytes())
