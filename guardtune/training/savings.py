"""Measuring what freezing saves: the same training step, frozen and not, with its uncertainty.

The compare stage of `finetune` calls `measure_savings`; `benchmarks/savings.py` runs the same
probes (`run_probe`). Each probe is a fresh Python process (`python -m
guardtune.training.savings`, the spec as JSON on stdin) that loads the model, builds the run
exactly as the recipe does (`training/config.py`) on synthetic latents, and prints one JSON
line. Probes run one after the other, so only one of them ever holds the model.

Memory: each configuration gets its own process, whose peak (the CUDA allocator's on GPU, the
resident set's high-water mark on CPU, `training/memory.py`) is taken over its first steps,
before anything else ran in it; the spread is how much that peak varies from step to step.

Step time: measured in the unfrozen configuration's process after its memory steps, alternating
the configurations step by step in rounds (ABBA: frozen, unfrozen, unfrozen, frozen, ...). Two
processes run seconds apart see different machine load (on a shared two-core CPU the same 0.1 s
step took 1-2.5 s at times); adjacent steps see nearly the same, so each round gives one paired
saving. On CPU a step is timed as one thread's CPU time (see `probe_main`), on GPU as wall
time. The report gives the median of the paired savings and a distribution-free confidence
interval of it, and a verdict that calls a difference a saving or a cost only when the whole
interval is on one side of zero.

Switching configuration in one process changes nothing a step computes: the unfrozen run's
optimizer skips parameters without a gradient, so a frozen step updates exactly the frozen run's
tensors; under LoRA the adapters a frozen projection may not have are switched off, so they are
neither computed nor trained. Autograd does the rest itself: a frozen tensor gets no weight
gradient, and no gradient flows back into a part of the network that has nothing trainable
upstream (the latents never require one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from math import comb
from pathlib import Path
from statistics import median, quantiles
from typing import Any

from guardtune.errors import GuardtuneError
from guardtune.training.memory import RssSampler, current_rss_bytes

PROBE_STEPS = 6  # memory steps per probe; the first pays for lazy initialisation
TIMING_ROUNDS = 16  # each round times one step of every configuration
CONFIDENCE = 0.95
# Below this many UNet parameters a step is mostly activations and per-operation overhead.
SMALL_MODEL_PARAMS = 100_000_000


@dataclass(frozen=True)
class ProbeResult:
    peak_memory_bytes: int
    reserved_memory_bytes: int
    loaded_memory_bytes: int  # after loading, before the first step
    step_peak_bytes: list[int]  # the peak of each memory step
    step_time_s: float  # median of the memory steps after the first (this process alone)
    trainable_params: int
    measurement: str
    device: str  # "cpu" or "cuda"
    round_times_s: dict[str, list[float]] = field(default_factory=dict)  # configuration -> rounds
    load_average: float = 0.0  # the machine's, over the last minute, when timing ended
    cpus: int = 0


@dataclass(frozen=True)
class SavingsReport:
    frozen_tensors: int
    total_tensors: int
    frozen_params: int
    total_params: int
    peak_memory_bytes: dict[str, int]  # frozen / unfrozen
    reserved_memory_bytes: dict[str, int]  # CUDA caching allocator's peak reserved (0 on CPU)
    step_time_s: dict[str, float]  # median over the rounds
    step_time_spread_s: dict[str, list[float]]  # interquartile range over the rounds
    memory_saving: float
    memory_saving_range: list[float]  # low, high: over the step-to-step spread of the peaks
    memory_verdict: str
    time_saving: float  # median of the rounds' paired savings
    time_saving_range: list[float]  # low, high: confidence interval of that median
    time_verdict: str
    round_savings: list[float]  # 1 - frozen / unfrozen step time, per round
    training_memory_saving: float  # of the growth over the loaded model, imports excluded
    measurement: str  # how memory was measured
    timing: str  # how step time was measured
    device_note: str  # what the time saving means on this device
    analytic_bytes: dict[str, dict[str, int]]  # component -> frozen / unfrozen


def optimizer_bytes_per_param(optimizer: str) -> int:
    """Optimizer state each trainable parameter costs, in bytes."""
    return 2 if optimizer == "adamw8bit" else 8  # two fp32 moments, or two 8-bit ones


# ----------------------------------------------------------------------------- statistics


def round_order(names: list[str], rounds: int) -> list[str]:
    """Every configuration once per round, the order reversed in every other round (ABBA...).

    A drift in machine speed then reaches each configuration equally often first and last.
    """
    order: list[str] = []
    for number in range(rounds):
        order.extend(names if number % 2 == 0 else reversed(names))
    return order


def median_interval(
    values: list[float], confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """A distribution-free confidence interval of the median: (low, high, its coverage).

    The interval between the j-th smallest and j-th largest of n values holds the median with
    probability 1 - 2 P(Binomial(n, 1/2) < j), whatever the distribution (the sign test). j is
    the largest that keeps that at `confidence` or above; with too few values to reach it, the
    interval is the full range, and the coverage says how much less it is.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")

    def coverage(j: int) -> float:
        return 1 - 2 * sum(comb(n, i) for i in range(j)) / 2**n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= confidence:
        j += 1
    return ordered[j - 1], ordered[n - j], coverage(j)


