"""The `guardtune` command line: a thin Typer shell over the library.

Each command parses its options, calls one library function with them, and hands the frozen
dataclass it returns to its `render_<command>` in `guardtune.render` (and, with `--json FILE`,
to `jsonable`). `run_command` is the error contract: errors from the library (GuardtuneError)
become one red line and the error's exit code; anything else is a bug (exit 1). `--debug` shows
tracebacks. Library modules are imported inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand

from guardtune import __version__, atomic
from guardtune.distributed import is_main_process
from guardtune.errors import DataError, ExitCode, GuardtuneError, UsageError
from guardtune.render import (
    console,
    render_audit,
    render_data_check,
    render_data_digits,
    render_demo,
    render_evaluate,
    render_export,
    render_finetune,
    render_generate,
    render_keygen,
    render_policy_show,
    render_policy_sign,
    render_policy_verify,
    render_publish,
)
from guardtune.runtime import configure_process

if TYPE_CHECKING:
    from guardtune.digits.dataset import ExportReport
    from guardtune.generate import GenerateResult
    from guardtune.publish import PublishResult
    from guardtune.training.finetune import TrainResult

app = typer.Typer(
    help="Freeze-policy guarded fine-tuning for text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Export and check training data folders.", no_args_is_help=True)
app.add_typer(data_app, name="data")

err_console = Console(stderr=True)
_debug = False

T = TypeVar("T")

ModelOption = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="'digits', a diffusers folder, a hub id in the local cache, or a .safetensors file.",
    ),
]  # fmt: skip
ModelConfigOption = Annotated[
    Path | None,
    typer.Option("--model-config", help="Config folder for a single-file .safetensors model."),
]
RevisionOption = Annotated[
    str | None,
    typer.Option(help="Branch, tag or commit of a hub id in the local cache (default main)."),
]
VariantOption = Annotated[
    str | None, typer.Option(help="Weight files saved with this variant, e.g. fp16.")
]
JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write the result as JSON to this file.")
]


def _load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """`--config FILE`: the file's options become the command's defaults (Click's default_map),
    so the command line overrides them and the options' own defaults apply beneath both. The
    option is eager: the file is in place before any other parameter is processed."""
    if value is not None and not ctx.resilient_parsing:
        from guardtune.runconfig import read_config

        moved = getattr(ctx.command, "renamed", {})
        renamed = {old[2:]: new[2:] for old, new in moved.items()}
        found = run_command(
            lambda: read_config(value, ctx, refused={param.name}, renamed=renamed), None,
            lambda _: None,
        )  # fmt: skip
        ctx.default_map = {**(ctx.default_map or {}), **found}
    return value


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", is_eager=True, callback=_load_config,
        help="TOML file of this command's options, keyed by their names without '--' "
        "(batch-size = 8); the command line overrides it. Runs keep theirs as run.toml.",
    ),
]  # fmt: skip
# Left out of a run's effective configuration: the file it came from, where results are copied
# (--json, --report) and how an interrupted run continues (--resume). None of them is what the
# run is, and repeating a run from its run.toml must start it afresh, not resume it.
_NOT_THE_RUN = ("config_file", "json_path", "report", "resume")


def _settings(ctx: typer.Context) -> str:
    """The running command's effective configuration (command line, --config file and defaults
    merged) as the TOML text `--config` reads: what the recipe keeps in its run folder."""
    from guardtune.runconfig import dumps, effective_config

    name = ctx.info_name
    header = (
        f"guardtune {__version__}: every option of this `guardtune {name}` run (command line,\n"
        f"--config file and defaults). `guardtune {name} --config FILE` repeats it (paths are\n"
        "relative to the folder it ran in; give it a new output folder on the command line)."
    )
    return dumps(effective_config(ctx, _NOT_THE_RUN), header)


def _refuse(error: GuardtuneError) -> NoReturn:
    """The error contract while a command's arguments are parsed, before its action runs."""
    err_console.print(f"[bold red]error:[/] {error.one_line()}", soft_wrap=True)
    raise typer.Exit(int(error.exit_code))


