"""The end user's fine-tune recipe (`guardtune finetune`), written out top to bottom.

verify policy -> load model -> freeze (enforce/freeze.py) -> cache latents and text embeddings
-> [LoRA adapters] -> optimizer -> loop (noise-prediction loss, as diffusers' text-to-image
training) with checkpoints and the frozen-tensor guard -> write the pipeline or LoRA file.

Every random draw of step s comes from a generator seeded with (seed, s, process), so a run
resumed from a checkpoint takes the same batches, noise and timesteps as an uninterrupted one
and ends with the same weights. Runs on one process or under `accelerate launch` (DDP): every
rank verifies the policy and checks the guard; only the main process writes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch
import torch.nn.functional as F

from guardtune import __version__, atomic
from guardtune.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from guardtune.data import FolderScan, ImageCaptionDataset, scan_folder
from guardtune.enforce.freeze import (
    FreezeSummary,
    freeze_for_training,
    frozen_unet_names,
    lora_target_modules,
)
from guardtune.enforce.guard import FrozenDigests
from guardtune.errors import DataError
from guardtune.fingerprint import model_tensors
from guardtune.models import ModelSource, load_pipeline, resolve_model
from guardtune.progress import peak_memory_bytes, track
from guardtune.savings import SavingsReport, measure_savings
from guardtune.verify import VerifiedPolicy, verify_policy

PROVENANCE_FILE = "guardtune-provenance.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


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
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.lora else 1e-5)

    def digest(self) -> str:
        """Identity of the options that shape the trajectory (not how often we checkpoint)."""
        relevant = {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TrainResult:
    out: Path
    mode: str  # "full" or "lora"
    steps: int
    resumed_from: int
    final_loss: float
    policy: Path | None
    signer_keyid: str | None
    freeze: FreezeSummary
    step_time_s: float  # median over this run's steps
    peak_memory_bytes: int
    measurement: str
    seconds: float
    losses: tuple[float, ...] = field(default=())
    savings: SavingsReport | None = None
    processes: int = 1


def data_digest(scan: FolderScan) -> str:
    """sha256 over every example's caption and image bytes, in order."""
    digest = hashlib.sha256()
    for example in scan.examples:
        digest.update(example.caption.encode() + b"\x00")
        digest.update(hashlib.sha256(example.image_path.read_bytes()).digest())
    return digest.hexdigest()


def _step_generator(
    seed: int, step: int, micro: int, rank: int, device: torch.device
) -> torch.Generator:
    # One independent stream per (step, micro-batch, rank): resuming at any step is exact.
    mixed = (seed * 1_000_003 + step * 1009 + micro * 101 + rank) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


class EncodedData:
    """VAE latents (mean, std) per example and text embeddings per caption, computed once."""

    def __init__(self, pipeline, dataset: ImageCaptionDataset, device: torch.device) -> None:
        vae, text_encoder, tokenizer = pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
        self.scaling = float(vae.config.scaling_factor)
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(dataset), 32):
                pixels = torch.stack(dataset.pixels[start : start + 32]).to(device, vae.dtype)
                posterior = vae.encode(pixels).latent_dist
                means.append(posterior.mean.float().cpu())
                stds.append(posterior.std.float().cpu())
            captions = sorted(set(dataset.captions))
            ids = tokenizer(
                captions, padding="max_length", max_length=tokenizer.model_max_length,
                truncation=True, return_tensors="pt",
            ).input_ids  # fmt: skip
            embeddings = text_encoder(ids.to(device))[0].float().cpu()
        # The VAE hands back channels-last latents. oneDNN's CPU convolution backward in torch
        # 2.13 segfaults on channels-last inputs once some (not all) conv weights are frozen, so
        # every latent leaves here in the default memory format.
        self.latent_mean = torch.cat(means).contiguous()
        self.latent_std = torch.cat(stds).contiguous()
        row = {c: i for i, c in enumerate(captions)}
        self.caption_row = torch.tensor([row[c] for c in dataset.captions])
        self.captions = captions  # embeddings[i] encodes captions[i]
        self.embeddings = embeddings

    @classmethod
    def concat(cls, parts: list[EncodedData]) -> EncodedData:
        """One set over several encoded with the same model (e.g. all illegal classes)."""
        joined = cls.__new__(cls)
        joined.scaling = parts[0].scaling
        joined.latent_mean = torch.cat([p.latent_mean for p in parts])
        joined.latent_std = torch.cat([p.latent_std for p in parts])
        offsets = list(itertools.accumulate([0] + [p.embeddings.shape[0] for p in parts[:-1]]))
        rows = [p.caption_row + o for p, o in zip(parts, offsets, strict=True)]
        joined.caption_row = torch.cat(rows)
        joined.embeddings = torch.cat([p.embeddings for p in parts])
        joined.captions = [c for p in parts for c in p.captions]
        return joined

    def __len__(self) -> int:
        return int(self.latent_mean.shape[0])

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self), (size,), generator=generator)
        noise = torch.randn(self.latent_mean[idx].shape, generator=generator)
        latents = (self.latent_mean[idx] + self.latent_std[idx] * noise) * self.scaling
        return latents, self.embeddings[self.caption_row[idx]]