def verdict(saving: float, low: float, high: float) -> str:
    """What a measured saving says: a saving or a cost only when its interval excludes zero."""
    if low > 0:
        return f"saves {saving:.1%} ({low:.1%} to {high:.1%})"
    if high < 0:
        return f"costs {-saving:.1%} more ({-high:.1%} to {-low:.1%})"
    return f"no measurable difference (between {low:+.1%} and {high:+.1%})"


def paired_savings(frozen: list[float], unfrozen: list[float]) -> list[float]:
    """1 - frozen / unfrozen for each round: steps of one round ran under the same load."""
    return [1 - f / u for f, u in zip(frozen, unfrozen, strict=True)]


def memory_range(frozen: ProbeResult, unfrozen: ProbeResult) -> tuple[float, float]:
    """The memory saving's low and high, from the smallest and largest peak of each probe.

    The first step is left out (its backward runs before the optimizer state exists); the
    saving of the overall peaks is always inside.
    """
    saving = 1 - frozen.peak_memory_bytes / unfrozen.peak_memory_bytes
    f = frozen.step_peak_bytes[1:] or frozen.step_peak_bytes
    u = unfrozen.step_peak_bytes[1:] or unfrozen.step_peak_bytes
    low, high = 1 - max(f) / min(u), 1 - min(f) / max(u)
    return min(low, saving), max(high, saving)


def spread(values: list[float]) -> list[float]:
    """The interquartile range (the middle half) of `values`; the value itself when alone."""
    if len(values) < 2:
        return [values[0], values[0]]
    low, _, high = quantiles(values, n=4, method="inclusive")
    return [low, high]


def timing_text(probe: ProbeResult, rounds: int, coverage: float) -> str:
    """How the step times were taken, and under what load."""
    clock = "wall time" if probe.device == "cuda" else "CPU time of one thread"
    return (
        f"{clock} per step, {rounds} rounds of one step each, frozen and unfrozen alternated "
        f"(ABBA) in one process; saving: the median of the rounds' paired savings, interval: "
        f"{coverage:.0%} confidence; load average {probe.load_average:.1f} on {probe.cpus} CPUs"
    )


def device_note(device: str, total_params: int) -> str:
    """What the measured time saving means on this device, and why it is that size."""
    where = "GPU" if device == "cuda" else "CPU (one thread)"
    removes = (
        "freezing removes each frozen tensor's weight gradient and optimizer update, and "
        "backward through any part of the network with nothing trainable upstream"
    )
    if total_params < SMALL_MODEL_PARAMS:
        return (
            f"measured on {where}: on a model this small ({total_params / 1e6:.1f}M parameters) "
            f"much of a step is activations and per-operation overhead, which freezing keeps; "
            f"{removes}. benchmarks/savings.py measures the saving at SD v1.5 size"
        )
    return (
        f"measured on {where}: at this size ({total_params / 1e6:.0f}M parameters) a step is "
        f"mostly the UNet's convolutions and matrix products and the optimizer's pass over the "
        f"trainable tensors; {removes}"
    )


# ----------------------------------------------------------------------------- probes