def _renamed(renamed: dict[str, str]) -> type[TyperCommand]:
    """A command class whose old option names (`renamed`: old flag -> new flag) stop with the
    new name rather than Click's 'No such option' and its guesses: each option name means one
    thing in every command, and `--steps` is a fine-tune's optimizer steps (finetune, demo)."""

    class Command(TyperCommand):
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            try:
                return super().parse_args(ctx, args)
            except Exception as error:  # NoSuchOption, of whichever Click typer runs on
                old = getattr(error, "option_name", None)
                if old not in renamed:
                    raise
                message = f"{old} is now {renamed[old]}"
                _refuse(UsageError(message, hint="--steps means a fine-tune's optimizer steps"))

    Command.renamed = renamed  # type: ignore[attr-defined]  # what --config refuses as well
    return Command


def _source(model: str, model_config: Path | None, revision: str | None, variant: str | None):
    """The `--model` options as one checked ModelSource (called inside each command's action,
    so that a bad model gets the error contract)."""
    from guardtune.resolve import resolve_model

    return resolve_model(model, model_config, revision=revision, variant=variant)


def jsonable(value: Any) -> Any:
    """Dataclasses, paths, tuples and int-keyed dicts to plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def run_command(action: Callable[[], T], json_path: Path | None, render: Callable[[T], None]) -> T:
    """Run one library call with the CLI's error contract, then render and save its result."""
    try:
        result = action()
        render(result)
        if json_path is not None:
            atomic.write_json(json_path, jsonable(result))
        return result
    except GuardtuneError as error:
        if _debug:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/] {error.one_line()}", soft_wrap=True)
        raise typer.Exit(int(error.exit_code)) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as error:  # a bug: say so, keep it to one line unless --debug
        if _debug:
            err_console.print_exception()
        err_console.print(
            f"[bold red]bug:[/] {type(error).__name__}: {error} (rerun with --debug and report it)",
            soft_wrap=True,
        )
        raise typer.Exit(int(ExitCode.BUG)) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"guardtune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """guardtune: publish signed freeze policies, fine-tune under them, audit derivatives."""
    global _debug
    _debug = debug
    configure_process()  # before any command imports the model libraries


def _new_passphrase() -> bytes:
    """A new key's passphrase: $GUARDTUNE_KEY_PASSPHRASE, or asked twice on the terminal."""
    from guardtune.trust.signing import PASSPHRASE_ENV

    text = os.environ.get(PASSPHRASE_ENV) or typer.prompt(
        "Passphrase", hide_input=True, confirmation_prompt=True
    )
    return text.encode()


def _main_process_only(render: Callable[[T], None]) -> Callable[[T | None], None]:
    """Under `accelerate launch` every rank runs the command; only the main process reports.

    The other ranks have nothing to report (`publish` returns None there: it signs on one).
    """

    def report(result: T | None) -> None:
        if result is not None and is_main_process():
            render(result)

    return report


# ----------------------------------------------------------------------------- data


@data_app.command("digits")
def data_digits(
    out: Annotated[Path, typer.Argument(help="Folder to create (PNG files + metadata.jsonl).")],
    classes: Annotated[str, typer.Option(help="Digits to export, e.g. '7,9' or '0-6'.")] = "7",
    split: Annotated[
        str, typer.Option(help="train, test or all; train and test never overlap.")
    ] = ("train"),
    style: Annotated[str, typer.Option(help="plain, bold, slant or outline strokes.")] = "plain",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")
    ] = False,
    json_path: JsonOption = None,
) -> None:
    """Export real handwritten digits (scikit-learn's) as a ready training folder."""
    from guardtune.digits.dataset import export_digits, parse_classes

    def action() -> ExportReport:
        try:
            digits = parse_classes(classes)
        except ValueError as error:
            raise DataError(f"--classes: {error}") from error
        return export_digits(out, digits, split=split, style=style, overwrite=overwrite)

    run_command(action, json_path, render_data_digits)


