"""Sampling images from a pipeline and writing them as a grid and as single files.

`sample_images` is the one sampling loop: `guardtune generate`, the demo, the embedded build,
`evaluate` and the benchmarks draw through it. Sampling is seeded with one torch.Generator,
so the same seed, prompts and settings give the same images.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from guardtune import atomic
from guardtune.errors import DataError
from guardtune.resolve import ModelSource
from guardtune.training.progress import StepReporter, track

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


@dataclass(frozen=True)
class GenerateResult:
    prompt: str
    num: int
    steps: int
    seed: int
    guidance: float
    grid: Path
    files: tuple[Path, ...]
    seconds: float


def load_lora(pipeline, path: Path) -> None:
    """Load a diffusers-format LoRA file (or the folder holding pytorch_lora_weights)."""
    path = Path(path)
    folder, weight_name = (path, None) if path.is_dir() else (path.parent, path.name)
    if not path.exists():
        raise DataError(f"LoRA file {path} does not exist")
    try:
        pipeline.load_lora_weights(str(folder), weight_name=weight_name)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise DataError(f"cannot load LoRA {path}: {str(error).splitlines()[0]}") from error


@torch.no_grad()
def sample_images(
    pipeline,
    prompts: list[str],
    generator: torch.Generator,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    batch_size: int | None = None,
    negative_prompt: str | None = None,
    report: StepReporter | None = None,
) -> torch.Tensor:
    """One image per prompt, (N, 3, H, W) fp32 in [0, 1] on the CPU.

    Prompts go through the pipeline `batch_size` at a time (all at once if None), every batch
    drawing from the same `generator`, so the images depend on the batching too. `report` is
    called after every denoising step.
    """
    batch_size = batch_size or len(prompts)

    def stepped(pipe, step, timestep, tensors):
        if report is not None:
            report()
        return tensors

    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        output = pipeline(
            batch,
            negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
            callback_on_step_end=stepped,
        )
        images.append(output.images.float().cpu())
    return torch.cat(images)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] to 8-bit RGB images, rounded as diffusers' own PIL output is."""
    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(image) for image in array]


def sample(
    pipeline,
    prompt: str,
    num: int = 8,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    guidance: float = DEFAULT_GUIDANCE,
    negative_prompt: str | None = None,
    show_progress: bool = False,
) -> list[Image.Image]:
    """`num` images of one prompt, seeded on the pipeline's device, with a progress bar."""
    if num < 1 or steps < 1:
        raise DataError("--num and --num-inference-steps must be at least 1")
    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    with track("generate", steps, pipeline.device, enabled=show_progress) as report:
        images = sample_images(
            pipeline, [prompt] * num, generator, steps, guidance,
            negative_prompt=negative_prompt, report=report,
        )  # fmt: skip
    return to_pil(images)


def make_grid(images: list[Image.Image], columns: int | None = None, scale: int = 1) -> Image.Image:
    """Tile images row by row (a near-square grid unless `columns` is given)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    if scale != 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    return grid


def save_png(image: Image.Image, path: Path) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic.write_bytes(path, buffer.getvalue())


def generate_to_files(
    pipeline,
    prompt: str,
    out: Path,
    num: int = 8,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    guidance: float = DEFAULT_GUIDANCE,
    out_dir: Path | None = None,
    scale: int = 1,
    show_progress: bool = False,
) -> GenerateResult:
    """Sample, then write the grid to `out` (and `num` single PNGs to `out_dir`)."""
    import time

    if out.suffix.lower() != ".png":
        raise DataError(f"--out {out} must end in .png")
    start = time.perf_counter()
    images = sample(pipeline, prompt, num, steps, seed, guidance, show_progress=show_progress)
    save_png(make_grid(images, scale=scale), out)
    files: list[Path] = []
    if out_dir is not None:
        for index, image in enumerate(images):
            files.append(out_dir / f"{index:04d}.png")
            save_png(image, files[-1])
    seconds = time.perf_counter() - start
    return GenerateResult(prompt, num, steps, seed, guidance, out, tuple(files), seconds)


def generate(
    prompt: str,
    out: Path,
    *,
    model: str | ModelSource = "digits",
    model_config: Path | None = None,
    lora: Path | None = None,
    num: int = 8,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    guidance: float = DEFAULT_GUIDANCE,
    out_dir: Path | None = None,
    scale: int = 1,
    show_progress: bool = True,
) -> GenerateResult:
    """`guardtune generate`: load the model (and a LoRA file), sample, write the PNGs."""
    from guardtune.models import load_pipeline

    pipeline = load_pipeline(model, model_config)
    if lora is not None:
        load_lora(pipeline, lora)
    return generate_to_files(
        pipeline, prompt, out, num, steps, seed, guidance, out_dir, scale, show_progress
    )