def run_probe(spec: dict[str, Any]) -> ProbeResult:
    """Run one probe in a fresh interpreter and parse its JSON line.

    The spec goes through stdin: an argument is limited to 128 KiB on Linux, which the names of
    a few SD-size configurations' frozen tensors pass.
    """
    command = [sys.executable, "-m", "guardtune.training.savings"]
    try:
        done = subprocess.run(
            command, input=json.dumps(spec), capture_output=True, text=True, timeout=3600
        )
    except subprocess.TimeoutExpired as error:
        raise GuardtuneError("the savings probe ran past 60 minutes") from error
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GuardtuneError(f"the savings probe failed: {tail}", hint="rerun with --no-compare")
    return ProbeResult(**json.loads(lines[-1]))


def measure_savings(
    spec: dict[str, Any], frozen: list[str], summary, rounds: int = TIMING_ROUNDS
) -> SavingsReport:
    """Probe the configured run and the same run with nothing frozen; compare."""
    frozen_probe = run_probe(spec | {"frozen": frozen})
    # The unfrozen process measures its memory first, then times both configurations.
    configurations = {"frozen": frozen, "unfrozen": []}
    unfrozen_probe = run_probe(spec | {"frozen": [], "alternate": configurations, "rounds": rounds})
    return compare(frozen_probe, unfrozen_probe, spec["optimizer"], summary)


def compare(frozen_probe: ProbeResult, unfrozen_probe: ProbeResult, optimizer: str,
            summary) -> SavingsReport:  # fmt: skip
    """The report of two probes; the unfrozen one carries the alternated step times."""
    weights = 4 * summary.total_params
    per_param = optimizer_bytes_per_param(optimizer)
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
    probes = {"frozen": frozen_probe, "unfrozen": unfrozen_probe}
    growth = {n: p.peak_memory_bytes - p.loaded_memory_bytes for n, p in probes.items()}
    for name in probes:
        rest = growth[name] - analytic["gradients"][name] - analytic["optimizer_state"][name]
        analytic.setdefault("activations_and_workspace", {})[name] = max(0, rest)
    times = unfrozen_probe.round_times_s
    savings = paired_savings(times["frozen"], times["unfrozen"])
    time_saving = median(savings)
    low, high, coverage = median_interval(savings)
    memory_saving = 1 - frozen_probe.peak_memory_bytes / unfrozen_probe.peak_memory_bytes
    memory_low, memory_high = memory_range(frozen_probe, unfrozen_probe)
    rounds = len(savings)
    return SavingsReport(
        frozen_tensors=summary.frozen_tensors,
        total_tensors=summary.total_tensors,
        frozen_params=summary.frozen_params,
        total_params=summary.total_params,
        peak_memory_bytes={n: p.peak_memory_bytes for n, p in probes.items()},
        reserved_memory_bytes={n: p.reserved_memory_bytes for n, p in probes.items()},
        step_time_s={n: median(times[n]) for n in probes},
        step_time_spread_s={n: spread(times[n]) for n in probes},
        memory_saving=memory_saving,
        memory_saving_range=[memory_low, memory_high],
        memory_verdict=verdict(memory_saving, memory_low, memory_high),
        time_saving=time_saving,
        time_saving_range=[low, high],
        time_verdict=verdict(time_saving, low, high),
        round_savings=savings,
        training_memory_saving=(
            1 - growth["frozen"] / growth["unfrozen"] if growth["unfrozen"] > 0 else 0.0
        ),
        measurement=frozen_probe.measurement,
        timing=timing_text(unfrozen_probe, rounds, coverage),
        device_note=device_note(unfrozen_probe.device, summary.total_params),
        analytic_bytes=analytic,
    )


