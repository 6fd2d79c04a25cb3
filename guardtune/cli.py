"""The `guardtune` command line: a thin Typer shell over the library.

Each command parses its options, calls one library function, and renders the result as a Rich
table (and as JSON with `--json FILE`). Errors from the library (GuardtuneError) become one red
line and the error's exit code; anything else is a bug (exit 1). `--debug` shows tracebacks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from guardtune import __version__, atomic
from guardtune.errors import DataError, ExitCode, GuardtuneError

app = typer.Typer(
    help="Freeze-policy guarded fine-tuning for text-to-image diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Export and check training data folders.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out_console = Console()
err_console = Console(stderr=True)
_debug = False

T = TypeVar("T")

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="'digits', a diffusers folder, or a .safetensors file.")
]
ModelConfigOption = Annotated[
    Path | None,
    typer.Option("--model-config", help="Config folder for a single-file .safetensors model."),
]
JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Also write the result as JSON to this file.")
]


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
        out_console.print(f"guardtune {__version__}")
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


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


# ----------------------------------------------------------------------------- data


@data_app.command("digits")
def data_digits(
    out: Annotated[Path, typer.Argument(help="Folder to create (PNG files + metadata.jsonl).")],
    classes: Annotated[str, typer.Option(help="Digits to export, e.g. '7,9' or '0-6'.")] = "7",
    split: Annotated[
        str, typer.Option(help="train, test or all; train and test never overlap.")
    ] = ("train"),
    style: Annotated[str, typer.Option(help="plain, bold, slant or outline strokes.")] = "plain",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty OUT.")] = False,
    json_path: JsonOption = None,
) -> None:
    """Export real handwritten digits (scikit-learn's) as a ready training folder."""
    from guardtune.digits.dataset import export_digits, parse_classes

    def action():
        try:
            digits = parse_classes(classes)
        except ValueError as error:
            raise DataError(f"--classes: {error}") from error
        return export_digits(out, digits, split, style, overwrite)

    def render(report) -> None:
        per_class = ", ".join(f"{d}: {n}" for d, n in report.per_class.items())
        rows = [("folder", str(report.out)), ("split", report.split), ("style", report.style)]
        rows += [("images", str(report.images)), ("per class", per_class)]
        out_console.print(_table("Exported digits", rows))

    run_command(action, json_path, render)


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
    from guardtune.data import scan_folder

    @dataclasses.dataclass(frozen=True)
    class CheckReport:
        folder: Path
        layout: str
        examples: int
        unique_images: int
        captions: tuple[str, ...]

    def action() -> CheckReport:
        scan = scan_folder(folder, caption_column, instance_prompt)
        captions = tuple(sorted({e.caption for e in scan.examples}))
        return CheckReport(folder, scan.layout, len(scan), scan.unique_images, captions)

    def render(report: CheckReport) -> None:
        shown = ", ".join(report.captions[:5]) + (" ..." if len(report.captions) > 5 else "")
        rows = [("folder", str(report.folder)), ("layout", report.layout)]
        rows += [("examples per epoch", str(report.examples))]
        rows += [("images", str(report.unique_images)), ("captions", shown)]
        out_console.print(_table("Data folder", rows))

    run_command(action, json_path, render)


# ----------------------------------------------------------------------------- generate


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[Path, typer.Option(help="PNG file for the grid of all samples.")],
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    num: Annotated[int, typer.Option(min=1, help="Number of images.")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="Denoising steps (DDIM).")] = 25,
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
    from guardtune.generate import generate_to_files, load_lora
    from guardtune.models import load_pipeline

    def action():
        pipeline = load_pipeline(model, model_config)
        if lora is not None:
            load_lora(pipeline, lora)
        return generate_to_files(pipeline, prompt, out, num, steps, seed, guidance, out_dir, scale)

    def render(result) -> None:
        rows = [("prompt", result.prompt), ("images", str(result.num)), ("seed", str(result.seed))]
        rows += [("grid", str(result.grid)), ("seconds", f"{result.seconds:.1f}")]
        if result.files:
            rows.append(("single images", str(result.files[0].parent)))
        out_console.print(_table("Generated", rows))

    run_command(action, json_path, render)


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
        bool, typer.Option(help="Encrypt the private key (prompted, or $GUARDTUNE_KEY_PASSPHRASE).")
    ] = False,
    json_path: JsonOption = None,
) -> None:
    """Create a publisher signing key pair (the private key file is mode 0600)."""
    from guardtune.trust.signing import PASSPHRASE_ENV, write_keypair

    @dataclasses.dataclass(frozen=True)
    class KeygenResult:
        private_key: Path
        public_key: Path
        keyid: str
        key_type: str
        encrypted: bool

    def action() -> KeygenResult:
        secret = None
        if passphrase:
            text = os.environ.get(PASSPHRASE_ENV) or typer.prompt(
                "Passphrase", hide_input=True, confirmation_prompt=True
            )
            secret = text.encode()
        private, public, keyid = write_keypair(out, key_type, secret)
        return KeygenResult(private, public, keyid, key_type, secret is not None)

    def render(result: KeygenResult) -> None:
        rows = [("private key", str(result.private_key)), ("public key", str(result.public_key))]
        rows += [("key id", result.keyid), ("type", result.key_type)]
        rows += [("encrypted", "yes" if result.encrypted else "no")]
        out_console.print(_table("Key pair", rows))

    run_command(action, json_path, render)


