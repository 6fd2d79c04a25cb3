"""The end user's fine-tune recipe (`guardtune finetune`), written out top to bottom.

Stages, in the order `finetune` runs them: claim the output folder (`training/rundir.py`) ->
verify (the policy, before anything is loaded for training) -> load (fp32 master weights) ->
freeze (`enforce/freeze.py`) and arm the guard -> encode (latents and text embeddings, once,
into the on-disk cache of `training/encode.py`) -> adapt (LoRA adapters on unfrozen
projections, or the unfrozen UNet tensors) -> resume -> train (the text-to-image objective of
diffusers' training script, with its augmentations: flip, crop, caption dropout, noise offset,
EMA) with checkpoints, a log, validation grids and trackers -> guard (no frozen tensor moved)
-> write (the pipeline or LoRA file, with its provenance) -> compare (what freezing saved,
measured).

Examples are drawn in epochs (`training/order.py`) and every other random draw of step s comes
from a generator seeded with (seed, s, process), so a run resumed from a checkpoint takes the
same batches, noise and timesteps as an uninterrupted one and ends with the same weights. Runs
on one process or under `accelerate launch` (DDP): every rank verifies the policy and checks
the guard; only the main process writes. Imported by the CLI and the demo only; other recipes
use the components in `guardtune.training`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

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
from guardtune.enforce.freeze import (
    FreezeSummary,
    freeze_for_training,
    frozen_unet_names,
    frozen_unet_rows,
    lora_row_hold,
)
from guardtune.enforce.guard import FrozenDigests
from guardtune.errors import DataError, GuardtuneError, PolicyError, UsageError
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
from guardtune.training.ema import EmaWeights
from guardtune.training.encode import EncodedData, data_digest
from guardtune.training.log import LogRow, TrainLog, memory_now
from guardtune.training.loss import diffusion_loss
from guardtune.training.memory import peak_memory_bytes
from guardtune.training.order import BucketOrder, EpochOrder, batch_number, bucket_sizes
from guardtune.training.progress import console, track
from guardtune.training.rundir import RUN_CONFIG, check_run_folder, claim, unlock_folder
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
    validation: tuple[Path, ...] = ()  # the validation grids, in step order
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
    settings: str | None = None,
    cache: bool = True,
    cache_dir: Path | None = None,
) -> TrainResult:
    """Fine-tune `model` on the images in `data` under its verified policy; write to `out`
    (and, with `save_as` kohya or single-file, that export of the result beside it).

    `settings` is the run's effective configuration as TOML text (the CLI's options, file and
    command line merged); it is written into `out` when the run claims it. Encodings of the
    data are cached in `cache_dir` (default: `encode.default_cache_dir()`), or, without
    `cache`, kept in temporary files for this run only.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    start_time = time.perf_counter()
    out = Path(out)
    check_save_as(save_as, config.lora)
    check_tracker(config.report_to)
    run_folder = check_run_folder(out, resume, is_main_process())
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(config, torch.cuda.is_available()),
        cpu=not torch.cuda.is_available(),
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=out / "logs",
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
    rows = frozen_unet_rows(verified.policy if verified else None)
    summary, hold = freeze_for_training(unet, frozen, *encoders(pipeline), rows=rows)
    guard = None
    if verified is not None:
        records = {r.name: r for r in model_tensors(source, ("unet",))["unet"]}
        guard = FrozenDigests.from_policy(
            verified.policy.frozen_tensors, verified.policy.model["unet"].tensors, records,
            verified.policy.frozen_rows,
        )  # fmt: skip
    resolution = config.resolution or unet.config.sample_size * pipeline.vae_scale_factor

    # Encode: the VAE and text encoder are never trained here, so their outputs are cached.
    shown = show_progress and is_main_process()
    buckets = bucket_options(config, pipeline, resolution) if config.enable_bucket else None
    encode = functools.partial(
        EncodedData, pipeline, device=device, show_progress=shown, cache=cache,
        cache_dir=cache_dir, flip=config.random_flip, random_crop=config.random_crop,
        buckets=buckets,
    )  # fmt: skip
    dropped = ("",) if config.caption_dropout_rate else ()
    encoded = encode(ImageCaptionDataset(scan, resolution), extra_captions=dropped)
    prior = None
    if class_scan is not None:
        prior = encode(ImageCaptionDataset(class_scan, resolution))
    for module in encoders(pipeline):
        if not (config.random_crop and module is pipeline.vae):  # random crops encode per draw
            module.to("cpu")
    order = make_order(encoded, config, 0)
    prior_order = make_order(prior, config, 1) if prior is not None else None
    total_steps = config.total_steps(order.batches_per_epoch, accelerator.num_processes)

    # Adapt: the unfrozen UNet tensors train, or LoRA adapters on unfrozen projections.
    if config.lora:
        attach_lora(unet, frozen, config)
        hold = lora_row_hold(unet, rows)  # the base weights no longer train: the adapters do
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if not trainable:
        raise DataError("the policy freezes every UNet tensor: nothing left to fine-tune")
    optimizer = build_optimizer(list(trainable.values()), config)
    lr_schedule = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
        num_training_steps=total_steps,
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
    ema = EmaWeights(trainable, config.ema_decay) if config.use_ema else None
    if resume is not None:
        checkpoint = load_checkpoint(
            resolve_resume(checkpoints, resume), run_identity, set(trainable), frozen,
            ema=ema is not None,
        )  # fmt: skip
        with torch.no_grad():
            for name, tensor in checkpoint.trainable.items():
                trainable[name].copy_(tensor.to(trainable[name].device))
        optimizer.load_state_dict(checkpoint.optimizer)
        lr_schedule.load_state_dict(checkpoint.scheduler)
        start_step = checkpoint.step
        if ema is not None and checkpoint.ema is not None:
            ema.load(checkpoint.ema, start_step)
        hold.after_step()  # a checkpoint's frozen rows are not taken on trust
    log = TrainLog.resumed(out, start_step) if start_step else TrainLog()

    # Train, into the folder this run now claims.
    run_folder = claim(run_folder)
    if settings is not None and accelerator.is_main_process:
        atomic.write_text(out / RUN_CONFIG, settings)
    if config.report_to != "none":
        accelerator.init_trackers("guardtune-finetune", config=tracker_config(config))
    rank, world = accelerator.process_index, accelerator.num_processes
    step_times: list[float] = []
    losses: list[float] = []
    grids: list[Path] = []
    loss_value = float("nan")
    enabled = show_progress and accelerator.is_main_process
    with track("fine-tune", total_steps, device, enabled) as report:
        if start_step:
            report(advance=start_step)
        for step in range(start_step, total_steps):
            began = time.perf_counter()
            total = 0.0
            for micro in range(config.grad_accum):
                generator = step_generator(config.seed, step, micro, rank)
                number = batch_number(step, micro, rank, config.grad_accum, world)
                index = order.batch(number)
                latents, states = encoded.take(index, generator, config.caption_dropout_rate)
                sync = micro == config.grad_accum - 1
                # Gradients are all-reduced once per optimizer step, on its last micro-batch.
                skip_sync = accelerator.no_sync(unet) if not sync and world > 1 else None
                with skip_sync or contextlib.nullcontext(), accelerator.autocast():
                    loss = diffusion_loss(
                        unet, noise_scheduler, latents, states, generator, config.snr_gamma,
                        config.noise_offset,
                    )  # fmt: skip
                    if prior is not None and prior_order is not None:
                        prior_index = prior_order.batch(number)
                        prior_latents, prior_states = prior.take(prior_index, generator)
                        prior_loss = diffusion_loss(
                            unet, noise_scheduler, prior_latents, prior_states, generator,
                            config.snr_gamma, config.noise_offset,
                        )  # fmt: skip
                        loss = loss + config.prior_loss_weight * prior_loss
                    accelerator.backward(loss / config.grad_accum)
                total += loss.item() / config.grad_accum
            hold.before_step()
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            optimizer.step()
            hold.after_step()
            if ema is not None:
                ema.update(trainable)
            used_lr = float(lr_schedule.get_last_lr()[0])
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - began)
            losses.append(total)
            loss_value = total if step == start_step else 0.9 * loss_value + 0.1 * total
            report(loss=loss_value, lr=float(lr_schedule.get_last_lr()[0]))
            done = step + 1
            log.add(LogRow(done, total, used_lr, 1 / step_times[-1], memory_now(device)))
            if config.report_to != "none":
                accelerator.log({"loss": total, "lr": used_lr}, step=done)
            if config.validation_prompts and (
                done % config.validation_steps == 0 or done == total_steps
            ):
                if accelerator.is_main_process:
                    grid = validation_grid(pipeline, accelerator.unwrap_model(unet), trainable,
                                           ema, config, out, done)  # fmt: skip
                    grids.append(grid)
                    if enabled:
                        console.print(f"validation grid: {grid}", highlight=False)
                accelerator.wait_for_everyone()
            if (
                config.checkpoint_every
                and done % config.checkpoint_every == 0
                and done < total_steps
            ):
                if guard is not None:
                    guard.check(accelerator.unwrap_model(unet))
                if accelerator.is_main_process:
                    save_checkpoint(
                        checkpoints, done, run_identity,
                        {n: p.detach() for n, p in trainable.items()},
                        optimizer.state_dict(), lr_schedule.state_dict(),
                        keep=config.checkpoints_total_limit,
                        ema=ema.state() if ema is not None else None,
                    )  # fmt: skip
                    log.write(out)
                accelerator.wait_for_everyone()

    if config.report_to != "none":
        accelerator.end_training()

    # Guard: nothing is written if a frozen tensor moved (the EMA holds only trained tensors).
    unet = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.copy_to(trainable)
        hold.after_step()
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
    unlock_folder(out)  # the folder holds a finished run now

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
        steps=total_steps,
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
        validation=tuple(grids),
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


