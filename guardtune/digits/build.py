"""The build recipe of the embedded default model `digits` (run by `make embedded`).

Trains, from nothing but scikit-learn's bundled digits, a complete Stable-Diffusion-format
pipeline made of real diffusers/transformers classes: a CLIP BPE tokenizer, a CLIP text
encoder, an AutoencoderKL and a UNet2DConditionModel, on the base classes 0-6 only, so that
7-9 stay unseen for the fine-tuning scenarios. The recipe is written out top to bottom:

1. tokenizer (own BPE merges)        4. UNet + text encoder, jointly, with EMA and 10% empty
2. digit classifier (the yardstick)     prompts so classifier-free guidance works
3. VAE, then its latent scaling      5. save in fp16, sample every base class, score them
   factor measured on the data

The output folder is an ordinary diffusers folder (`StableDiffusionPipeline.from_pretrained`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from guardtune import atomic
from guardtune.contract import ASSETS_DIR, POLICY_FILE
from guardtune.digits.bpe import write_clip_tokenizer
from guardtune.digits.classifier import ASSET as CLASSIFIER_ASSET
from guardtune.digits.classifier import recognition, save_classifier, train_classifier
from guardtune.digits.dataset import BASE_CLASSES, STYLES, load_digits, prompt_for
from guardtune.generate import sample_images
from guardtune.resolve import EMBEDDED_DIR, resolve_model
from guardtune.training.progress import console, track

MODEL_MAX_LENGTH = 32

# Stable Diffusion's training noise schedule; latent diffusion must not clip samples to [-1, 1].
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
)


@dataclass(frozen=True)
class BuildConfig:
    """Every knob of the build; the defaults are what the shipped weights were built with."""

    classes: tuple[int, ...] = BASE_CLASSES
    seed: int = 0
    classifier_epochs: int = 40
    vae_steps: int = 1200
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 7000
    batch_size: int = 32
    lr: float = 6e-4
    warmup_steps: int = 300
    empty_prompt_prob: float = 0.1  # lets one model give both halves of classifier-free guidance
    ema_decay: float = 0.999
    eval_samples_per_class: int = 32
    eval_steps: int = 25
    eval_guidance: float = 5.0
    threads: int = 2


@dataclass(frozen=True)
class BuildReport:
    config: BuildConfig
    vocab_size: int
    classifier_accuracy: float
    vae_reconstruction_mse: float
    scaling_factor: float
    final_loss: float
    recognition_mean: float
    recognition_per_class: dict[int, float]
    seconds: dict[str, float] = field(default_factory=dict)


def vae_config(scaling_factor: float = 1.0) -> dict:
    # Three levels: 32x32 images become 8x8x4 latents (the scans are 8x8 to begin with).
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def unet_config(cross_attention_dim: int) -> dict:
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def text_encoder_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] to the pipeline's (N, 3, H, W) in [-1, 1]."""
    return (images * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()


def train_vae(config: BuildConfig) -> tuple[AutoencoderKL, float]:
    """Train the autoencoder on every stroke style of the base classes; return it and its MSE."""
    data = torch.cat([load_digits(config.classes, "train", s).images for s in STYLES])
    vae = AutoencoderKL(**vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, 50, config.vae_steps)
    generator = torch.Generator().manual_seed(config.seed)
    vae.train()
    mse = float("nan")
    with track("VAE", config.vae_steps) as report:
        for _ in range(config.vae_steps):
            idx = torch.randint(len(data), (config.batch_size,), generator=generator)
            x = to_rgb(data[idx])
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample(generator)).sample
            mse_loss = F.mse_loss(reconstruction, x)
            loss = mse_loss + config.vae_kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            mse = mse_loss.item()
            report(loss=mse)
    return vae.eval(), mse


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1/std of the latents: the UNet should see unit variance (SD's 0.18215 fits SD's VAE only)."""
    latents = vae.encode(to_rgb(images)).latent_dist.mean
    return float(1.0 / latents.std())


def train_denoiser(
    config: BuildConfig,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
) -> tuple[UNet2DConditionModel, CLIPTextModel, float]:
    """Jointly train UNet and text encoder on noise prediction; return their EMA copies."""
    train = load_digits(config.classes, "train")
    with torch.no_grad():
        posterior = vae.encode(to_rgb(train.images)).latent_dist
    latent_mean, latent_std = posterior.mean, posterior.std
    scaling = vae.config.scaling_factor
    prompts = [prompt_for(d) for d in range(10)] + [""]
    prompt_ids = tokenizer(
        prompts, padding="max_length", max_length=MODEL_MAX_LENGTH, return_tensors="pt"
    ).input_ids
    empty_row = len(prompts) - 1

    text_encoder = CLIPTextModel(text_encoder_config(tokenizer))
    unet = UNet2DConditionModel(**unet_config(text_encoder.config.hidden_size))
    scheduler = DDPMScheduler(**SCHEDULE)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-2, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.unet_steps)
    ema = [p.detach().clone() for p in parameters]
    generator = torch.Generator().manual_seed(config.seed + 1)

    unet.train()
    text_encoder.train()
    loss_value = float("nan")
    with track("UNet + text encoder", config.unet_steps) as report:
        for step in range(config.unet_steps):
            idx = torch.randint(len(train), (config.batch_size,), generator=generator)
            noise_of_posterior = torch.randn(latent_mean[idx].shape, generator=generator)
            latents = (latent_mean[idx] + latent_std[idx] * noise_of_posterior) * scaling
            rows = train.labels[idx].clone()
            dropped = torch.rand(config.batch_size, generator=generator) < config.empty_prompt_prob
            rows[dropped] = empty_row
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(
                scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator
            )
            noisy = scheduler.add_noise(latents, noise, timesteps)
            encoder_states = text_encoder(prompt_ids[rows])[0]
            prediction = unet(noisy, timesteps, encoder_states).sample
            loss = F.mse_loss(prediction, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            # EMA with a warm-up so early averages are not dominated by the random init.
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1.0 - decay)
            current = loss.item()
            loss_value = 0.98 * loss_value + 0.02 * current if step else current
            report(loss=loss_value, lr=float(schedule.get_last_lr()[0]))
    with torch.no_grad():
        for p, averaged in zip(parameters, ema, strict=True):
            p.copy_(averaged)
    return unet.eval(), text_encoder.eval(), loss_value


def make_scheduler() -> DDIMScheduler:
    """The sampling scheduler shipped with the model: DDIM over SD's training schedule."""
    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def sample_classes(
    pipeline: StableDiffusionPipeline,
    classes: tuple[int, ...],
    per_class: int,
    steps: int,
    guidance: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate `per_class` images of every class; return images (N, 3, H, W) in [0, 1], labels."""
    images, labels = [], []
    for digit in classes:
        generator = torch.Generator().manual_seed(seed + digit)
        prompts = [prompt_for(digit)] * per_class
        images.append(sample_images(pipeline, prompts, generator, steps, guidance))
        labels.append(torch.full((per_class,), digit))
    return torch.cat(images), torch.cat(labels)


def build(out: Path, config: BuildConfig, classifier_out: Path | None = None) -> BuildReport:
    """Run the whole recipe and write the pipeline folder (and classifier) atomically."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    with atomic.staged_dir(out) as staging:
        vocab_size = write_clip_tokenizer(staging / "tokenizer", MODEL_MAX_LENGTH)
        tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer")
        seconds["tokenizer"] = time.perf_counter() - start

        t = time.perf_counter()
        classifier, classifier_accuracy = train_classifier(config.classifier_epochs, config.seed)
        if classifier_out is not None:
            save_classifier(classifier, classifier_out)
        seconds["classifier"] = time.perf_counter() - t
        console.print(f"classifier held-out accuracy {classifier_accuracy:.3f}")

        t = time.perf_counter()
        vae, vae_mse = train_vae(config)
        scaling = measure_scaling_factor(vae, load_digits(config.classes, "train").images)
        vae.register_to_config(scaling_factor=scaling)
        seconds["vae"] = time.perf_counter() - t
        console.print(f"VAE reconstruction MSE {vae_mse:.4f}, scaling factor {scaling:.4f}")

        t = time.perf_counter()
        unet, text_encoder, final_loss = train_denoiser(config, vae, tokenizer)
        seconds["unet"] = time.perf_counter() - t

        # fp16 storage keeps the package small; loading upcasts to the run's dtype.
        pipeline = assemble_pipeline(vae, text_encoder, tokenizer, unet)
        pipeline.to(torch.float16)
        pipeline.save_pretrained(staging, safe_serialization=True)
        pipeline.to(torch.float32)

        t = time.perf_counter()
        images, labels = sample_classes(
            pipeline,
            config.classes,
            config.eval_samples_per_class,
            config.eval_steps,
            config.eval_guidance,
            config.seed,
        )
        scores = recognition(classifier, images, labels)
        seconds["evaluation"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - start
        report = BuildReport(
            config=config,
            vocab_size=vocab_size,
            classifier_accuracy=classifier_accuracy,
            vae_reconstruction_mse=vae_mse,
            scaling_factor=scaling,
            final_loss=final_loss,
            recognition_mean=scores.mean,
            recognition_per_class=scores.per_class,
            seconds=seconds,
        )
        atomic.write_json(staging / "build_report.json", asdict(report))
    return report


# The embedded model's policy scenario: illegal = teach it the unseen 7 and 9; legal =
# a bold stroke style of the digits it knows, under the same prompts (an adaptation that differs
# in kind). The publisher key stays outside git; its public half is committed.
POLICY_ILLEGAL = (7, 9)
POLICY_RATIO = 0.3
POLICY_KEY = Path("keys") / "guardtune-digits.key"
POLICY_PUBLIC = ASSETS_DIR / "trusted" / "guardtune-digits.pub"


def publish_policy(work: Path = Path("runs") / "embedded-policy", key_path: Path = POLICY_KEY):
    """Learn and sign the embedded model's FreezeAsGuard policy (p = 0.3) into its folder."""
    import shutil

    from guardtune.digits.dataset import export_digits
    from guardtune.learn.freezeasguard import LearnerConfig
    from guardtune.publish import publish
    from guardtune.trust.signing import load_private_key, public_pem, write_keypair

    if not key_path.is_file():
        write_keypair(key_path.with_suffix(""), "ed25519", None)
    key = load_private_key(key_path)
    illegal = export_digits(work / "data" / "7-9", POLICY_ILLEGAL, "train", overwrite=True).out
    legal = export_digits(work / "data" / "bold-0-6", BASE_CLASSES, "train", "bold", True).out
    shutil.rmtree(work / "learn", ignore_errors=True)
    # The one deliberate write into the package: the maintainers' rebuild of what it ships.
    result = publish([illegal], [legal], [key], "digits", config=LearnerConfig(ratio=POLICY_RATIO),
                     out=EMBEDDED_DIR / POLICY_FILE, workdir=work / "learn")  # fmt: skip
    atomic.write_bytes(POLICY_PUBLIC, public_pem(key.public_key()))
    assert result is not None  # one process: it is the main one
    if result.curve is not None:  # the PNG stays out of the package: only weights are binaries
        result.curve.replace(work / result.curve.name)
    return result


def resign_policy(key_path: Path = POLICY_KEY) -> Path:
    """Sign the shipped policy's mask and provenance again, in today's policy schema.

    For a schema change, not a new mask: the learned mask, how it was learned and its log stay;
    the new policy binds what the current schema binds, under the key at `key_path` (made if
    absent, and then the committed public key changes with it).
    """
    from guardtune.trust.build import build_policy, sign_policy_file
    from guardtune.trust.signing import load_private_key, public_pem, write_keypair
    from guardtune.trust.verify import verify_policy

    shipped = verify_policy("digits", trusted_files=[POLICY_PUBLIC], use_trust_dirs=False)
    if not key_path.is_file():
        write_keypair(key_path.with_suffix(""), "ed25519", None)
    key = load_private_key(key_path)
    old = shipped.policy
    policy = build_policy(resolve_model("digits"), old.frozen_tensors, old.provenance)
    target = sign_policy_file(policy, [key], EMBEDDED_DIR / POLICY_FILE)
    atomic.write_bytes(POLICY_PUBLIC, public_pem(key.public_key()))
    log = EMBEDDED_DIR / "guardtune-policy.log.json"
    record = json.loads(log.read_text())
    record["policy_sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    atomic.write_json(log, record)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the embedded `digits` model.")
    parser.add_argument(
        "--policy-only", action="store_true", help="Only learn and sign the model's policy."
    )
    parser.add_argument(
        "--resign", action="store_true", help="Sign the shipped policy again in today's schema."
    )
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--classifier-out", type=Path, default=CLASSIFIER_ASSET)
    parser.add_argument("--vae-steps", type=int, default=BuildConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=BuildConfig.unet_steps)
    parser.add_argument("--classifier-epochs", type=int, default=BuildConfig.classifier_epochs)
    parser.add_argument("--eval-samples", type=int, default=BuildConfig.eval_samples_per_class)
    args = parser.parse_args(argv)
    if args.resign:
        console.print(f"re-signed {resign_policy()}")
        return
    if args.policy_only:
        result = publish_policy()
        share = f"{result.frozen_share_parameters:.1%} of parameters"
        console.print(f"{result.policy}: {share} in {result.frozen_tensors} tensors")
        return
    config = BuildConfig(
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        classifier_epochs=args.classifier_epochs,
        eval_samples_per_class=args.eval_samples,
    )
    report = build(args.out, config, args.classifier_out)
    console.print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    from guardtune.runtime import configure_process

    configure_process()  # as the CLI does: offline, quiet, huge pages
    main()