@policy_app.command("sign")
def policy_sign(
    mask: Annotated[Path, typer.Option(help="Tensor names (text or JSON list) or a 0/1 CSV.")],
    key: Annotated[list[Path], typer.Option(help="Private key (repeatable for co-signing).")],
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write (default: guardtune-policy.json in the model)."),
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="Expiry, UTC ISO 8601, e.g. 2027-12-31T00:00:00Z.")
    ] = None,
    method: Annotated[str, typer.Option(help="How the mask was made, for the record.")] = "manual",
    json_path: JsonOption = None,
) -> None:
    """Turn a freeze mask into a signed policy bound to the model's exact weights."""
    from guardtune.models import resolve_model
    from guardtune.trust.build import build_policy, read_mask, sign_policy_file
    from guardtune.trust.policy import Provenance, parse_time
    from guardtune.trust.signing import load_private_key
    from guardtune.trust.verify import default_policy_path

    @dataclasses.dataclass(frozen=True)
    class SignResult:
        policy: Path
        frozen_tensors: int
        frozen_share_parameters: float
        frozen_share_tensors: float
        signers: tuple[str, ...]

    def action() -> SignResult:
        source = resolve_model(model, model_config)
        if expires is not None:
            parse_time(expires, "--expires")
        keys = [load_private_key(path) for path in key]
        names = read_mask(mask, source)
        policy = build_policy(source, names, Provenance(method, {"mask_file": mask.name}), expires)
        target = out or default_policy_path(source)
        sign_policy_file(policy, keys, target)
        from guardtune.trust.signing import key_id

        signers = tuple(key_id(k.public_key()) for k in keys)
        share = policy.frozen_share
        return SignResult(
            target, len(policy.frozen_tensors), share.parameters, share.tensors, signers
        )

    def render(result: SignResult) -> None:
        rows = [("policy", str(result.policy)), ("frozen tensors", str(result.frozen_tensors))]
        rows += [("frozen parameters", f"{result.frozen_share_parameters:.1%}")]
        rows += [("frozen tensors share", f"{result.frozen_share_tensors:.1%}")]
        rows += [("signed by", ", ".join(k[:16] for k in result.signers))]
        out_console.print(_table("Signed policy", rows))

    run_command(action, json_path, render)


@policy_app.command("verify")
def policy_verify(
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    policy: PolicyOption = None,
    trusted: TrustedOption = None,
    json_path: JsonOption = None,
) -> None:
    """Check a policy's signature, validity and binding to the model (exit 0, 4, 5 or 6)."""
    from guardtune.trust.verify import verify_policy

    @dataclasses.dataclass(frozen=True)
    class VerifyResult:
        policy: Path
        model: str
        signer_keyid: str
        signer_key_file: Path
        frozen_tensors: int
        frozen_share_parameters: float
        expires_at: str | None

    def action() -> VerifyResult:
        verified = verify_policy(model, policy, trusted or (), model_config=model_config)
        p = verified.policy
        return VerifyResult(
            verified.policy_path, verified.model, verified.signer_keyid,
            verified.signer_key_file, len(p.frozen_tensors), p.frozen_share.parameters,
            p.expires_at,
        )  # fmt: skip

    def render(result: VerifyResult) -> None:
        rows = [("policy", str(result.policy)), ("model", result.model)]
        rows += [("signed by", f"{result.signer_keyid[:16]} ({result.signer_key_file})")]
        rows += [("frozen tensors", str(result.frozen_tensors))]
        rows += [("frozen parameters", f"{result.frozen_share_parameters:.1%}")]
        rows += [("expires", result.expires_at or "never")]
        out_console.print(_table("[green]Policy verified[/]", rows))

    run_command(action, json_path, render)