def denoising_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity on v-prediction models."""
    if scheduler.config.prediction_type == "v_prediction":  # SD 2.x-style models
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def diffusion_loss(
    unet, scheduler, latents: torch.Tensor, states: torch.Tensor, generator: torch.Generator,
    snr_gamma: float | None,
) -> torch.Tensor:  # fmt: skip
    """diffusers' text-to-image objective, with optional Min-SNR-gamma weighting."""
    device = next(unet.parameters()).device
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator)  # fmt: skip
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = denoising_target(scheduler, latents, noise, timesteps)
    prediction = unet(noisy.to(device), timesteps.to(device), states.to(device)).sample.float()
    target = target.to(device)
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).to(device)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = (
        weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
    )
    per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_example * weights).mean()


def build_optimizer(
    parameters: list[torch.nn.Parameter], config: TrainConfig, device: torch.device
):
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=1e-2)
    if config.optimizer != "adamw":
        raise DataError(f"unknown optimizer {config.optimizer!r}; choose adamw or adamw8bit")
    # The fused kernel is ~4x faster on CPU and the fastest on CUDA.
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-2, fused=True)


def _mixed_precision(config: TrainConfig, cuda: bool) -> str:
    if config.mixed_precision == "auto":
        if not cuda:
            return "no"  # bf16 autocast is 8-24x slower than fp32 on CPU
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise DataError("--mixed-precision must be auto, no, bf16 or fp16")
    return config.mixed_precision


