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