@policy_app.command("show")
def policy_show(
    policy: Annotated[Path, typer.Argument(help="A signed policy file.")],
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    plot: Annotated[Path | None, typer.Option(help="Write a block heatmap PNG here.")] = None,
    json_path: JsonOption = None,
) -> None:
    """Where a policy freezes: the frozen share per UNet block (signature not checked)."""
    from guardtune.trust.inspection import describe_policy

    def render(report) -> None:
        table = Table(title=f"Frozen share per UNet block: {report.policy}", title_justify="left")
        for column in ("block", "frozen tensors", "frozen parameters", "share"):
            table.add_column(column, justify="left" if column == "block" else "right")
        for row in report.blocks:
            table.add_row(
                row.block, f"{row.frozen_tensors}/{row.tensors}",
                f"{row.frozen_parameters:,}/{row.parameters:,}", f"{row.parameter_share:.0%}",
            )  # fmt: skip
        out_console.print(table)
        out_console.print(
            f"total: {report.frozen_share_parameters:.1%} of parameters, "
            f"{report.frozen_share_tensors:.1%} of tensors; method {report.method}; "
            f"signed by {', '.join(k[:16] for k in report.signer_keyids)} (not verified here)"
        )
        if report.plot:
            out_console.print(f"heatmap: {report.plot}")

    run_command(lambda: describe_policy(policy, model, model_config, plot), json_path, render)


# ----------------------------------------------------------------------------- publish


@app.command()
def publish(
    illegal: Annotated[list[Path], typer.Option(help="Illegal-class data folder (repeatable).")],
    legal: Annotated[list[Path], typer.Option(help="Legal data folder (repeatable).")],
    key: Annotated[list[Path], typer.Option(help="Publisher's private key (repeatable).")],
    ratio: Annotated[float, typer.Option(help="Share to freeze, p.")] = 0.3,
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    method: Annotated[str, typer.Option(help="freezeasguard or random (random-p).")] = (
        "freezeasguard"
    ),
    share_by: Annotated[str, typer.Option(help="Count p in parameters or tensors.")] = (
        "parameters"
    ),
    relearn_steps: Annotated[int, typer.Option(min=1, help="Steps to get theta_ft.")] = 200,
    steps: Annotated[int, typer.Option(min=1, help="Mask updates.")] = 150,
    user_steps_per_update: Annotated[int, typer.Option(min=1, help="User steps per update.")] = 4,
    user_lr: Annotated[float, typer.Option(help="Simulated user's learning rate.")] = 1e-4,
    user_reset_every: Annotated[
        int, typer.Option(min=1, help="Mask updates between restarts of the simulated user.")
    ] = 50,
    mask_lr: Annotated[float, typer.Option(help="Mask step size.")] = 0.05,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per half-batch.")] = 8,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path | None, typer.Option(help="Policy file (default: in the model).")] = None,
    work_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints (default: runs/publish/<model>).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in the work folder.")] = False,
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
        mask_lr=mask_lr, batch_size=batch_size, seed=seed,
    )  # fmt: skip

    def action():
        keys = [load_private_key(path) for path in key]
        result = run_publish(illegal, legal, keys, model, model_config, method, config, out,
                             workdir=work_dir, resume=resume)  # fmt: skip
        if result is None:  # a non-main process of `accelerate launch`: rank 0 reports
            raise typer.Exit(0)
        return result

    def render(result) -> None:
        rows = [("policy", str(result.policy)), ("method", result.method)]
        rows += [("frozen tensors", str(result.frozen_tensors))]
        rows += [("frozen parameters", f"{result.frozen_share_parameters:.1%}")]
        rows += [("signed by", ", ".join(k[:16] for k in result.signers))]
        rows += [("log", str(result.log)), ("curve", str(result.curve or "-"))]
        rows += [("seconds", f"{result.seconds:.1f}")]
        out_console.print(_table("Published policy", rows))

    run_command(action, json_path, render)


