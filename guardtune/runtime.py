"""Process-wide settings of guardtune's own processes: the CLI and the probes it starts.

Importing the library changes nothing in the importing process: a hosting platform that calls
`guardtune.enforce.audit.audit` keeps its environment, and the library passes what it needs
explicitly (`local_files_only=True` on every load). The command line, which owns its process,
calls `configure_process()` before any model library is imported, so the settings below reach
transformers, diffusers and torch when they first read them. Each is a default the user can
still override from the environment.
"""

from __future__ import annotations

import logging
import os

PROCESS_DEFAULTS = {
    # Offline by construction: nothing is fetched from a model hub at run time.
    "HF_HUB_OFFLINE": "1",
    # transformers and diffusers warn at import about optional backends guardtune never uses.
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    # Large CPU tensors on transparent huge pages (torch reads this once, at its first large
    # allocation). Training on CPU allocates every gradient fresh each step, and with 4 KiB
    # pages the page faults cost more than the arithmetic of the mask learner's extra passes:
    # on an SD v1.5-size UNet one mask-update cycle took 1.58x a plain fine-tune's steps with
    # 4 KiB pages and 1.10x with huge pages on both sides (benchmarks/learner.py). Set it to 0
    # to trade that speed for a smaller resident set.
    "THP_MEM_ALLOC_ENABLE": "1",
}


def configure_process() -> None:
    """Apply guardtune's process defaults; call before torch, transformers or diffusers load."""
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # diffusers imports bitsandbytes whenever it is installed; on CPU it logs that its 4-bit
    # kernels are missing, which no guardtune command uses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
