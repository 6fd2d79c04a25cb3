"""Which process of a distributed launch this is, answered without importing accelerate.

`accelerate launch` (multi-process) and `torchrun` start every rank with the whole command and
set `RANK` in each; a plain `guardtune ...` sets nothing and is the only, hence the main,
process. Every rank verifies the policy and takes part in the work; only the main process
reports and writes. The CLI asks before an Accelerator exists (and without paying for the
import), and `publish` asks after learning, so both read the same variable here.
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """True on rank 0 of a distributed launch, and in a process that was not launched as one."""
    return os.environ.get("RANK", "0") == "0"