# ----------------------------------------------------------------------------- finetune


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def render_savings(report) -> None:
    """The savings report: measured frozen vs unfrozen, then the analytic breakdown."""
    table = Table(title="What freezing saved (measured, same configuration)", title_justify="left")
    for column in ("", "frozen (this run)", "nothing frozen", "saving"):
        table.add_column(column, justify="right" if column else "left")
    memory = report.peak_memory_bytes
    times = report.step_time_s
    table.add_row("peak memory", _mib(memory["frozen"]), _mib(memory["unfrozen"]),
                  f"{report.memory_saving:.1%}")  # fmt: skip
    table.add_row("median step time", f"{times['frozen'] * 1000:.0f} ms",
                  f"{times['unfrozen'] * 1000:.0f} ms", f"{report.time_saving:.1%}")  # fmt: skip
    for name, values in report.analytic_bytes.items():
        saved = values["unfrozen"] - values["frozen"]
        label = f"  {name.replace('_', ' ')}"
        saved_text = _mib(saved) if saved else ""
        table.add_row(label, _mib(values["frozen"]), _mib(values["unfrozen"]), saved_text)
    out_console.print(table)
    out_console.print(
        f"frozen: {report.frozen_tensors}/{report.total_tensors} tensors, "
        f"{report.frozen_params:,}/{report.total_params:,} parameters; memory measured as "
        f"{report.measurement}; growth over the loaded model saved "
        f"{report.training_memory_saving:.1%}"
    )


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(help="Training images (any layout of `data check`).")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/finetune"),
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    policy: PolicyOption = None,
    trusted: TrustedOption = None,
    no_policy: Annotated[bool, typer.Option(help="Train a model that has no policy.")] = False,
    lora: Annotated[
        bool, typer.Option(help="Train LoRA adapters instead of full weights.")
    ] = False,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per step.")] = 1,
    lr: Annotated[float | None, typer.Option(help="Learning rate (1e-5 full, 1e-4 LoRA).")] = None,
    lr_scheduler: Annotated[str, typer.Option(help="constant, linear, cosine, ...")] = "constant",
    warmup_steps: Annotated[int, typer.Option(min=0)] = 0,
    resolution: Annotated[int | None, typer.Option(help="Training size (model's own).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    snr_gamma: Annotated[float | None, typer.Option(help="Min-SNR loss weighting.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option()] = False,
    mixed_precision: Annotated[str, typer.Option(help="auto, no, bf16 or fp16.")] = "auto",
    optimizer: Annotated[str, typer.Option(help="adamw or adamw8bit.")] = "adamw",
    caption_column: Annotated[str, typer.Option()] = "text",
    instance_prompt: Annotated[str | None, typer.Option(help="DreamBooth prompt.")] = None,
    class_data: Annotated[Path | None, typer.Option(help="Prior-preservation images.")] = None,
    class_prompt: Annotated[str | None, typer.Option(help="Prompt of the class images.")] = None,
    prior_loss_weight: Annotated[float, typer.Option()] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps.")] = 0,
    resume: Annotated[str | None, typer.Option(help="'latest' or a checkpoint folder.")] = None,
    compare: Annotated[
        bool, typer.Option(help="Probe the unfrozen run to measure savings.")
    ] = True,
    report: Annotated[Path | None, typer.Option(help="Write the savings report JSON here.")] = None,
    json_path: JsonOption = None,
) -> None:
    """Fine-tune under the model's verified freeze policy and report what freezing saved."""
    from guardtune.training.config import TrainConfig
    from guardtune.training.finetune import finetune as run_finetune

    config = TrainConfig(
        steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        lr_scheduler=lr_scheduler, warmup_steps=warmup_steps, resolution=resolution, seed=seed,
        lora=lora, rank=rank, snr_gamma=snr_gamma, prior_loss_weight=prior_loss_weight,
        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
        optimizer=optimizer, checkpoint_every=checkpoint_every,
    )  # fmt: skip

    # Under `accelerate launch` every rank runs this command; only rank 0 reports and writes.
    main_rank = os.environ.get("RANK", "0") == "0"

    def action():
        result = run_finetune(
            data, out, model=model, model_config=model_config, policy=policy,
            trusted=tuple(trusted or ()), no_policy=no_policy, config=config,
            caption_column=caption_column, instance_prompt=instance_prompt,
            class_data=class_data, class_prompt=class_prompt, resume=resume, compare=compare,
        )  # fmt: skip
        if report is not None and result.savings is not None and main_rank:
            atomic.write_json(report, jsonable(result.savings))
        return result

    def render(result) -> None:
        if not main_rank:
            return
        trusted_by = f"signed by {result.signer_keyid[:16]}" if result.signer_keyid else ""
        policy_row = (
            f"{result.policy} ({trusted_by})" if result.policy else "[yellow]none (--no-policy)[/]"
        )
        rows = [("output", str(result.out)), ("mode", result.mode), ("policy", policy_row)]
        resumed = f" (resumed at {result.resumed_from})" if result.resumed_from else ""
        rows += [("steps", f"{result.steps}{resumed}")]
        rows += [("final loss", f"{result.final_loss:.4f}")]
        share = f"{result.freeze.frozen_share:.1%} of UNet parameters"
        rows += [("frozen", f"{result.freeze.frozen_tensors} tensors, {share}")]
        rows += [("processes", str(result.processes)), ("seconds", f"{result.seconds:.1f}")]
        out_console.print(_table("Fine-tuned", rows))
        if result.savings is not None:
            render_savings(result.savings)

    run_command(action, json_path if main_rank else None, render)


