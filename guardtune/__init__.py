"""guardtune: FreezeAsGuard freeze policies for text-to-image diffusion models.

Publishers learn and sign which UNet tensors must stay frozen; end users fine-tune under the
verified policy; platforms audit derivatives. See README.md for the tour and `guardtune --help`.
Importing the package sets nothing process-wide (`guardtune.runtime` is the CLI's).
"""

__version__ = "0.1.0"
