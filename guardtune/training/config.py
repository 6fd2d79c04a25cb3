"""The fine-tune's options and the pieces built from them: optimizer, precision, LoRA adapters.

`TrainConfig` is what `guardtune finetune` takes; `build_optimizer`, `resolve_mixed_precision`
and `attach_lora` turn it into objects. The recipe and the savings probe both build their run
from here, so the probe measures exactly what the recipe trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from guardtune.enforce.freeze import lora_target_modules
from guardtune.errors import DataError, UsageError

# The learning-rate schedules of diffusers' `get_scheduler` (its SchedulerType), spelled here so
# that a wrong name is refused before diffusers is imported; a test keeps the two in step.
LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "piecewise_constant",
)  # fmt: skip
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class TrainConfig:
    """The options of `guardtune finetune`; defaults follow diffusers' training scripts."""

    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # 1e-5 full fine-tune, 1e-4 LoRA
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    resolution: int | None = None  # the model's native size
    seed: int = 0
    lora: bool = False
    rank: int = 4
    snr_gamma: float | None = None
    prior_loss_weight: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # bf16/fp16 on GPU, fp32 ("no") on CPU
    optimizer: str = "adamw"  # or adamw8bit (bitsandbytes)
    max_grad_norm: float = 1.0  # 0: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    checkpoint_every: int = 0
    checkpoints_total_limit: int = 2  # 0: keep every checkpoint

    def __post_init__(self) -> None:
        """Choices are checked when the options are made, before anything is loaded (exit 2)."""
        for option, value, choices in (
            ("--lr-scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("--mixed-precision", self.mixed_precision, MIXED_PRECISION),
            ("--optimizer", self.optimizer, OPTIMIZERS),
        ):
            if value not in choices:
                raise UsageError(f"{option} must be one of {', '.join(choices)}, not {value!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora else 1e-5)

    def digest(self) -> str:
        """Identity of the options that shape the trajectory (not how we checkpoint)."""
        bookkeeping = ("checkpoint_every", "checkpoints_total_limit")
        relevant = {k: v for k, v in asdict(self).items() if k not in bookkeeping}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def build_optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig):
    lr, betas = config.learning_rate, (config.adam_beta1, config.adam_beta2)
    decay, eps = config.adam_weight_decay, config.adam_epsilon
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=lr, betas=betas, weight_decay=decay, eps=eps)
    # The fused kernel is ~4x faster on CPU and the fastest on CUDA.
    return torch.optim.AdamW(
        parameters, lr=lr, betas=betas, weight_decay=decay, eps=eps, fused=True
    )


def resolve_mixed_precision(config: TrainConfig, cuda: bool) -> str:
    """accelerate's mixed-precision mode for this run: "no", "bf16" or "fp16"."""
    if config.mixed_precision == "auto":
        if not cuda:
            return "no"  # bf16 autocast is 8-24x slower than fp32 on CPU
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return config.mixed_precision


def attach_lora(unet, frozen: set[str], config: TrainConfig) -> list[str]:
    """Freeze the UNet and wrap its unfrozen attention projections in LoRA adapters.

    An adapter on a frozen weight would undo the freeze, so those projections are left out
    (`lora_target_modules`); a policy that freezes all of them leaves LoRA nothing to adapt,
    which is a DataError. The adapters' initialisation is seeded: it is part of the
    reproducible run. Returns the adapted module names.
    """
    from peft import LoraConfig

    torch.manual_seed(config.seed)
    targets = lora_target_modules(unet, frozen)
    if not targets:
        raise DataError("the policy freezes every attention projection: nothing for LoRA to adapt")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=config.rank,
            lora_alpha=config.rank,
            init_lora_weights="gaussian",
            target_modules=targets,
        )
    )
    return targets
