"""The end user's fine-tune recipe (`guardtune finetune`), written out top to bottom.

Stages, in the order `finetune` runs them: claim the output folder (`training/rundir.py`) ->
verify (the policy, before anything is loaded for training) -> load (fp32 master weights) ->
freeze (`enforce/freeze.py`) and arm the guard -> encode (latents and text embeddings, once) ->
adapt (LoRA adapters on unfrozen projections, or the unfrozen UNet tensors) -> resume -> train
(the text-to-image objective of diffusers' training script) with checkpoints and a log -> guard
(no frozen tensor moved) -> write (the pipeline or LoRA file, with its provenance) -> compare
(what freezing saved, measured).

Every random draw of step s comes from a generator seeded with (seed, s, process), so a run
resumed from a checkpoint takes the same batches, noise and timesteps as an uninterrupted one
and ends with the same weights. Runs on one process or under `accelerate launch` (DDP): every
rank verifies the policy and checks the guard; only the main process writes. Imported by the
CLI and the demo only; other recipes use the components in `guardtune.training`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import torch

from guardtune import __version__, atomic
from guardtune.contract import (
    LORA_FILE,
    POLICY_FILE,
    PROVENANCE_FILE,
    PROVENANCE_METADATA_KEY,
    RunProvenance,
)
from guardtune.data import ImageCaptionDataset, scan_folder
from guardtune.distributed import is_main_process
from guardtune.enforce.freeze import FreezeSummary, freeze_for_training, frozen_unet_names
from guardtune.enforce.guard import FrozenDigests
from guardtune.errors import DataError, GuardtuneError, PolicyError
from guardtune.export import check_save_as, save_run_as
from guardtune.models import encoders, load_pipeline
from guardtune.resolve import ModelSource, resolve_model
from guardtune.training.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from guardtune.training.config import (
    TrainConfig,
    attach_lora,
    build_optimizer,
    resolve_mixed_precision,
)
from guardtune.training.encode import EncodedData, data_digest
from guardtune.training.log import LogRow, TrainLog, memory_now
from guardtune.training.loss import diffusion_loss
from guardtune.training.memory import peak_memory_bytes
from guardtune.training.progress import track
from guardtune.training.rundir import check_run_folder, claim
from guardtune.training.savings import SavingsReport, measure_savings
from guardtune.trust.fingerprint import model_tensors
from guardtune.trust.verify import VerifiedPolicy, verify_policy


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
    savings_missing: str | None = None  # why the comparison failed, when it did
    exported: Path | None = None  # the --save-as export beside the output
    processes: int = 1
    ignored_policy: Path | None = None  # the model's own policy, set aside on request
    removed_staging: tuple[str, ...] = ()  # what a killed run left half-written in `out`


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """One independent stream per (step, micro-batch, rank): resuming at any step is exact."""
    mixed = (seed * 1_000_003 + step * 1009 + micro * 101 + rank) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(mixed)


def finetune(
    data: Path,
    out: Path,
    *,
    model: str | ModelSource = "digits",
    model_config: Path | None = None,
    policy: Path | None = None,
    trusted: tuple[Path, ...] = (),
    no_policy: bool = False,
    ignore_shipped_policy: bool = False,
    config: TrainConfig = TrainConfig(),
    caption_column: str = "text",
    instance_prompt: str | None = None,
    class_data: Path | None = None,
    class_prompt: str | None = None,
    resume: str | None = None,
    save_as: str = "diffusers",
    compare: bool = True,
    show_progress: bool = True,
) -> TrainResult:
    """Fine-tune `model` on the images in `data` under its verified policy; write to `out`
    (and, with `save_as` kohya or single-file, that export of the result beside it)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    start_time = time.perf_counter()
    out = Path(out)
    check_save_as(save_as, config.lora)
    run_folder = check_run_folder(out, resume, is_main_process())
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config, torch.cuda.is_available()),
        cpu=not torch.cuda.is_available(),
    )
    device = accelerator.device

    # Verify: nothing is loaded for training before the policy verified (fail closed).
    source: ModelSource = resolve_model(model, model_config)
    ignored = _set_aside(source, policy, no_policy, ignore_shipped_policy)
    verified: VerifiedPolicy | None = None
    if not no_policy:
        # The weights are bound where they are loaded (below), in one read of each byte.
        verified = verify_policy(source, policy, trusted, fingerprint=False)
    scan = scan_folder(data, caption_column, instance_prompt)
    class_scan = scan_folder(class_data, caption_column, class_prompt) if class_data else None

    # Load fp32 master weights from the very bytes the policy binds; freeze; arm the guard.
    expected = verified.policy.binding if verified else None
    pipeline = load_pipeline(source, device=device, dtype=torch.float32, expected=expected)
    unet = pipeline.unet
    frozen = frozen_unet_names(verified.policy if verified else None)
    summary = freeze_for_training(unet, frozen, *encoders(pipeline))
    guard = None
    if verified is not None:
        records = {r.name: r for r in model_tensors(source, ("unet",))["unet"]}
        guard = FrozenDigests.from_policy(
            verified.policy.frozen_tensors, verified.policy.model["unet"].tensors, records
        )
    resolution = config.resolution or unet.config.sample_size * pipeline.vae_scale_factor

    # Encode: the VAE and text encoder are never trained here, so their outputs are cached.
    shown = show_progress and is_main_process()
    encoded = EncodedData(pipeline, ImageCaptionDataset(scan, resolution), device, shown)
    prior = None
    if class_scan is not None:
        prior = EncodedData(pipeline, ImageCaptionDataset(class_scan, resolution), device, shown)
    for module in encoders(pipeline):
        module.to("cpu")

    # Adapt: the unfrozen UNet tensors train, or LoRA adapters on unfrozen projections.
    if config.lora:
        attach_lora(unet, frozen, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if not trainable:
        raise DataError("the policy freezes every UNet tensor: nothing left to fine-tune")
    optimizer = build_optimizer(list(trainable.values()), config)
    lr_schedule = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
        num_training_steps=config.steps,
    )  # fmt: skip
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    unet.train()
    unet, optimizer = accelerator.prepare(unet, optimizer)

    # Resume: only a checkpoint of this very run, verified file by file.
    policy_sha256 = hashlib.sha256(verified.policy.to_json()).hexdigest() if verified else "none"
    run_identity = {
        "config": config.digest(),
        "model": ",".join(f"{k}:{v.root}" for k, v in verified.policy.model.items())
        if verified
        else source.label,
        "policy": policy_sha256,
        "data": data_digest(scan),
    }
    checkpoints = run_folder.checkpoints
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
    log = TrainLog.resumed(out, start_step) if start_step else TrainLog()

    # Train, into the folder this run now claims.
    run_folder = claim(run_folder)
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
                generator = step_generator(config.seed, step, micro, rank)
                latents, states = encoded.batch(config.batch_size, generator)
                sync = micro == config.grad_accum - 1
                # Gradients are all-reduced once per optimizer step, on its last micro-batch.
                skip_sync = accelerator.no_sync(unet) if not sync and world > 1 else None
                with skip_sync or contextlib.nullcontext(), accelerator.autocast():
                    loss = diffusion_loss(
                        unet, noise_scheduler, latents, states, generator, config.snr_gamma
                    )
                    if prior is not None:
                        prior_latents, prior_states = prior.batch(config.batch_size, generator)
                        prior_loss = diffusion_loss(
                            unet, noise_scheduler, prior_latents, prior_states, generator,
                            config.snr_gamma,
                        )  # fmt: skip
                        loss = loss + config.prior_loss_weight * prior_loss
                    accelerator.backward(loss / config.grad_accum)
                total += loss.item() / config.grad_accum
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            optimizer.step()
            used_lr = float(lr_schedule.get_last_lr()[0])
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - began)
            losses.append(total)
            loss_value = total if step == start_step else 0.9 * loss_value + 0.1 * total
            report(loss=loss_value, lr=float(lr_schedule.get_last_lr()[0]))
            done = step + 1
            log.add(LogRow(done, total, used_lr, 1 / step_times[-1], memory_now(device)))
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
                        keep=config.checkpoints_total_limit,
                    )  # fmt: skip
                    log.write(out)
                accelerator.wait_for_everyone()

    # Guard: nothing is written if a frozen tensor moved.
    unet = accelerator.unwrap_model(unet)
    if guard is not None:
        guard.check(unet)

    # Write the pipeline or LoRA file, with the record `audit` checks.
    mode = "lora" if config.lora else "full"
    provenance = RunProvenance(
        tool_version=f"guardtune {__version__}",
        base_model=source.label,
        base_fingerprint={k: v.root for k, v in verified.policy.model.items()}
        if verified
        else None,
        policy_sha256=policy_sha256,
        signer_keyid=verified.signer_keyid if verified else None,
        data_sha256=run_identity["data"],
        config=asdict(config),
        mode=mode,
        frozen_tensor_digests=dict(guard.entries) if guard else {},
        ignored_policy_sha256=hashlib.sha256(ignored.read_bytes()).hexdigest() if ignored else None,
    )
    exported = None
    if accelerator.is_main_process:
        write_output(out, pipeline, unet, config.lora, provenance, verified)
        log.write(out)
        exported = save_run_as(out, save_as)
    accelerator.wait_for_everyone()

    # Compare: the same run with nothing frozen, each in a fresh process.
    savings, savings_missing = None, None
    if compare and accelerator.is_main_process:
        spec = {
            "kind": source.kind, "path": str(source.path),
            "config_dir": str(source.config_dir) if source.config_dir else None,
            "config": asdict(config), "resolution": resolution, "optimizer": config.optimizer,
            "mixed_precision": accelerator.mixed_precision,
        }  # fmt: skip
        try:
            savings = measure_savings(spec, sorted(frozen), summary)
        except GuardtuneError as error:  # the run is written; a failed comparison cannot undo it
            savings_missing = error.one_line()
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
        savings_missing=savings_missing,
        exported=exported,
        processes=world,
        ignored_policy=ignored,
        removed_staging=run_folder.removed,
    )