class Switch:
    """Switches a built run between configurations, each freezing a superset of its own.

    Made before LoRA adapters are attached (their targets are named by the plain UNet's
    modules). Full fine-tune: a configuration's frozen tensors stop requiring a gradient, and
    the run's optimizer, which skips parameters without one, updates exactly the rest. LoRA:
    adapters on projections the configuration freezes are switched off, so they are neither
    computed nor trained, as if never attached.
    """

    def __init__(self, unet, own: set[str], configurations: dict[str, set[str]], lora: bool):
        from guardtune.enforce.freeze import lora_target_modules

        for name, frozen in configurations.items():
            if not own <= frozen:
                raise ValueError(f"configuration {name} trains a tensor this run does not")
        self.unet, self.lora, self.frozen = unet, lora, configurations
        self.targets = {n: set(lora_target_modules(unet, f)) for n, f in configurations.items()}

    def __call__(self, name: str) -> None:
        if self.lora:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for module_name, module in self.unet.named_modules():
                if isinstance(module, BaseTunerLayer):
                    module.enable_adapters(module_name in self.targets[name])
        else:
            for parameter_name, parameter in self.unet.named_parameters():
                parameter.requires_grad_(parameter_name not in self.frozen[name])


def probe_main(spec: dict[str, Any]) -> ProbeResult:
    """The probe itself: load, freeze, a few steps on synthetic data, measure.

    `spec["frozen"]` is this process's own configuration, whose memory it measures over
    `spec["steps"]` steps. `spec["alternate"]` (name -> frozen tensors, each a superset of the
    own ones) are then timed for `spec["rounds"]` rounds of one step each, after one untimed
    step of each.
    """
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
    alternate = {name: set(names) for name, names in spec.get("alternate", {}).items()}
    freeze_for_training(unet, frozen, *encoders(pipeline))
    latent_size = spec["resolution"] // pipeline.vae_scale_factor
    channels = unet.config.in_channels
    generator = torch.Generator(device="cpu").manual_seed(0)
    states = random_conditioning(pipeline, config.batch_size, generator).to(device)
    conditioning = unet_inputs(unet, states)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        setattr(pipeline, name, None)  # the real run caches their outputs, too
    configure = Switch(unet, frozen, alternate, config.lora)  # before LoRA wraps the UNet
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

    clock = time.perf_counter  # wall time while memory is measured, as the run sees it

    def step() -> float:
        began = clock()
        for _ in range(config.grad_accum):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = unet(latents, timesteps, **conditioning).sample.float().pow(2).mean()
            loss.backward()
        if config.max_grad_norm > 0:  # as the recipe clips: a pass over every gradient
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()  # parameters without a gradient (frozen in this step) are skipped
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return clock() - began

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    loaded = torch.cuda.memory_allocated() if cuda else current_rss_bytes()
    times, peaks, reserved = [], [], []
    with RssSampler() as sampler:
        for _ in range(spec.get("steps", PROBE_STEPS)):
            sampler.restart()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times.append(step())
            peaks.append(int(torch.cuda.max_memory_allocated()) if cuda else sampler.restart())
            reserved.append(int(torch.cuda.max_memory_reserved()) if cuda else 0)
    if not cuda:
        # A CPU step on every core waits for the slowest thread, and a thread that another
        # process displaced stalls them all: on two busy cores a 0.1 s step took 1-2.5 s, which
        # no number of rounds averages out. One thread's CPU time counts only this process's
        # work. The work a frozen tensor saves is the same on more threads; there the steps'
        # fixed per-operation overhead is a larger share, so the saving can be a little less.
        torch.set_num_threads(1)
        clock = time.process_time
    round_times: dict[str, list[float]] = {name: [] for name in alternate}
    for name in alternate:  # the first step of a configuration pays for its lazy set-up
        configure(name)
        step()
    for name in round_order(list(alternate), spec.get("rounds", TIMING_ROUNDS)):
        configure(name)
        round_times[name].append(step())
    return ProbeResult(
        peak_memory_bytes=max(peaks),
        reserved_memory_bytes=max(reserved),
        loaded_memory_bytes=int(loaded),
        step_peak_bytes=peaks,
        step_time_s=median(times[1:] or times),
        trainable_params=sum(p.numel() for p in trainable),
        measurement="cuda max_memory_allocated (isolated process)" if cuda
        else "peak RSS while training (the kernel's high-water mark, reset at each step) in an "
        "isolated process" if sampler.exact
        else "peak RSS while training, sampled every 2 ms in an isolated process",
        device=device.type,
        round_times_s=round_times,
        load_average=os.getloadavg()[0],
        cpus=os.cpu_count() or 0,
    )  # fmt: skip


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # the probe is one of guardtune's own processes, like the CLI
    print(json.dumps(asdict(probe_main(json.loads(sys.stdin.read())))))