@data_app.command("check")
def data_check(
    folder: Annotated[Path, typer.Argument(help="A training data folder.")],
    caption_column: Annotated[str, typer.Option(help="Caption column of metadata.jsonl.")] = "text",
    instance_prompt: Annotated[
        str | None, typer.Option(help="DreamBooth: caption every image with this prompt.")
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """Validate a data folder (every image decodes, every caption exists) and summarise it."""
    from guardtune.data import check_folder

    run_command(
        lambda: check_folder(folder, caption_column=caption_column,
                             instance_prompt=instance_prompt),
        json_path, render_data_check,
    )  # fmt: skip


# ----------------------------------------------------------------------------- generate


@app.command(cls=_renamed({"--steps": "--num-inference-steps"}))
def generate(
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[Path, typer.Option(help="PNG file for the grid of all samples.")],
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    revision: RevisionOption = None,
    variant: VariantOption = None,
    num: Annotated[int, typer.Option(min=1, help="Number of images.")] = 8,
    steps: Annotated[
        int, typer.Option("--num-inference-steps", min=1, help="Denoising steps (DDIM).")
    ] = 25,
    seed: Annotated[
        int, typer.Option(help="Random seed; the same seed gives the same images.")
    ] = 0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 5.0,
    out_dir: Annotated[Path | None, typer.Option(help="Also write each image here.")] = None,
    scale: Annotated[int, typer.Option(min=1, help="Enlarge the grid by this factor.")] = 1,
    lora: Annotated[
        Path | None, typer.Option(help="A LoRA file (or its folder) from `finetune --lora`.")
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """Sample images from a model and write a PNG grid."""
    from guardtune.generate import generate as run_generate

    def action() -> GenerateResult:
        return run_generate(
            prompt, out, model=_source(model, model_config, revision, variant), lora=lora,
            num=num, steps=steps, seed=seed, guidance=guidance, out_dir=out_dir, scale=scale,
        )  # fmt: skip

    run_command(action, json_path, render_generate)


# ----------------------------------------------------------------------------- keys and policies

policy_app = typer.Typer(help="Sign, verify and inspect freeze policies.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy", "-p", help="Signed policy (default: guardtune-policy.json in the model)."
    ),
]
TrustedOption = Annotated[
    list[Path] | None,
    typer.Option("--trusted", help="Trusted public key (repeatable), on top of the trust folders."),
]


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="Path prefix: writes PREFIX.key and PREFIX.pub.")],
    key_type: Annotated[str, typer.Option("--type", help="ed25519 or ecdsa-p256.")] = "ed25519",
    passphrase: Annotated[
        bool,
        typer.Option(
            "--passphrase", help="Encrypt the private key (prompted, or $GUARDTUNE_KEY_PASSPHRASE)."
        ),
    ] = False,
    json_path: JsonOption = None,
) -> None:
    """Create a publisher signing key pair (the private key file is mode 0600)."""
    from guardtune.trust.signing import create_keypair

    run_command(
        lambda: create_keypair(out, key_type=key_type,
                               passphrase=_new_passphrase() if passphrase else None),
        json_path, render_keygen,
    )  # fmt: skip


@policy_app.command("sign")
def policy_sign(
    mask: Annotated[Path, typer.Option(help="Tensor names (text or JSON list) or a 0/1 CSV.")],
    key: Annotated[list[Path], typer.Option(help="Private key (repeatable for co-signing).")],
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    revision: RevisionOption = None,
    variant: VariantOption = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write (default: beside the model folder's model_index.json)."),
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="Expiry, UTC ISO 8601, e.g. 2027-12-31T00:00:00Z.")
    ] = None,
    method: Annotated[str, typer.Option(help="How the mask was made, for the record.")] = "manual",
    json_path: JsonOption = None,
) -> None:
    """Turn a freeze mask into a signed policy bound to the model's exact weights."""
    from guardtune.trust.build import sign_mask

    run_command(
        lambda: sign_mask(mask, key, model=_source(model, model_config, revision, variant), out=out,
                          expires_at=expires, method=method),
        json_path, render_policy_sign,
    )  # fmt: skip


