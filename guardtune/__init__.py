"""guardtune: FreezeAsGuard freeze policies for text-to-image diffusion models.

Publishers learn and sign which UNet tensors must stay frozen; end users fine-tune under the
verified policy; platforms audit derivatives. See README.md for the tour and `guardtune --help`.
"""

import logging
import os

__version__ = "0.1.0"

# Offline by construction, and quiet: transformers, diffusers and bitsandbytes warn at import
# about optional backends (torchvision, 4-bit CPU kernels) that guardtune never uses. Users can
# still override every one of these from the environment.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# Large CPU tensors on transparent huge pages (torch reads this once, at its first large
# allocation, so it must be set before any model is built). Training on CPU allocates every
# gradient fresh each step, and with 4 KiB pages the page faults cost more than the arithmetic
# of the mask learner's extra passes: on an SD v1.5-size UNet, before the learner stepped in
# backward, one mask-update cycle took 1.58x a plain fine-tune's steps with 4 KiB pages and
# 1.10x with huge pages on both sides (benchmarks/learner.py).
# Set THP_MEM_ALLOC_ENABLE=0 to trade that speed for a smaller resident set.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
