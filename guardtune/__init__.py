"""guardtune: FreezeAsGuard freeze policies for text-to-image diffusion models.

Publishers learn and sign which UNet tensors must stay frozen; end users fine-tune under the
verified policy; platforms audit derivatives. See README.md for the tour and `guardtune --help`.
"""

__version__ = "0.1.0"