@policy_app.command("verify")
def policy_verify(
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    revision: RevisionOption = None,
    variant: VariantOption = None,
    policy: PolicyOption = None,
    trusted: TrustedOption = None,
    json_path: JsonOption = None,
) -> None:
    """Check a policy's signature, validity and binding to the model (exit 0, 4, 5 or 6)."""
    from guardtune.trust.verify import verify_policy

    run_command(
        lambda: verify_policy(_source(model, model_config, revision, variant), policy_path=policy,
                              trusted_files=trusted or ()).summary(),
        json_path, render_policy_verify,
    )  # fmt: skip


@policy_app.command("show")
def policy_show(
    policy: Annotated[Path, typer.Argument(help="A signed policy file.")],
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    revision: RevisionOption = None,
    variant: VariantOption = None,
    plot: Annotated[Path | None, typer.Option(help="Write a block heatmap PNG here.")] = None,
    json_path: JsonOption = None,
) -> None:
    """Where a policy freezes: the frozen share per UNet block (signature not checked)."""
    from guardtune.trust.inspection import describe_policy

    run_command(
        lambda: describe_policy(policy, model=_source(model, model_config, revision, variant),
                                plot=plot),
        json_path, render_policy_show,
    )  # fmt: skip


# ----------------------------------------------------------------------------- publish


@app.command(cls=_renamed({"--steps": "--mask-updates"}))
def publish(
    ctx: typer.Context,
    illegal: Annotated[list[Path], typer.Option(help="Illegal-class data folder (repeatable).")],
    legal: Annotated[list[Path], typer.Option(help="Legal data folder (repeatable).")],
    key: Annotated[list[Path], typer.Option(help="Publisher's private key (repeatable).")],
    config_file: ConfigOption = None,
    ratio: Annotated[float, typer.Option(help="Share to freeze, p.")] = 0.3,
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    revision: RevisionOption = None,
    variant: VariantOption = None,
    method: Annotated[
        str,
        typer.Option(
            help="freezeasguard, random (random-p), or freezeasguard+uce (edit with UCE first, "
            "then learn the mask on the edited model; needs --edited-model-out)."
        ),
    ] = "freezeasguard",
    share_by: Annotated[str, typer.Option(help="Count p in parameters or tensors.")] = (
        "parameters"
    ),
    relearn_steps: Annotated[int, typer.Option(min=1, help="Steps to get theta_ft.")] = 200,
    steps: Annotated[int, typer.Option("--mask-updates", min=1, help="Mask updates.")] = 150,
    user_steps_per_update: Annotated[int, typer.Option(min=1, help="User steps per update.")] = 4,
    user_lr: Annotated[float, typer.Option(help="Simulated user's learning rate.")] = 1e-4,
    user_reset_every: Annotated[
        int, typer.Option(min=1, help="Mask updates between restarts of the simulated user.")
    ] = 50,
    mask_lr: Annotated[float, typer.Option(help="Mask step size.")] = 0.05,
    granularity: Annotated[
        str, typer.Option(help="Mask units: tensor (whole tensors) or channel (output rows).")
    ] = "tensor",
    horizon: Annotated[
        int | None,
        typer.Option(min=1, help="User steps the policy must hold against (default: as trained)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per half-batch.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the learner's batches, noise and init.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Policy file (default: in the model).")] = None,
    edited_model_out: Annotated[
        Path | None,
        typer.Option(help="freezeasguard+uce: the edited model folder to write (and ship)."),
    ] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints (default: runs/publish/<model>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in the work folder.")
    ] = False,
    json_path: JsonOption = None,
) -> None:
    """Learn which UNet tensors to freeze (FreezeAsGuard) and sign the policy.

    Runs under `accelerate launch` with several processes; checkpoints at every restart of
    the simulated user, and continues with --resume.
    """
    from guardtune.learn.freezeasguard import LearnerConfig
    from guardtune.publish import publish as run_publish
    from guardtune.trust.signing import load_private_key

    config = LearnerConfig(
        ratio=ratio, share_by=share_by, relearn_steps=relearn_steps, rounds=steps,
        user_steps=user_steps_per_update, user_lr=user_lr, user_reset_every=user_reset_every,
        mask_lr=mask_lr, granularity=granularity, horizon=horizon, batch_size=batch_size,
        seed=seed,
    )  # fmt: skip

    def action() -> PublishResult | None:
        # Keys first: a wrong passphrase must not wait for the mask to be learned.
        keys = [load_private_key(path) for path in key]
        return run_publish(
            illegal, legal, keys, model=_source(model, model_config, revision, variant),
            method=method, config=config, out=out, workdir=work_dir, resume=resume,
            settings=_settings(ctx), edited_out=edited_model_out,
        )  # fmt: skip

    main = is_main_process()
    run_command(action, json_path if main else None, _main_process_only(render_publish))


