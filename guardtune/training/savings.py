"""Measuring what freezing saves: isolated probes of the same training step, frozen and not.

Each probe is a fresh Python process (`python -m guardtune.training.savings`) that loads the
model, freezes the given tensors (or none), and runs a few optimizer steps (`steps` in the spec,
11 by default) of the configured batch on synthetic latents; it reports its peak memory and
median step time as JSON. Separate processes make the peaks comparable: on CPU the process's
peak RSS, on GPU the CUDA allocator's peak allocated and reserved bytes. The analytic breakdown
says where the difference comes from: frozen tensors need no gradient and no optimizer state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Any

from guardtune.errors import GuardtuneError
from guardtune.training.memory import RssSampler, current_rss_bytes, peak_memory_bytes

PROBE_STEPS = 11  # the first step pays for lazy initialisation and is not timed


@dataclass(frozen=True)
class ProbeResult:
    peak_memory_bytes: int
    reserved_memory_bytes: int
    loaded_memory_bytes: int  # after loading, before the first step
    step_time_s: float
    trainable_params: int
    measurement: str


@dataclass(frozen=True)
class SavingsReport:
    frozen_tensors: int
    total_tensors: int
    frozen_params: int
    total_params: int
    peak_memory_bytes: dict[str, int]  # frozen / unfrozen
    reserved_memory_bytes: dict[str, int]  # CUDA caching allocator's peak reserved (0 on CPU)
    step_time_s: dict[str, float]
    memory_saving: float
    time_saving: float
    training_memory_saving: float  # of the growth over the loaded model, imports excluded
    measurement: str
    analytic_bytes: dict[str, dict[str, int]]  # component -> frozen / unfrozen


def optimizer_bytes_per_param(optimizer: str) -> int:
    """Optimizer state each trainable parameter costs, in bytes."""
    return 2 if optimizer == "adamw8bit" else 8  # two fp32 moments, or two 8-bit ones


def run_probe(spec: dict[str, Any]) -> ProbeResult:
    """Run one probe in a fresh interpreter and parse its JSON line."""
    command = [sys.executable, "-m", "guardtune.training.savings", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as error:
        raise GuardtuneError("the savings probe ran past 30 minutes") from error
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GuardtuneError(f"the savings probe failed: {tail}", hint="rerun with --no-compare")
    return ProbeResult(**json.loads(lines[-1]))


def measure_savings(spec: dict[str, Any], frozen: list[str], summary) -> SavingsReport:
    """Probe the configured run and the same run with nothing frozen; compare."""
    frozen_probe = run_probe(spec | {"frozen": frozen})
    unfrozen_probe = run_probe(spec | {"frozen": []})
    weights = 4 * summary.total_params
    per_param = optimizer_bytes_per_param(spec["optimizer"])
    analytic: dict[str, dict[str, int]] = {
        "unet_weights": {"frozen": weights, "unfrozen": weights},
        "gradients": {
            "frozen": 4 * frozen_probe.trainable_params,
            "unfrozen": 4 * unfrozen_probe.trainable_params,
        },
        "optimizer_state": {
            "frozen": per_param * frozen_probe.trainable_params,
            "unfrozen": per_param * unfrozen_probe.trainable_params,
        },
    }
    for name, probe in (("frozen", frozen_probe), ("unfrozen", unfrozen_probe)):
        growth = probe.peak_memory_bytes - probe.loaded_memory_bytes
        rest = growth - analytic["gradients"][name] - analytic["optimizer_state"][name]
        analytic.setdefault("activations_and_workspace", {})[name] = max(0, rest)
    growth_frozen = frozen_probe.peak_memory_bytes - frozen_probe.loaded_memory_bytes
    growth_unfrozen = unfrozen_probe.peak_memory_bytes - unfrozen_probe.loaded_memory_bytes
    return SavingsReport(
        frozen_tensors=summary.frozen_tensors,
        total_tensors=summary.total_tensors,
        frozen_params=summary.frozen_params,
        total_params=summary.total_params,
        peak_memory_bytes={
            "frozen": frozen_probe.peak_memory_bytes,
            "unfrozen": unfrozen_probe.peak_memory_bytes,
        },
        reserved_memory_bytes={
            "frozen": frozen_probe.reserved_memory_bytes,
            "unfrozen": unfrozen_probe.reserved_memory_bytes,
        },
        step_time_s={"frozen": frozen_probe.step_time_s, "unfrozen": unfrozen_probe.step_time_s},
        memory_saving=1 - frozen_probe.peak_memory_bytes / unfrozen_probe.peak_memory_bytes,
        time_saving=1 - frozen_probe.step_time_s / unfrozen_probe.step_time_s,
        training_memory_saving=1 - growth_frozen / growth_unfrozen if growth_unfrozen > 0 else 0.0,
        measurement=frozen_probe.measurement,
        analytic_bytes=analytic,
    )


def probe_main(spec: dict[str, Any]) -> ProbeResult:
    """The probe itself: load, freeze, a few steps on synthetic data, measure."""
    import torch

    from guardtune.contract import default_device
    from guardtune.enforce.freeze import freeze_for_training
    from guardtune.models import encoders, load_pipeline
    from guardtune.resolve import ModelSource
    from guardtune.training.conditioning import random_conditioning, unet_inputs
    from guardtune.training.config import TrainConfig, attach_lora, build_optimizer

    config = TrainConfig(**spec["config"])
    cuda = torch.cuda.is_available()
    device = default_device()
    source = ModelSource(
        spec["kind"], Path(spec["path"]), Path(spec["config_dir"]) if spec["config_dir"] else None
    )
    pipeline = load_pipeline(source, device=device, dtype=torch.float32)
    unet = pipeline.unet
    frozen = set(spec["frozen"])
    freeze_for_training(unet, frozen, *encoders(pipeline))
    latent_size = spec["resolution"] // pipeline.vae_scale_factor
    channels = unet.config.in_channels
    generator = torch.Generator(device="cpu").manual_seed(0)
    states = random_conditioning(pipeline, config.batch_size, generator).to(device)
    conditioning = unet_inputs(unet, states)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        setattr(pipeline, name, None)  # the real run caches their outputs, too
    if config.lora:
        attach_lora(unet, frozen, config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec["mixed_precision"])
    batch = config.batch_size
    latents = torch.randn(batch, channels, latent_size, latent_size, generator=generator).to(device)
    timesteps = torch.randint(1000, (batch,), generator=generator).to(device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated() if cuda else current_rss_bytes()
    times = []
    with RssSampler() as sampler:
        for _ in range(spec.get("steps", PROBE_STEPS)):
            began = time.perf_counter()
            for _ in range(config.grad_accum):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = unet(latents, timesteps, **conditioning).sample.float().pow(2).mean()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    return ProbeResult(
        peak_memory_bytes=peak_memory_bytes(device) if cuda else sampler.peak,
        reserved_memory_bytes=int(torch.cuda.max_memory_reserved()) if cuda else 0,
        loaded_memory_bytes=int(loaded),
        step_time_s=median(times[1:]),
        trainable_params=sum(p.numel() for p in trainable),
        measurement="cuda max_memory_allocated (isolated process)" if cuda
        else "peak RSS while training, sampled every 2 ms in an isolated process",
    )  # fmt: skip


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # the probe is one of guardtune's own processes, like the CLI
    print(json.dumps(asdict(probe_main(json.loads(sys.argv[1])))))