def finetune(
    data: Path,
    out: Path,
    model: str = "digits",
    model_config: Path | None = None,
    policy: Path | None = None,
    trusted: tuple[Path, ...] = (),
    no_policy: bool = False,
    config: TrainConfig = TrainConfig(),
    caption_column: str = "text",
    instance_prompt: str | None = None,
    class_data: Path | None = None,
    class_prompt: str | None = None,
    resume: str | None = None,
    compare: bool = True,
    show_progress: bool = True,
) -> TrainResult:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    start_time = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "checkpoints").is_dir():
        raise DataError(
            f"output folder {out} exists and is not a guardtune run", hint="choose a new --out"
        )
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(config, torch.cuda.is_available()),
        cpu=not torch.cuda.is_available(),
    )
    device = accelerator.device

    # 1. Trust: nothing is loaded for training before the policy verified (fail closed).
    source: ModelSource = resolve_model(model, model_config)
    verified: VerifiedPolicy | None = None
    if not no_policy:
        verified = verify_policy(source, policy, trusted)
    scan = scan_folder(data, caption_column, instance_prompt)
    class_scan = scan_folder(class_data, caption_column, class_prompt) if class_data else None

    # 2. Model, fp32 master weights; frozen tensors and the guard that watches them.
    pipeline = load_pipeline(source, device=device, dtype=torch.float32)
    unet = pipeline.unet
    frozen = frozen_unet_names(verified.policy if verified else None)
    summary = freeze_for_training(unet, frozen, pipeline.vae, pipeline.text_encoder)
    guard = None
    if verified is not None:
        records = {r.name: r for r in model_tensors(source, ("unet",))["unet"]}
        guard = FrozenDigests.from_policy(
            verified.policy.frozen_tensors, verified.policy.model["unet"].tensors, records
        )
    resolution = config.resolution or unet.config.sample_size * pipeline.vae_scale_factor

    # 3. VAE and text encoder are never trained here: encode the data once.
    encoded = EncodedData(pipeline, ImageCaptionDataset(scan, resolution), device)
    prior = (
        EncodedData(pipeline, ImageCaptionDataset(class_scan, resolution), device)
        if class_scan
        else None
    )
    pipeline.vae.to("cpu")
    pipeline.text_encoder.to("cpu")

    # 4. What trains: the unfrozen UNet tensors, or LoRA adapters on unfrozen projections.
    if config.lora:
        from peft import LoraConfig

        torch.manual_seed(config.seed)  # adapter initialisation is part of the reproducible run
        targets = lora_target_modules(unet, frozen)
        if not targets:
            raise DataError(
                "the policy freezes every attention projection: nothing for LoRA to adapt"
            )
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=config.rank,
                lora_alpha=config.rank,
                init_lora_weights="gaussian",
                target_modules=targets,
            )
        )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if not trainable:
        raise DataError("the policy freezes every UNet tensor: nothing left to fine-tune")
    optimizer = build_optimizer(list(trainable.values()), config, device)
    from diffusers.optimization import get_scheduler

    lr_schedule = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
    )  # fmt: skip
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    unet.train()
    unet, optimizer = accelerator.prepare(unet, optimizer)

    # 5. Resume: only a checkpoint of this very run, verified file by file.
    run_identity = {
        "config": config.digest(),
        "model": ",".join(f"{k}:{v.root}" for k, v in verified.policy.model.items())
        if verified
        else source.label,
        "policy": hashlib.sha256(verified.policy.to_json()).hexdigest() if verified else "none",
        "data": data_digest(scan),
    }
    checkpoints = out / "checkpoints"
    start_step = 0
    if resume is not None:
        checkpoint = load_checkpoint(
            resolve_resume(checkpoints, resume), run_identity, set(trainable), frozen
        )
        with torch.no_grad():
            for name, tensor in checkpoint.trainable.items():
                trainable[name].copy_(tensor.to(trainable[name].device))
        optimizer.load_state_dict(checkpoint.optimizer)
        lr_schedule.load_state_dict(checkpoint.scheduler)
        start_step = checkpoint.step

    # 6. The loop.
    rank, world = accelerator.process_index, accelerator.num_processes
    step_times: list[float] = []
    losses: list[float] = []
    loss_value = float("nan")
    enabled = show_progress and accelerator.is_main_process
    with track("fine-tune", config.steps, device, enabled) as report:
        if start_step:
            report(advance=start_step)
        for step in range(start_step, config.steps):
            began = time.perf_counter()
            total = 0.0
            for micro in range(config.grad_accum):
                generator = _step_generator(config.seed, step, micro, rank, device)
                latents, states = encoded.batch(config.batch_size, generator)
                sync = micro == config.grad_accum - 1
                context = accelerator.no_sync(unet) if not sync and world > 1 else _nullcontext()
                with context, accelerator.autocast():
                    loss = diffusion_loss(
                        unet, noise_scheduler, latents, states, generator, config.snr_gamma
                    )
                    if prior is not None:
                        prior_latents, prior_states = prior.batch(config.batch_size, generator)
                        prior_loss = diffusion_loss(
                            unet,
                            noise_scheduler,
                            prior_latents,
                            prior_states,
                            generator,
                            config.snr_gamma,
                        )
                        loss = loss + config.prior_loss_weight * prior_loss
                    accelerator.backward(loss / config.grad_accum)
                total += loss.item() / config.grad_accum
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - began)
            losses.append(total)
            loss_value = total if step == start_step else 0.9 * loss_value + 0.1 * total
            report(loss=loss_value, lr=float(lr_schedule.get_last_lr()[0]))
            done = step + 1
            if (
                config.checkpoint_every
                and done % config.checkpoint_every == 0
                and done < config.steps
            ):
                if guard is not None:
                    guard.check(accelerator.unwrap_model(unet))
                if accelerator.is_main_process:
                    save_checkpoint(
                        checkpoints, done, run_identity,
                        {n: p.detach() for n, p in trainable.items()},
                        optimizer.state_dict(), lr_schedule.state_dict(),
                    )  # fmt: skip
                accelerator.wait_for_everyone()

    # 7. The guard, then the output: nothing is written if a frozen tensor moved.
    unet = accelerator.unwrap_model(unet)
    if guard is not None:
        guard.check(unet)
    mode = "lora" if config.lora else "full"
    provenance = {
        "tool_version": f"guardtune {__version__}",
        "base_model": source.label,
        "base_fingerprint": {k: v.root for k, v in verified.policy.model.items()}
        if verified
        else None,
        "policy_sha256": run_identity["policy"],
        "signer_keyid": verified.signer_keyid if verified else None,
        "data_sha256": run_identity["data"],
        "config": asdict(config),
        "mode": mode,
        "frozen_tensor_digests": dict(guard.entries) if guard else {},
    }
    if accelerator.is_main_process:
        _write_output(out, pipeline, unet, config, provenance, verified)
    accelerator.wait_for_everyone()
    savings = None
    if compare and accelerator.is_main_process:
        spec = {
            "kind": source.kind, "path": str(source.path),
            "config_dir": str(source.config_dir) if source.config_dir else None,
            "config": asdict(config), "resolution": resolution, "optimizer": config.optimizer,
            "mixed_precision": accelerator.mixed_precision,
        }  # fmt: skip
        savings = measure_savings(spec, sorted(frozen), summary)
    timed = step_times[1:] or step_times  # the first step pays for lazy initialisation
    return TrainResult(
        out=out,
        mode=mode,
        steps=config.steps,
        resumed_from=start_step,
        final_loss=loss_value,
        policy=verified.policy_path if verified else None,
        signer_keyid=verified.signer_keyid if verified else None,
        freeze=summary,
        step_time_s=median(timed) if timed else 0.0,
        peak_memory_bytes=peak_memory_bytes(device),
        measurement="cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        seconds=time.perf_counter() - start_time,
        losses=tuple(losses),
        savings=savings,
        processes=world,
    )


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _write_output(out: Path, pipeline, unet, config: TrainConfig, provenance: dict[str, Any],
                  verified: VerifiedPolicy | None) -> None:  # fmt: skip
    """Write the result beside the run's checkpoints, each file atomically."""
    out.mkdir(parents=True, exist_ok=True)
    provenance_text = json.dumps(provenance, indent=2, sort_keys=True) + "\n"
    if config.lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        tmp = out / f".{LORA_FILE}.partial"
        save_file(
            tensors, str(tmp), metadata={"format": "pt", "guardtune_provenance": provenance_text}
        )
        tmp.replace(out / LORA_FILE)
    else:
        model_dir = out / "model"
        pipeline.unet = unet
        pipeline.vae.to(unet.device)
        pipeline.text_encoder.to(unet.device)
        with atomic.staged_dir(model_dir) as staging:
            pipeline.save_pretrained(staging, safe_serialization=True)
            if verified is not None:
                (staging / "guardtune-policy.json").write_bytes(verified.policy_path.read_bytes())
            (staging / PROVENANCE_FILE).write_text(provenance_text)
    atomic.write_text(out / PROVENANCE_FILE, provenance_text)