# ----------------------------------------------------------------------------- finetune


@app.command()
def finetune(
    ctx: typer.Context,
    data: Annotated[Path, typer.Argument(help="Training images (any layout of `data check`).")],
    config_file: ConfigOption = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/finetune"),
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    revision: RevisionOption = None,
    variant: VariantOption = None,
    policy: PolicyOption = None,
    trusted: TrustedOption = None,
    no_policy: Annotated[
        bool, typer.Option("--no-policy", help="Train a model that has no policy.")
    ] = False,
    ignore_shipped_policy: Annotated[
        bool,
        typer.Option(
            "--ignore-shipped-policy",
            help="Train a model that ships a policy without it (--no-policy) or with another "
            "(--policy); recorded in the run's provenance.",
        ),
    ] = False,
    lora: Annotated[
        bool, typer.Option("--lora", help="Train LoRA adapters instead of full weights.")
    ] = False,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 4,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            "--max-train-steps",
            min=1,
            help="Optimizer steps (200 unless --epochs is given).",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Passes over the data, instead of --steps.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per step.")] = 1,
    lr: Annotated[float | None, typer.Option(help="Learning rate (1e-5 full, 1e-4 LoRA).")] = None,
    lr_scheduler: Annotated[
        str, typer.Option(help="constant, constant_with_warmup, linear, cosine, ... (diffusers').")
    ] = "constant",
    warmup_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="Steps over which the learning rate rises from 0 (schedules with a warmup).",
        ),
    ] = 500,
    resolution: Annotated[int | None, typer.Option(help="Training size (model's own).")] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of batches, noise and LoRA init; the same seed, the same run.")
    ] = 0,
    snr_gamma: Annotated[float | None, typer.Option(help="Min-SNR loss weighting.")] = None,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing", help="Recompute activations in backward to save memory."
        ),
    ] = False,
    mixed_precision: Annotated[str, typer.Option(help="auto, no, bf16 or fp16.")] = "auto",
    optimizer: Annotated[str, typer.Option(help="adamw or adamw8bit.")] = "adamw",
    caption_column: Annotated[str, typer.Option(help="Caption column of metadata.jsonl.")] = "text",
    instance_prompt: Annotated[str | None, typer.Option(help="DreamBooth prompt.")] = None,
    class_data: Annotated[Path | None, typer.Option(help="Prior-preservation images.")] = None,
    class_prompt: Annotated[str | None, typer.Option(help="Prompt of the class images.")] = None,
    prior_loss_weight: Annotated[
        float, typer.Option(help="Weight of the prior-preservation loss (with --class-data).")
    ] = 1.0,
    random_flip: Annotated[
        bool, typer.Option("--random-flip", help="Mirror each image with probability 1/2.")
    ] = False,
    random_crop: Annotated[
        bool,
        typer.Option(
            "--random-crop",
            help="Crop each draw at a random place, not the centre (encodes every draw anew).",
        ),
    ] = False,
    enable_bucket: Annotated[
        bool,
        typer.Option(
            "--enable-bucket",
            help="Aspect-ratio buckets: train each image near its own shape (kohya's).",
        ),
    ] = False,
    min_bucket_reso: Annotated[
        int | None, typer.Option(min=1, help="Shortest bucket side (resolution / 2).")
    ] = None,
    max_bucket_reso: Annotated[
        int | None, typer.Option(min=1, help="Longest bucket side (2 x resolution).")
    ] = None,
    bucket_reso_steps: Annotated[
        int | None, typer.Option(min=1, help="Bucket side granularity (64 px on SD).")
    ] = None,
    caption_dropout_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Chance of training a draw on the empty caption.")
    ] = 0.0,
    noise_offset: Annotated[
        float, typer.Option(min=0, help="Per-channel noise offset (e.g. 0.05; 0: none).")
    ] = 0.0,
    use_ema: Annotated[
        bool,
        typer.Option("--use-ema", help="Write the exponential moving average of the weights."),
    ] = False,
    ema_decay: Annotated[float, typer.Option(help="EMA decay (warmed up as diffusers').")] = 0.9999,
    validation_prompt: Annotated[
        list[str] | None,
        typer.Option(help="Prompt sampled into validation/step-N.png (repeatable)."),
    ] = None,
    validation_steps: Annotated[
        int, typer.Option(min=1, help="Sample the validation prompts every N steps.")
    ] = 100,
    num_validation_images: Annotated[
        int, typer.Option(min=1, help="Images per validation prompt.")
    ] = 4,
    report_to: Annotated[
        str, typer.Option(help="none, tensorboard or wandb (accelerate's trackers, if installed).")
    ] = "none",
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache of encoded data ($GUARDTUNE_CACHE or ~/.cache/guardtune)."),
    ] = None,
    no_latent_cache: Annotated[
        bool,
        typer.Option("--no-latent-cache", help="Keep encodings in temporary files, not the cache."),
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps.")] = 0,
    checkpoints_total_limit: Annotated[
        int, typer.Option(min=0, help="Checkpoints to keep, the newest (0: all).")
    ] = 2,
    max_grad_norm: Annotated[
        float, typer.Option(min=0, help="Clip the gradient norm to this (0: no clipping).")
    ] = 1.0,
    adam_beta1: Annotated[float, typer.Option(min=0, max=1, help="AdamW's beta1.")] = 0.9,
    adam_beta2: Annotated[float, typer.Option(min=0, max=1, help="AdamW's beta2.")] = 0.999,
    adam_weight_decay: Annotated[
        float, typer.Option(min=0, help="AdamW's decoupled weight decay.")
    ] = 1e-2,
    adam_epsilon: Annotated[float, typer.Option(min=0, help="AdamW's epsilon.")] = 1e-8,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoint folder.")] = None,
    save_as: Annotated[
        str,
        typer.Option(
            help="Also write the result for other tools: kohya (a LoRA for ComfyUI/A1111) or "
            "single-file (one original SD checkpoint); diffusers writes only the run's own."
        ),
    ] = "diffusers",
    compare: Annotated[
        bool, typer.Option(help="Probe the unfrozen run to measure savings.")
    ] = True,
    report: Annotated[Path | None, typer.Option(help="Write the savings report JSON here.")] = None,
    json_path: JsonOption = None,
) -> None:
    """Fine-tune under the model's verified freeze policy and report what freezing saved."""
    from guardtune.training.config import TrainConfig
    from guardtune.training.finetune import finetune as run_finetune

    main = is_main_process()

    def action() -> TrainResult:
        config = TrainConfig(  # its checks of the choices get the error contract here
            steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
            lr_scheduler=lr_scheduler, warmup_steps=warmup_steps, resolution=resolution,
            seed=seed, lora=lora, rank=rank, snr_gamma=snr_gamma,
            prior_loss_weight=prior_loss_weight, gradient_checkpointing=gradient_checkpointing,
            mixed_precision=mixed_precision, optimizer=optimizer,
            checkpoint_every=checkpoint_every, checkpoints_total_limit=checkpoints_total_limit,
            max_grad_norm=max_grad_norm, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
            adam_weight_decay=adam_weight_decay, adam_epsilon=adam_epsilon, epochs=epochs,
            random_flip=random_flip, random_crop=random_crop, enable_bucket=enable_bucket,
            min_bucket_reso=min_bucket_reso, max_bucket_reso=max_bucket_reso,
            bucket_reso_steps=bucket_reso_steps, caption_dropout_rate=caption_dropout_rate,
            noise_offset=noise_offset, use_ema=use_ema, ema_decay=ema_decay,
            validation_prompts=tuple(validation_prompt or ()), validation_steps=validation_steps,
            num_validation_images=num_validation_images, report_to=report_to,
        )  # fmt: skip
        result = run_finetune(
            data, out, model=_source(model, model_config, revision, variant), policy=policy,
            trusted=tuple(trusted or ()), no_policy=no_policy,
            ignore_shipped_policy=ignore_shipped_policy, config=config,
            caption_column=caption_column, instance_prompt=instance_prompt,
            class_data=class_data, class_prompt=class_prompt, resume=resume, save_as=save_as,
            compare=compare, settings=_settings(ctx), cache=not no_latent_cache,
            cache_dir=cache_dir,
        )  # fmt: skip
        if report is not None and result.savings is not None and main:
            atomic.write_json(report, jsonable(result.savings))
        return result

    run_command(action, json_path if main else None, _main_process_only(render_finetune))