def _set_aside(
    source: ModelSource, policy: Path | None, no_policy: bool, ignore_shipped: bool
) -> Path | None:
    """The model's own policy, if this run trains without it; PolicyError unless asked to.

    Training a model that ships a policy with none (`--no-policy`), or with a different one
    (`--policy`), is a choice that must be named (`--ignore-shipped-policy`): the run then
    records it in its provenance, and `audit` reports it.
    """
    shipped = source.path / POLICY_FILE if source.kind in ("embedded", "folder") else None
    if shipped is None or not shipped.is_file():
        return None
    if not no_policy:
        if policy is None or not Path(policy).is_file():
            return None  # the shipped policy, or a path that verification refuses by name
        if Path(policy).read_bytes() == shipped.read_bytes():
            return None
    if not ignore_shipped:
        instead = "no policy" if no_policy else f"the policy {policy}"
        raise PolicyError(
            f"{source.label} ships its own policy; training it with {instead} sets that aside",
            hint="pass --ignore-shipped-policy to do so on purpose (the provenance records it)",
        )
    return shipped


def write_output(
    out: Path, pipeline, unet, lora: bool, provenance: RunProvenance,
    verified: VerifiedPolicy | None,
) -> None:  # fmt: skip
    """Write the result beside the run's checkpoints, each file atomically."""
    out.mkdir(parents=True, exist_ok=True)
    provenance_text = provenance.to_json()
    if lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        tensors = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        with atomic.replacing(out / LORA_FILE) as temporary:
            metadata = {"format": "pt", PROVENANCE_METADATA_KEY: provenance_text}
            save_file(tensors, str(temporary), metadata=metadata)
    else:
        pipeline.unet = unet
        for module in encoders(pipeline):
            module.to(unet.device)
        with atomic.staged_dir(out / "model") as staging:
            pipeline.save_pretrained(staging, safe_serialization=True)
            if verified is not None:
                (staging / POLICY_FILE).write_bytes(verified.policy_path.read_bytes())
            (staging / PROVENANCE_FILE).write_text(provenance_text)
    atomic.write_text(out / PROVENANCE_FILE, provenance_text)
