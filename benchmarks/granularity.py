"""Could a finer mask separate illegal from legal adaptation? Whole tensors vs output channels.

Policies freeze whole UNet tensors. On the embedded scenario (base knows 0-6; illegal = learn 7
and 9; legal = learn the new class 8), freezing 30% of the parameters slows learning 8 nearly as
much as learning 7 and 9 (`guardtune evaluate`). This probe asks whether that is a limit of the
granularity, with an oracle mask that has seen the attacks' own updates, so it bounds what a
learned mask of each granularity could do rather than measuring the learner:

1. Fine-tune the unfrozen model on each task (seed 0) and keep its update, delta = theta - theta_0.
2. Units: whole tensors, or dim-0 slices (a conv's or linear's output channels; the entries of
   a bias or norm). A unit's share of a task's update energy is e(u) = |delta_u|^2 / |delta|^2.
3. Oracle mask at share p by parameters: units ranked by (e_illegal - e_legal) per parameter,
   frozen down the ranking while they fit under p.
4. Attack with other seeds: the same full fine-tune as `guardtune evaluate`'s user, with the
   mask's units held fixed (their gradient rows zeroed, and their rows put back after each step
   so that weight decay cannot move them); samples scored by the digit classifier.

Prints the update energy each mask captures, then recognisability after the attack, mitigation
(illegal) and impact (legal) against the unfrozen attack, and each mask's separation
(mitigation - impact).

    .venv/bin/python benchmarks/granularity.py [--ratio 0.3] [--user-steps 100,200] [--seeds 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from guardtune import atomic
from guardtune.data import ImageCaptionDataset, scan_folder
from guardtune.digits.classifier import load_classifier, to_classifier_input
from guardtune.digits.dataset import export_digits, prompt_for
from guardtune.evaluate.attack import user_finetune
from guardtune.models import load_pipeline
from guardtune.training.encode import EncodedData

TASKS = {"illegal 7+9": (7, 9), "legal new 8": (8,)}


def finetune(unet, scheduler, base, keep, data, checkpoints, at_checkpoint, seed):
    """`guardtune evaluate`'s simulated user, with rows held where `keep` says.

    keep[name] is 0.0 (freeze the tensor) or a 0/1 column over its rows; absent: train it.
    Held rows get no gradient, so Adam never moves them, and they are put back before every
    forward, since AdamW's weight decay still would.
    """
    frozen = {name for name, held in keep.items() if isinstance(held, float)}
    partial = [(p, keep[n], base[n]) for n, p in unet.named_parameters()
               if isinstance(keep.get(n), torch.Tensor)]  # fmt: skip

    def put_back(module, inputs) -> None:
        with torch.no_grad():
            for parameter, held, original in partial:
                parameter.mul_(held).add_(original * (1 - held))

    for parameter, _, _ in partial:
        parameter.requires_grad_(True)  # user_finetune trains it too; hooks need it now
    hooks = [p.register_hook(lambda g, held=held: g * held) for p, held, _ in partial]
    hooks.append(unet.register_forward_pre_hook(put_back))
    try:
        user_finetune(unet, scheduler, base, frozen, data, checkpoints, at_checkpoint, seed)
    finally:
        for hook in hooks:
            hook.remove()


def units(delta: dict[str, torch.Tensor], by_channel: bool) -> list[tuple[str, int | None, int]]:
    """(tensor, row or None for the whole tensor, parameters) for every unit."""
    found = []
    for name, d in delta.items():
        if by_channel and d.dim() >= 1:
            found += [(name, row, d[row].numel()) for row in range(d.shape[0])]
        else:
            found.append((name, None, d.numel()))
    return found


def energy(delta: dict[str, torch.Tensor], unit: tuple[str, int | None, int]) -> float:
    name, row, _ = unit
    part = delta[name] if row is None else delta[name][row]
    return float(part.double().square().sum())


def oracle_mask(deltas, by_channel: bool, ratio: float):
    """Units ranked by (illegal - legal) update-energy share per parameter, under `ratio`."""
    illegal, legal = deltas["illegal 7+9"], deltas["legal new 8"]
    total = {t: sum(float(d.double().square().sum()) for d in deltas[t].values()) for t in TASKS}
    candidates = units(illegal, by_channel)
    score = [
        (energy(illegal, u) / total["illegal 7+9"] - energy(legal, u) / total["legal new 8"]) / u[2]
        for u in candidates
    ]
    budget = ratio * sum(d.numel() for d in illegal.values())
    frozen, covered = [], 0
    for index in np.argsort(score)[::-1]:
        unit = candidates[index]
        if covered + unit[2] <= budget:
            frozen.append(unit)
            covered += unit[2]
    captured = {t: sum(energy(deltas[t], u) for u in frozen) / total[t] for t in TASKS}
    keep: dict[str, torch.Tensor | float] = {}
    for name, row, _ in frozen:
        if row is None:
            keep[name] = 0.0
        else:
            if name not in keep:
                shape = (illegal[name].shape[0],) + (1,) * (illegal[name].dim() - 1)
                keep[name] = torch.ones(shape)
            keep[name][row] = 0.0  # type: ignore[index]
    return keep, covered / sum(d.numel() for d in illegal.values()), captured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--user-steps", dest="steps", default="100,200")  # as evaluate's
    parser.add_argument("--seeds", type=int, default=2, help="Attack seeds (1, 2, ...).")
    parser.add_argument("--samples", type=int, default=64, help="Per class and checkpoint.")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/granularity.json"))
    parser.add_argument("--quick", action="store_true", help="Tiny settings, to test the script.")
    args = parser.parse_args()
    checkpoints = [int(s) for s in args.steps.split(",")]
    if args.quick:
        checkpoints, args.seeds, args.samples = [2], 1, 2
    started = time.perf_counter()
    console = Console()
    from diffusers import DDPMScheduler

    pipeline = load_pipeline("digits", device=torch.device("cpu"), dtype=torch.float32)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    pipeline.vae.requires_grad_(False)
    pipeline.text_encoder.requires_grad_(False)
    unet = pipeline.unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    names = [n for n, _ in unet.named_parameters()]
    root = args.out.parent / "granularity-data"
    data = {}
    for task, classes in TASKS.items():
        folder = export_digits(root / "-".join(map(str, classes)), classes, "train",
                               overwrite=True).out  # fmt: skip
        data[task] = EncodedData(pipeline, ImageCaptionDataset(scan_folder(folder), 32),
                                 torch.device("cpu"))  # fmt: skip
    classifier = load_classifier()

    @torch.no_grad()
    def recognisability(classes, seed: int) -> float:
        hits = []
        for digit in classes:
            generator = torch.Generator().manual_seed(seed * 100 + digit)
            images = pipeline(
                [prompt_for(digit)] * args.samples,
                num_inference_steps=25,
                guidance_scale=5.0,
                generator=generator,
                output_type="pt",
            ).images
            predicted = classifier(to_classifier_input(images.float())).argmax(1)
            hits.append(float((predicted == digit).float().mean()))
        return float(np.mean(hits))

    # 1. The oracle's view: each task's unfrozen update (seed 0, the longest budget).
    deltas = {}
    for task in TASKS:
        finetune(unet, scheduler, base, {}, data[task], [max(checkpoints)], lambda s: None, 0)
        deltas[task] = {n: (unet.state_dict()[n] - base[n]).clone() for n in names}
    masks = {"none": ({}, 0.0, {t: 0.0 for t in TASKS})}
    masks["oracle, whole tensors"] = oracle_mask(deltas, False, args.ratio)
    masks["oracle, output channels"] = oracle_mask(deltas, True, args.ratio)

    # 2. The attacks, with seeds the oracle has not seen.
    results: dict[str, dict[str, dict[int, list[float]]]] = {}
    for mask, (keep, _, _) in masks.items():
        results[mask] = {}
        for task, classes in TASKS.items():
            found: dict[int, list[float]] = {s: [] for s in checkpoints}
            for seed in range(1, args.seeds + 1):

                def at(step: int, classes=classes, seed=seed, found=found) -> None:
                    found[step].append(recognisability(classes, seed))

                finetune(unet, scheduler, base, keep, data[task], checkpoints, at, seed)
            results[mask][task] = found
        console.print(mask, json.dumps(results[mask]))
    unet.load_state_dict(base)

    title = f"After the attack: recognisability, mean [spread] over {args.seeds} seed(s)"
    table = Table(title=f"{title}, and change vs no mask", title_justify="left")
    for column in ("mask", "task", "frozen", "update energy in mask"):
        table.add_column(column, justify="right" if column.startswith(("fro", "upd")) else "left")
    for step in checkpoints:
        table.add_column(f"@{step}", justify="right")
    separations = Table(title="Separation: mitigation - legal impact", title_justify="left")
    separations.add_column("mask")
    for step in checkpoints:
        separations.add_column(f"@{step}", justify="right")
    summary: dict[str, dict] = {}
    for mask, (_, share, captured) in masks.items():
        versus = {}
        for task in TASKS:
            cells = [mask, task, f"{share:.1%}", f"{captured[task]:.0%}"]
            for step in checkpoints:
                mean = float(np.mean(results[mask][task][step]))
                unfrozen = float(np.mean(results["none"][task][step]))
                versus[task, step] = 1 - mean / unfrozen if unfrozen else 0.0
                spread = float(np.ptp(results[mask][task][step]))
                change = mean / unfrozen - 1 if unfrozen else 0.0
                cells.append(f"{mean:.3f} [{spread:.3f}] {change:+.0%}")
            table.add_row(*cells)
        separation = {s: versus["illegal 7+9", s] - versus["legal new 8", s] for s in checkpoints}
        separations.add_row(mask, *(f"{separation[s]:+.0%}" for s in checkpoints))
        summary[mask] = {"frozen_share": share, "captured_energy": captured,
                         "separation": separation}  # fmt: skip
    console.print(table)
    console.print(separations)
    record = {"ratio": args.ratio, "steps": checkpoints, "seeds": args.seeds,
              "samples": args.samples, "results": results, "summary": summary,
              "seconds": time.perf_counter() - started}  # fmt: skip
    atomic.write_json(args.out, record)
    console.print(f"{record['seconds']:.0f} s; JSON in {args.out}")


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