# ----------------------------------------------------------------------------- audit


@app.command()
def audit(
    derivative: Annotated[
        Path, typer.Argument(help="Fine-tuned model: diffusers folder, .safetensors or LoRA file.")
    ],
    base: Annotated[
        str, typer.Option("--base", "-b", help="The published base model ('digits', a folder...).")
    ] = "digits",
    model_config: ModelConfigOption = None,
    policy: PolicyOption = None,
    trusted: TrustedOption = None,
    strict: Annotated[
        bool, typer.Option(help="Refuse frozen tensors rounded to another dtype (e.g. fp16).")
    ] = False,
    json_path: JsonOption = None,
) -> None:
    """Prove a derivative left every frozen tensor untouched (exit 0), or list what broke (7)."""
    from guardtune.enforce.audit import audit as run_audit

    def render(report) -> None:
        verdict = "[green]compliant[/]" if report.compliant else "[bold red]NOT compliant[/]"
        rows = [("derivative", f"{report.derivative} ({report.kind}, {report.naming} naming)")]
        rows += [("base", report.base), ("policy", str(report.policy))]
        rows += [("signed by", report.signer_keyid[:16])]
        rows += [("frozen tensors", str(report.frozen_tensors))]
        rows += [(name, str(count)) for name, count in sorted(report.counts.items())]
        check = report.provenance
        state = "absent" if not check.present else "consistent" if check.consistent else "FORGED"
        rows += [("provenance", f"{state} ({check.where})" if check.present else state)]
        rows += [("mode", "strict" if report.strict else "default (casts allowed)")]
        rows += [("seconds", f"{report.seconds:.2f}")]
        out_console.print(_table(f"Audit: {verdict}", rows))
        if report.violations:
            table = Table(title="Violations", title_justify="left")
            for column in ("tensor", "problem", "detail", "derivative key"):
                table.add_column(column, overflow="fold")
            for finding in report.violations:
                table.add_row(finding.tensor, finding.problem, finding.detail, finding.key or "")
            out_console.print(table)

    report = run_command(
        lambda: run_audit(derivative, base, policy, tuple(trusted or ()),
                          model_config=model_config, strict=strict),
        json_path, render,
    )  # fmt: skip
    if not report.compliant:
        first, more = report.violations[0], len(report.violations) - 1
        err_console.print(
            f"[bold red]error:[/] {report.derivative} violates the policy: {first.tensor} "
            f"{first.problem}" + (f" (and {more} more, listed above)" if more else ""),
            soft_wrap=True,
        )
        raise typer.Exit(int(ExitCode.INTEGRITY_VIOLATION))


# ----------------------------------------------------------------------------- evaluate


def _spread(mean: float, spread: float, percent: bool = False) -> str:
    if percent:
        return f"{mean:.0%} ± {spread / 2:.0%}"
    return f"{mean:.3f} ± {spread / 2:.3f}"