# ----------------------------------------------------------------------------- audit


@app.command()
def audit(
    derivative: Annotated[
        Path, typer.Argument(help="Fine-tuned model: diffusers folder, .safetensors or LoRA file.")
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            "-b",
            help="The published base model ('digits', a folder, a hub id...); default: the one "
            "the derivative's provenance names, if it is here.",
        ),
    ] = None,
    model_config: ModelConfigOption = None,
    revision: RevisionOption = None,
    variant: VariantOption = None,
    policy: PolicyOption = None,
    trusted: TrustedOption = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Refuse frozen tensors rounded to another dtype (e.g. fp16)."
        ),
    ] = False,
    json_path: JsonOption = None,
) -> None:
    """Prove a derivative left every frozen tensor untouched (exit 0), or list what broke (7)."""
    from guardtune.enforce.audit import audit as run_audit

    report = run_command(
        lambda: run_audit(derivative,
                          base=base and _source(base, model_config, revision, variant),
                          policy_path=policy, trusted_files=tuple(trusted or ()), strict=strict),
        json_path, render_audit,
    )  # fmt: skip
    if not report.compliant:
        first, more = report.violations[0], len(report.violations) - 1
        err_console.print(
            f"[bold red]error:[/] {report.derivative} violates the policy: {first.tensor} "
            f"{first.problem}" + (f" (and {more} more, listed above)" if more else ""),
            soft_wrap=True,
        )
        raise typer.Exit(int(ExitCode.INTEGRITY_VIOLATION))


