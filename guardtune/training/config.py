"""The fine-tune's options and the pieces built from them: optimizer, precision, LoRA adapters.

`TrainConfig` is what `guardtune finetune` takes; `build_optimizer`, `resolve_mixed_precision`
and `attach_lora` turn it into objects. The recipe and the savings probe both build their run
from here, so the probe measures exactly what the recipe trains.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction

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
REPORT_TO = ("none", "tensorboard", "wandb")  # accelerate's trackers that guardtune serves
DEFAULT_STEPS = 200


@dataclass(frozen=True)
class TrainConfig:
    """The options of `guardtune finetune`; defaults follow diffusers' training scripts."""

    steps: int | None = None  # optimizer steps; DEFAULT_STEPS unless `epochs` is given
    epochs: int | None = None  # passes over the data instead of a step count
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # 1e-5 full fine-tune, 1e-4 LoRA
    lr_scheduler: str = "constant"
    warmup_steps: int = 500  # diffusers' default; "constant" (the default schedule) has none
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
    random_flip: bool = False  # mirror each draw with probability 1/2
    random_crop: bool = False  # crop the square at a random place (else the centre)
    enable_bucket: bool = False  # aspect-ratio buckets: train each image near its own shape
    min_bucket_reso: int | None = None  # a bucket's shortest side (default: resolution / 2)
    max_bucket_reso: int | None = None  # a bucket's longest side (default: 2 x resolution)
    bucket_reso_steps: int | None = None  # side granularity (default: what the UNet divides)
    caption_dropout_rate: float = 0.0  # chance that a draw is trained on the empty caption
    noise_offset: float = 0.0  # per-channel offset added to the noise (darker/brighter images)
    use_ema: bool = False  # write the exponential moving average of the trained weights
    ema_decay: float = 0.9999
    checkpoint_every: int = 0
    checkpoints_total_limit: int = 2  # 0: keep every checkpoint
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int = 100  # sample the validation prompts every N steps (and at the end)
    num_validation_images: int = 4  # per prompt
    report_to: str = "none"  # or tensorboard, wandb: accelerate's trackers

    def __post_init__(self) -> None:
        """Choices are checked when the options are made, before anything is loaded (exit 2)."""
        for option, value, choices in (
            ("--lr-scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("--mixed-precision", self.mixed_precision, MIXED_PRECISION),
            ("--optimizer", self.optimizer, OPTIMIZERS),
            ("--report-to", self.report_to, REPORT_TO),
        ):
            if value not in choices:
                raise UsageError(f"{option} must be one of {', '.join(choices)}, not {value!r}")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("--steps and --epochs are alternatives: give one")
        for option, count in (("--steps", self.steps), ("--epochs", self.epochs)):
            if count is not None and count < 1:
                raise UsageError(f"{option} must be at least 1, not {count}")
        if not 0 <= self.caption_dropout_rate < 1:
            raise UsageError(
                f"--caption-dropout-rate must be in [0, 1), not {self.caption_dropout_rate}"
            )
        low, high = self.min_bucket_reso, self.max_bucket_reso
        if low is not None and high is not None and low > high:
            raise UsageError(f"--min-bucket-reso {low} is above --max-bucket-reso {high}")
        if not 0 < self.ema_decay < 1:
            raise UsageError(f"--ema-decay must be in (0, 1), not {self.ema_decay}")

    def total_steps(self, batches_per_epoch: Fraction, processes: int = 1) -> int:
        """Optimizer steps of the run: `steps`, or enough for `epochs` passes over the data
        (each step takes grad_accum batches on every process)."""
        if self.epochs is None:
            return self.steps if self.steps is not None else DEFAULT_STEPS
        return max(1, math.ceil(self.epochs * batches_per_epoch / (self.grad_accum * processes)))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora else 1e-5)

    def digest(self) -> str:
        """Identity of the options that shape the trajectory (not how we checkpoint)."""
        bookkeeping = (
            "checkpoint_every", "checkpoints_total_limit", "validation_prompts",
            "validation_steps", "num_validation_images", "report_to",
        )  # fmt: skip
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