@app.command()
def evaluate(
    illegal: Annotated[list[Path], typer.Option(help="Illegal-class data folder (repeatable).")],
    legal: Annotated[list[Path], typer.Option(help="Legal data folder (repeatable).")],
    model: ModelOption = "digits",
    model_config: ModelConfigOption = None,
    policy: PolicyOption = None,
    trusted: TrustedOption = None,
    methods: Annotated[
        str, typer.Option(help="Comma list of full,random,blocks,freezeasguard,imma,uce,persguard.")
    ] = "full,random,blocks,freezeasguard,imma,uce,persguard",
    ratio: Annotated[
        float | None, typer.Option(help="Frozen-parameter share of random/blocks (the policy's).")
    ] = None,
    steps: Annotated[str, typer.Option(help="User fine-tune checkpoints, e.g. 50,100,200.")] = (
        "50,100,200"
    ),
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
        message = f"--steps must be a comma list of integers, got {steps!r}"
        raise typer.BadParameter(message) from None
    config = EvaluateConfig(
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()), ratio=ratio,
        steps=checkpoints, seeds=seeds, samples=samples, scorer=scorer,
        attack=AttackConfig(lr=lr, batch_size=batch_size), imma=ImmaConfig(steps=defense_steps),
        persguard=PersGuardConfig(steps=defense_steps),
    )  # fmt: skip

    def render(result) -> None:
        final = result.final()
        scored = result.scorer != "loss"
        title = f"After {max(result.steps)} user fine-tune steps, {result.seeds} seed(s)"
        table = Table(title=f"{title}: mean ± half spread", title_justify="left")
        table.add_column("method")
        table.add_column("frozen", justify="right")
        for task, kind in result.tasks.items():
            metric = final[[r.task for r in final].index(task)].metric
            better = "lower" if kind == "illegal" and scored else "higher"
            if not scored:
                better = "higher" if kind == "illegal" else "lower"
            table.add_column(f"{kind}: {task}\n{metric} ({better} better)", justify="right")
            table.add_column("mitigation" if kind == "illegal" else "legal impact",
                             justify="right")  # fmt: skip
        for method in dict.fromkeys(r.method for r in final):
            cells = [method, f"{result.frozen_share.get(method, 0):.1%}"]
            for task in result.tasks:
                row = next(r for r in final if r.method == method and r.task == task)
                cells += [_spread(row.mean, row.spread), f"{row.versus_full:+.0%}"]
            table.add_row(*cells)
        out_console.print(table)
        curve = Table(title="Illegal tasks over the user's fine-tune", title_justify="left")
        curve.add_column("method")
        illegal_tasks = [t for t, k in result.tasks.items() if k == "illegal"]
        for task in illegal_tasks:
            for step in result.steps:
                curve.add_column(f"{task} @{step}", justify="right")
        for method in dict.fromkeys(r.method for r in result.summary):
            cells = [method]
            for task in illegal_tasks:
                for step in result.steps:
                    row = next(r for r in result.summary
                               if (r.method, r.task, r.step) == (method, task, step))  # fmt: skip
                    cells.append(_spread(row.mean, row.spread))
            curve.add_row(*cells)
        out_console.print(curve)
        plotted = f"plot: {result.plot}   " if result.plot else ""
        reused = f" ({result.reused} runs from it)" if result.reused else ""
        out_console.print(f"{plotted}journal: {result.journal}{reused}   {result.seconds:.0f} s")

    run_command(
        lambda: run_evaluate(illegal, legal, model, model_config, policy, tuple(trusted or ()),
                             config, plot, workdir=work_dir),
        json_path, render,
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

    def score_table(title: str, rows) -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column("digit")
        table.add_column("prompt")
        table.add_column("seen in pretraining")
        table.add_column("recognised", justify="right")
        for row in rows:
            seen = "yes" if row.pretrained else "[yellow]no[/]"
            table.add_row(str(row.digit), row.prompt, seen, f"{row.recognised:.2f}")
        return table

    def render(report) -> None:
        out_console.print(
            score_table("What the embedded model draws (digit classifier)", report.rows)
        )
        out_console.print(f"grid: {report.grid}   data: {', '.join(map(str, report.data))}")
        if report.finetune is not None:
            result = report.finetune
            out_console.print(
                f"\nFine-tuned on {report.data[0]} for {result.steps} steps under "
                f"{result.policy} (signed by {result.signer_keyid[:16]}): "
                f"{result.freeze.frozen_tensors} tensors, {result.freeze.frozen_share:.1%} of UNet "
                f"parameters frozen and bit-identical"
            )
            if result.savings is not None:
                render_savings(result.savings)
            out_console.print(score_table("After fine-tuning", report.after))
            out_console.print(f"grid: {report.after_grid}")

    run_command(lambda: run_demo(out, samples, finetune_steps=steps), json_path, render)


def entry() -> None:
    """Console-script entry point."""
    app(prog_name="guardtune")


if __name__ == "__main__":
    entry()