# ----------------------------------------------------------------------------- export


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A `guardtune finetune` output folder.")],
    to: Annotated[
        str,
        typer.Option(help="kohya (a LoRA run, for ComfyUI/A1111) or single-file (a full run)."),
    ],
    out: Annotated[Path, typer.Option(help="The .safetensors file to write.")],
    json_path: JsonOption = None,
) -> None:
    """Write a fine-tune as the files other tools load, its provenance in the metadata."""
    from guardtune.export import export as run_export

    run_command(lambda: run_export(run, out, to=to), json_path, render_export)


# ----------------------------------------------------------------------------- evaluate


@app.command(cls=_renamed({"--steps": "--user-steps"}))
def evaluate(
    ctx: typer.Context,
    illegal: Annotated[list[Path], typer.Option(help="Illegal-class data folder (repeatable).")],
    legal: Annotated[list[Path], typer.Option(help="Legal data folder (repeatable).")],
    config_file: ConfigOption = None,
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    revision: RevisionOption = None,
    variant: VariantOption = None,
    policy: PolicyOption = None,
    trusted: TrustedOption = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma list of full,random,blocks,freezeasguard,imma,uce,persguard and "
            "freezeasguard+uce (with --combined-model)."
        ),
    ] = "full,random,blocks,freezeasguard,imma,uce,persguard",
    combined_model: Annotated[
        Path | None,
        typer.Option(
            help="freezeasguard+uce: the edited model folder publish wrote (policy beside)."
        ),
    ] = None,
    ratio: Annotated[
        float | None, typer.Option(help="Frozen-parameter share of random/blocks (the policy's).")
    ] = None,
    steps: Annotated[
        str,
        typer.Option("--user-steps", help="User fine-tune steps to score at, e.g. 50,100,200."),
    ] = "50,100,200",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per method.")] = 2,
    samples: Annotated[int, typer.Option(min=1, help="Samples per task and checkpoint.")] = 32,
    scorer: Annotated[
        str, typer.Option(help="auto (digits on the embedded model, else loss), clip:FOLDER.")
    ] = "auto",
    lr: Annotated[float, typer.Option(help="The simulated user's learning rate.")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="The user's batch size.")] = 16,
    defense_steps: Annotated[
        int, typer.Option(min=1, help="Training rounds of the IMMA and PersGuard defences.")
    ] = 200,
    plot: Annotated[Path | None, typer.Option(help="PNG plot of the results.")] = Path(
        "runs/evaluate/evaluate.png"
    ),
    work_dir: Annotated[
        Path, typer.Option(help="Journal of finished runs; the same evaluation resumes from it.")
    ] = Path("runs/evaluate"),
    json_path: JsonOption = None,
) -> None:
    """Measure how much each method stops illegal adaptation and costs legal adaptation.

    Every finished run is journalled under --work-dir: rerunning the same command after a
    crash (or to see the tables again) continues where it stopped, and a run that another
    evaluation already did with the same settings (another policy, more methods) is reused.
    """
    from guardtune.evaluate.attack import AttackConfig
    from guardtune.evaluate.imma import ImmaConfig
    from guardtune.evaluate.persguard import PersGuardConfig
    from guardtune.evaluate.run import EvaluateConfig
    from guardtune.evaluate.run import evaluate as run_evaluate

    try:
        checkpoints = tuple(int(s) for s in steps.split(",") if s.strip())
    except ValueError:
        message = f"--user-steps must be a comma list of integers, got {steps!r}"
        raise typer.BadParameter(message) from None
    config = EvaluateConfig(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()), ratio=ratio,
        steps=checkpoints, seeds=seeds, samples=samples, scorer=scorer,
        attack=AttackConfig(lr=lr, batch_size=batch_size), imma=ImmaConfig(steps=defense_steps),
        persguard=PersGuardConfig(steps=defense_steps),
    )  # fmt: skip

    run_command(
        lambda: run_evaluate(illegal, legal, model=_source(model, model_config, revision, variant),
                             policy=policy, trusted=tuple(trusted or ()), config=config,
                             plot=plot, workdir=work_dir, settings=_settings(ctx),
                             combined=combined_model),
        json_path, render_evaluate,
    )  # fmt: skip


# ----------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("runs/demo"),
    samples: Annotated[int, typer.Option(min=1, help="Samples per digit.")] = 16,
    steps: Annotated[int, typer.Option(min=0, help="Fine-tune steps (0: skip).")] = 150,
    json_path: JsonOption = None,
) -> None:
    """The main job on the embedded default: sample, fine-tune under the policy, compare."""
    from guardtune.digits.demo import run_demo

    run_command(
        lambda: run_demo(out, samples_per_digit=samples, finetune_steps=steps),
        json_path, render_demo,
    )  # fmt: skip


def entry() -> None:
    """Console-script entry point."""
    app(prog_name="guardtune")


if __name__ == "__main__":
    entry()
