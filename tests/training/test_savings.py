"""The savings report: its statistics and verdicts, the probes' order and failures, one real run."""

from __future__ import annotations

import copy
import dataclasses
import subprocess

import pytest
import torch

from guardtune.enforce.freeze import FreezeSummary, lora_target_modules
from guardtune.errors import GuardtuneError
from guardtune.resolve import EMBEDDED_DIR
from guardtune.training import savings
from guardtune.training.config import TrainConfig, attach_lora
from guardtune.training.memory import RssSampler
from guardtune.training.savings import (
    ProbeResult,
    Switch,
    compare,
    measure_savings,
    median_interval,
    memory_range,
    round_order,
    run_probe,
    verdict,
)

FROZEN = ["conv_in.weight", "down_blocks.0.attentions.0.proj_in.weight",
          "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]  # fmt: skip
SUMMARY = FreezeSummary(frozen_tensors=3, total_tensors=10, frozen_params=1000, total_params=4000)


def _probe(peaks: list[int], rounds: dict[str, list[float]] | None = None, trainable=4000):
    return ProbeResult(
        peak_memory_bytes=max(peaks), reserved_memory_bytes=0, loaded_memory_bytes=100,
        step_peak_bytes=peaks, step_time_s=0.1, trainable_params=trainable,
        measurement="peak RSS", device="cpu", round_times_s=rounds or {}, load_average=0.5,
        cpus=2,
    )  # fmt: skip


# ----------------------------------------------------------------------------- verdicts


def test_a_saving_whose_interval_excludes_zero_is_a_saving():
    assert verdict(0.12, 0.08, 0.15) == "saves 12.0% (8.0% to 15.0%)"


def test_an_interval_that_holds_zero_is_no_measurable_difference():
    assert verdict(0.02, -0.03, 0.05) == "no measurable difference (between -3.0% and +5.0%)"
    assert verdict(0.0, 0.0, 0.0) == "no measurable difference (between +0.0% and +0.0%)"


def test_a_negative_saving_is_never_printed_as_a_saving():
    assert verdict(-0.09, -0.5, 0.2) == "no measurable difference (between -50.0% and +20.0%)"
    assert verdict(-0.04, -0.06, -0.02) == "costs 4.0% more (2.0% to 6.0%)"


def test_the_median_interval_is_the_sign_test_interval():
    values = [float(v) for v in range(16, 0, -1)]
    low, high, coverage = median_interval(values)
    # 4th smallest and 4th largest of 16: 1 - 2 P(Bin(16, 1/2) <= 3) = 1 - 1394 / 65536.
    assert (low, high) == (4.0, 13.0)
    assert coverage == pytest.approx(1 - 1394 / 65536)


def test_too_few_rounds_give_the_full_range_and_say_its_lower_coverage():
    assert median_interval([0.3, 0.1, 0.2]) == (0.1, 0.3, 0.75)


def test_rounds_alternate_abba():
    assert round_order(["frozen", "unfrozen"], 3) == [
        "frozen", "unfrozen", "unfrozen", "frozen", "frozen", "unfrozen",
    ]  # fmt: skip
    assert round_order(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]


def test_a_report_pairs_the_steps_of_each_round():
    rounds = {"frozen": [0.9, 1.8, 0.85, 0.9], "unfrozen": [1.0, 2.0, 1.0, 1.0]}
    frozen = _probe([900, 950, 940, 950], trainable=3000)
    unfrozen = _probe([960, 1000, 990, 1000], rounds)
    report = compare(frozen, unfrozen, "adamw", SUMMARY)
    # Round 2 ran twice as slow for both: paired, it saves what the others do.
    assert report.round_savings == pytest.approx([0.1, 0.1, 0.15, 0.1])
    assert report.time_saving == pytest.approx(0.1)
    assert report.time_saving_range == pytest.approx([0.1, 0.15])
    assert report.time_verdict == "saves 10.0% (10.0% to 15.0%)"
    assert report.step_time_s == {"frozen": 0.9, "unfrozen": 1.0}
    assert report.memory_saving == pytest.approx(0.05)
    # Steps after the first: frozen 940-950, unfrozen 990-1000.
    assert report.memory_saving_range == pytest.approx([1 - 950 / 990, 1 - 940 / 1000])
    assert report.memory_verdict == "saves 5.0% (4.0% to 6.0%)"
    assert report.analytic_bytes["optimizer_state"] == {"frozen": 24000, "unfrozen": 32000}
    assert report.timing == (
        "CPU time of one thread per step, 4 rounds of one step each, frozen and unfrozen "
        "alternated (ABBA) in one process; saving: the median of the rounds' paired savings, "
        "interval: 88% confidence; load average 0.5 on 2 CPUs"
    )
    assert report.device_note.startswith("measured on CPU (one thread): on a model this small")


def test_memory_that_overlaps_is_no_measurable_difference():
    frozen, unfrozen = _probe([500, 990, 1001]), _probe([500, 1000, 995])
    assert memory_range(frozen, unfrozen) == pytest.approx((1 - 1001 / 995, 1 - 990 / 1000))
    report = compare(frozen, _probe([500, 1000, 995], {"frozen": [1.0], "unfrozen": [1.0]}),
                     "adamw", SUMMARY)  # fmt: skip
    assert report.memory_verdict.startswith("no measurable difference")


def test_the_device_note_says_where_and_why():
    assert savings.device_note("cuda", 859_520_964) == (
        "measured on GPU: at this size (860M parameters) a step is mostly the UNet's "
        "convolutions and matrix products and the optimizer's pass over the trainable tensors; "
        "freezing removes each frozen tensor's weight gradient and optimizer update, and "
        "backward through any part of the network with nothing trainable upstream"
    )
    assert savings.device_note("cpu", 5_835_012).startswith(
        "measured on CPU (one thread): on a model this small (5.8M parameters) much of a step is "
        "activations and per-operation overhead, which freezing keeps;"
    )


# ----------------------------------------------------------------------------- probes


def test_a_failed_probe_says_why(monkeypatch):
    def out_of_memory(command, **kwargs):
        stderr = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory.\n"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(savings.subprocess, "run", out_of_memory)
    with pytest.raises(GuardtuneError) as error:
        run_probe({"frozen": []})
    assert error.value.one_line() == (
        "the savings probe failed: torch.OutOfMemoryError: CUDA out of memory. "
        "(rerun with --no-compare)"
    )


def test_when_the_timing_probe_fails_the_comparison_fails(monkeypatch):
    calls = []

    def probe(spec):
        calls.append(spec)
        if "alternate" in spec:
            raise GuardtuneError("the savings probe failed: killed")
        return _probe([1, 2])

    monkeypatch.setattr(savings, "run_probe", probe)
    with pytest.raises(GuardtuneError, match="killed"):
        measure_savings({"optimizer": "adamw"}, FROZEN, SUMMARY)
    assert [c["frozen"] for c in calls] == [FROZEN, []]
    assert calls[1]["alternate"] == {"frozen": FROZEN, "unfrozen": []}


def test_switching_a_full_run_trains_exactly_the_configurations_tensors(embedded_pipeline):
    unet = copy.deepcopy(embedded_pipeline.unet)
    unet.requires_grad_(True)
    switch = Switch(unet, set(), {"frozen": set(FROZEN), "unfrozen": set()}, lora=False)
    optimizer = torch.optim.AdamW(list(unet.parameters()), lr=1e-2)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    switch("frozen")
    latents = torch.randn(1, 4, 8, 8)
    states = torch.randn(1, 4, unet.config.cross_attention_dim)
    unet(latents, torch.tensor([10]), encoder_hidden_states=states).sample.pow(2).mean().backward()
    assert {n for n, p in unet.named_parameters() if p.grad is not None} == set(before) - set(
        FROZEN
    )
    optimizer.step()
    moved = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    assert not moved & set(FROZEN) and len(moved) > len(before) // 2
    switch("unfrozen")
    assert all(p.requires_grad for p in unet.parameters())


def test_switching_lora_turns_off_the_adapters_on_frozen_projections(embedded_pipeline):
    unet = copy.deepcopy(embedded_pipeline.unet)
    frozen = set(FROZEN)
    switch = Switch(unet, set(), {"frozen": frozen, "unfrozen": set()}, lora=True)
    allowed = set(lora_target_modules(unet, frozen))
    attach_lora(unet, set(), TrainConfig(lora=True))
    switch("frozen")
    trained = {n.split(".lora_")[0] for n, p in unet.named_parameters() if p.requires_grad}
    assert trained == allowed
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" not in trained
    switch("unfrozen")
    trained = {n.split(".lora_")[0] for n, p in unet.named_parameters() if p.requires_grad}
    assert trained == set(lora_target_modules(embedded_pipeline.unet, set()))


def test_the_sampler_gives_the_peak_of_each_stretch():
    with RssSampler() as sampler:
        sampler.restart()
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
        first = sampler.restart()
        second = sampler.restart()
    assert first - second > 32 * 2**20
    assert sampler.peak >= first


def test_a_real_comparison_on_the_embedded_model():
    config = TrainConfig(batch_size=2)
    spec = {"kind": "embedded", "path": str(EMBEDDED_DIR), "config_dir": None,
            "config": dataclasses.asdict(config), "resolution": 32, "optimizer": "adamw",
            "mixed_precision": "no", "steps": 2}  # fmt: skip
    summary = FreezeSummary(len(FROZEN), 324, 2304 + 4096 + 4096, 5_835_012)
    report = measure_savings(spec, FROZEN, summary, rounds=3)
    assert len(report.round_savings) == 3
    assert report.time_verdict.startswith(("saves ", "costs ", "no measurable difference"))
    assert report.peak_memory_bytes["frozen"] > 0 and report.peak_memory_bytes["unfrozen"] > 0
    trainable = report.analytic_bytes["gradients"]
    assert trainable["unfrozen"] == 4 * 5_835_012
    assert trainable["unfrozen"] - trainable["frozen"] == 4 * summary.frozen_params
    assert report.timing.startswith("CPU time of one thread per step, 3 rounds of one step each")
