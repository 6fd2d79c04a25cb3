"""The `guardtune` command line: a thin Typer shell over the library.

Each command parses its options, calls one library function, and renders the result as a Rich
table (and as JSON with `--json FILE`). Errors from the library (GuardtuneError) become one red
line and the error's exit code; anything else is a bug (exit 1). `--debug` shows tracebacks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

# Offline by construction, and quiet: these must be set before transformers/diffusers load.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from guardtune import __version__, atomic  # noqa: E402
from guardtune.errors import DataError, ExitCode, GuardtuneError  # noqa: E402

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
    from guardtune.data import export_digits
    from guardtune.digits import parse_classes

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
    json_path: JsonOption = None,
) -> None:
    """Sample images from a model and write a PNG grid."""
    from guardtune.generate import generate_to_files
    from guardtune.models import load_pipeline

    def action():
        pipeline = load_pipeline(model, model_config)
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
    from guardtune.signing import PASSPHRASE_ENV, write_keypair

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
    from guardtune.masks import build_policy, read_mask, sign_policy_file
    from guardtune.models import resolve_model
    from guardtune.policy import Provenance, parse_time
    from guardtune.signing import load_private_key
    from guardtune.verify import default_policy_path

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
        draft = build_policy(source, names, Provenance(method, {"mask_file": mask.name}), expires)
        target = out or default_policy_path(source)
        sign_policy_file(draft.policy, keys, target)
        from guardtune.signing import key_id

        signers = tuple(key_id(k.public_key()) for k in keys)
        share = draft.policy.frozen_share
        return SignResult(
            target, len(draft.policy.frozen_tensors), share.parameters, share.tensors, signers
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
    from guardtune.verify import verify_policy

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
    from guardtune.inspection import describe_policy

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


# ----------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("runs/demo"),
    samples: Annotated[int, typer.Option(min=1, help="Samples per digit.")] = 16,
    json_path: JsonOption = None,
) -> None:
    """The main job on the embedded default: export data, sample every digit, score it."""
    from guardtune.demo import run_demo

    def render(report) -> None:
        table = Table(title="What the embedded model draws (digit classifier's verdict)")
        table.add_column("digit")
        table.add_column("prompt")
        table.add_column("seen in pretraining")
        table.add_column("recognised", justify="right")
        for row in report.rows:
            seen = "yes" if row.pretrained else "[yellow]no[/]"
            table.add_row(str(row.digit), row.prompt, seen, f"{row.recognised:.2f}")
        out_console.print(table)
        out_console.print(f"grid: {report.grid}   data: {', '.join(map(str, report.data))}")

    run_command(lambda: run_demo(out, samples), json_path, render)


def entry() -> None:
    """Console-script entry point."""
    app(prog_name="guardtune")


if __name__ == "__main__":
    entry()