def bucket_options(config: TrainConfig, pipeline, resolution: int) -> list[tuple[int, int]]:
    """The run's aspect-ratio buckets; sides default to what the UNet can divide evenly (the
    VAE's factor times one halving per down block: 64 px for Stable Diffusion)."""
    levels = len(pipeline.unet.config.block_out_channels)
    step = config.bucket_reso_steps or pipeline.vae_scale_factor * 2 ** (levels - 1)
    low = config.min_bucket_reso or resolution // 2
    high = config.max_bucket_reso or resolution * 2
    if low > high or step > high:
        raise UsageError(f"no bucket fits --min-bucket-reso {low}, --max-bucket-reso {high} and "
                         f"--bucket-reso-steps {step}")  # fmt: skip
    return bucket_sizes(resolution, step, low, high)


def make_order(encoded: EncodedData, config: TrainConfig, stream: int) -> EpochOrder | BucketOrder:
    """The draw order of a data set: batches within buckets when the run has them."""
    if config.enable_bucket:
        return BucketOrder(encoded.bucket_of_example, config.seed + stream, config.batch_size)
    return EpochOrder(len(encoded), config.seed + stream, config.batch_size)


def check_tracker(report_to: str) -> None:
    """UsageError (exit 2), before anything runs, unless `--report-to` can be served here."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if report_to in available and not available[report_to]():
        package = "tensorboard (or tensorboardX)" if report_to == "tensorboard" else "wandb"
        raise UsageError(f"--report-to {report_to} needs the {package} package: pip install it")


def tracker_config(config: TrainConfig) -> dict[str, int | float | str | bool]:
    """The options as trackers take them: scalars only (TensorBoard's hparams refuse others)."""
    flat: dict[str, int | float | str | bool] = {}
    for name, value in asdict(config).items():
        if isinstance(value, (int, float, str, bool)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


def validation_grid(
    pipeline, unet, trainable: dict[str, torch.nn.Parameter], ema: EmaWeights | None,
    config: TrainConfig, out: Path, step: int,
) -> Path:  # fmt: skip
    """Sample the validation prompts with the weights as they are at `step` (their EMA, when
    the run keeps one, as the written result will be) into `validation/step-NNNNNN.png`: one
    row per prompt, always from the same seed, so grids of different steps compare."""
    from guardtune.generate import make_grid, sample_images, save_png, to_pil

    saved = {n: p.detach().clone() for n, p in trainable.items()} if ema is not None else None
    if ema is not None:
        ema.copy_to(trainable)
    others = [m for m in encoders(pipeline) if m.device != unet.device]
    places: list[Any] = [m.device for m in others]
    trained_unet, was_training = pipeline.unet, unet.training
    try:
        pipeline.unet = unet
        unet.eval()
        for module in others:
            module.to(unet.device)
        generator = torch.Generator(device=unet.device).manual_seed(config.seed)
        each = config.num_validation_images
        prompts = [p for p in config.validation_prompts for _ in range(each)]
        images = sample_images(pipeline, prompts, generator, batch_size=config.batch_size)
    finally:
        pipeline.unet = trained_unet
        unet.train(was_training)
        for module, place in zip(others, places, strict=True):
            module.to(place)
        if saved is not None:
            with torch.no_grad():
                for name, tensor in saved.items():
                    trainable[name].copy_(tensor)
    path = out / "validation" / f"step-{step:06d}.png"
    save_png(make_grid(to_pil(images), columns=config.num_validation_images), path)
    return path
