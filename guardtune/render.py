"""The CLI's presentation layer: each command's result as Rich tables and lines on stdout.

`guardtune.cli` parses options and calls one library function per command; the function
returns a frozen dataclass and the command hands it to its `render_<command>` here. Nothing
here computes, reads or writes files: what a result means is the library's business, and the
`--json` copy of it is the CLI's. Errors are not rendered here either (the CLI's error contract
prints them to stderr). Result types are imported for type checking only, so listing `--help`
costs no torch import.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from guardtune.data import FolderCheck
    from guardtune.digits.dataset import ExportReport
    from guardtune.digits.demo import DemoReport, DemoRow
    from guardtune.enforce.audit import AuditReport
    from guardtune.evaluate.run import EvaluationResult
    from guardtune.export import ExportResult
    from guardtune.generate import GenerateResult
    from guardtune.publish import PublishResult
    from guardtune.training.finetune import TrainResult
    from guardtune.training.savings import SavingsReport
    from guardtune.trust.build import SignedPolicy
    from guardtune.trust.inspection import PolicyReport
    from guardtune.trust.signing import KeygenResult
    from guardtune.trust.verify import VerificationSummary

console = Console()


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _spread(mean: float, spread: float) -> str:
    return f"{mean:.3f} ± {spread / 2:.3f}"


def _signers(keyids: Iterable[str]) -> str:
    return ", ".join(k[:16] for k in keyids)


# ----------------------------------------------------------------------------- data


def render_data_digits(report: ExportReport) -> None:
    per_class = ", ".join(f"{d}: {n}" for d, n in report.per_class.items())
    rows = [("folder", str(report.out)), ("split", report.split), ("style", report.style)]
    rows += [("images", str(report.images)), ("per class", per_class)]
    console.print(_table("Exported digits", rows))


def render_data_check(report: FolderCheck) -> None:
    shown = ", ".join(report.captions[:5]) + (" ..." if len(report.captions) > 5 else "")
    rows = [("folder", str(report.folder)), ("layout", report.layout)]
    rows += [("examples per epoch", str(report.examples))]
    rows += [("images", str(report.unique_images)), ("captions", shown)]
    console.print(_table("Data folder", rows))


# ----------------------------------------------------------------------------- generate


def render_generate(result: GenerateResult) -> None:
    rows = [("prompt", result.prompt), ("images", str(result.num)), ("seed", str(result.seed))]
    rows += [("grid", str(result.grid)), ("seconds", f"{result.seconds:.1f}")]
    if result.files:
        rows.append(("single images", str(result.files[0].parent)))
    console.print(_table("Generated", rows))


# ----------------------------------------------------------------------------- keys and policies


def render_keygen(result: KeygenResult) -> None:
    rows = [("private key", str(result.private_key)), ("public key", str(result.public_key))]
    rows += [("key id", result.keyid), ("type", result.key_type)]
    rows += [("encrypted", "yes" if result.encrypted else "no")]
    console.print(_table("Key pair", rows))


def render_policy_sign(result: SignedPolicy) -> None:
    rows = [("policy", str(result.policy)), ("frozen tensors", str(result.frozen_tensors))]
    rows += _in_part(result.tensors_in_part)
    rows += [("frozen parameters", f"{result.frozen_share_parameters:.1%}")]
    rows += [("frozen tensors share", f"{result.frozen_share_tensors:.1%}")]
    rows += [("signed by", _signers(result.signers))]
    console.print(_table("Signed policy", rows))


def render_policy_verify(summary: VerificationSummary) -> None:
    rows = [("policy", str(summary.policy)), ("model", summary.model)]
    rows += [("signed by", f"{summary.signer_keyid[:16]} ({summary.signer_key_file})")]
    rows += [("frozen tensors", str(summary.frozen_tensors))]
    rows += _in_part(summary.tensors_in_part)
    rows += [("frozen parameters", f"{summary.frozen_share_parameters:.1%}")]
    rows += [("expires", summary.expires_at or "never")]
    rows += [("configs", _bound_configs(summary.schema_version, summary.bound_configs))]
    console.print(_table("[green]Policy verified[/]", rows))


def _in_part(tensors: int) -> list[tuple[str, str]]:
    """A row for a schema 3 policy's tensors frozen in part (none for per-tensor policies)."""
    return [("frozen in part", f"{tensors} tensors (some output channels)")] if tensors else []


def _bound_configs(schema_version: int, bound: int | None) -> str:
    if bound is not None:
        return f"{bound} files bound (model_index.json, configs, scheduler, tokenizer)"
    why = "a schema 1 policy" if schema_version == 1 else "made for a single .safetensors file"
    return f"[yellow]not bound[/] ({why}: configs, scheduler and tokenizer may differ)"


def render_policy_show(report: PolicyReport) -> None:
    table = Table(title=f"Frozen share per UNet block: {report.policy}", title_justify="left")
    for column in ("block", "frozen tensors", "frozen parameters", "share"):
        table.add_column(column, justify="left" if column == "block" else "right")
    for row in report.blocks:
        table.add_row(
            row.block, f"{row.frozen_tensors}/{row.tensors}",
            f"{row.frozen_parameters:,}/{row.parameters:,}", f"{row.parameter_share:.0%}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"total: {report.frozen_share_parameters:.1%} of parameters, "
        f"{report.frozen_share_tensors:.1%} of tensors; method {report.method}; "
        f"signed by {_signers(report.signer_keyids)} (not verified here)"
    )
    if report.plot:
        console.print(f"heatmap: {report.plot}")


def render_publish(result: PublishResult) -> None:
    rows = [("policy", str(result.policy)), ("method", result.method)]
    rows += [("frozen tensors", str(result.frozen_tensors))]
    rows += _in_part(result.tensors_in_part)
    rows += [("frozen parameters", f"{result.frozen_share_parameters:.1%}")]
    rows += [("signed by", _signers(result.signers))]
    rows += [("log", str(result.log)), ("curve", str(result.curve or "-"))]
    rows += [("seconds", f"{result.seconds:.1f}")]
    console.print(_table("Published policy", rows))


# ----------------------------------------------------------------------------- finetune


def render_savings(report: SavingsReport) -> None:
    """Measured frozen vs unfrozen, then the analytic breakdown; `finetune` and `demo` show it.

    Each saving is the library's verdict: a saving or a cost only where its whole interval lies
    on that side of zero, else no measurable difference.
    """
    table = Table(title="What freezing saved (measured, same configuration)", title_justify="left")
    for column in ("", "frozen (this run)", "nothing frozen", "saving"):
        table.add_column(column, justify="right" if column else "left")
    memory = report.peak_memory_bytes
    table.add_row("peak memory", _mib(memory["frozen"]), _mib(memory["unfrozen"]),
                  report.memory_verdict)  # fmt: skip
    times, spreads = report.step_time_s, report.step_time_spread_s
    cells = [
        f"{times[n] * 1000:.0f} ms ({spreads[n][0] * 1000:.0f}-{spreads[n][1] * 1000:.0f})"
        for n in ("frozen", "unfrozen")
    ]
    table.add_row("step time (median, IQR)", *cells, report.time_verdict)
    for name, values in report.analytic_bytes.items():
        saved = values["unfrozen"] - values["frozen"]
        label = f"  {name.replace('_', ' ')}"
        saved_text = _mib(saved) if saved > 0 else ""  # a measured remainder can dip below
        table.add_row(label, _mib(values["frozen"]), _mib(values["unfrozen"]), saved_text)
    console.print(table)
    console.print(
        f"frozen: {report.frozen_tensors}/{report.total_tensors} tensors, "
        f"{report.frozen_params:,}/{report.total_params:,} parameters; memory measured as "
        f"{report.measurement}; growth over the loaded model "
        + (
            f"saved {report.training_memory_saving:.1%}"
            if report.training_memory_saving > 0
            else "not smaller"
        )
    )
    console.print(f"step time: {report.timing}")
    console.print(f"[dim]{report.device_note}[/]")


def render_finetune(result: TrainResult) -> None:
    trusted_by = f"signed by {result.signer_keyid[:16]}" if result.signer_keyid else ""
    policy_row = (
        f"{result.policy} ({trusted_by})" if result.policy else "[yellow]none (--no-policy)[/]"
    )
    rows = [("output", str(result.out)), ("mode", result.mode), ("policy", policy_row)]
    if result.ignored_policy is not None:
        rows += [("[bold yellow]set aside[/]", f"the model's own policy {result.ignored_policy}")]
    resumed = f" (resumed at {result.resumed_from})" if result.resumed_from else ""
    rows += [("steps", f"{result.steps}{resumed}")]
    rows += [("final loss", f"{result.final_loss:.4f}")]
    share = f"{result.freeze.frozen_share:.1%} of UNet parameters"
    rows += [("frozen", f"{result.freeze.frozen_tensors} tensors, {share}")]
    rows += [("processes", str(result.processes)), ("seconds", f"{result.seconds:.1f}")]
    if result.exported is not None:
        rows += [("also saved as", str(result.exported))]
    if result.validation:
        rows += [("validation grids", f"{len(result.validation)}, last {result.validation[-1]}")]
    if result.removed_staging:
        left = ", ".join(result.removed_staging)
        rows += [("cleaned up", f"half-written files of a killed run: {left}")]
    console.print(_table("Fine-tuned", rows))
    if result.savings is not None:
        render_savings(result.savings)
    elif result.savings_missing:
        console.print(f"[yellow]no savings comparison:[/] {result.savings_missing}")


# ----------------------------------------------------------------------------- audit


def render_export(result: ExportResult) -> None:
    rows = [("run", str(result.run)), ("format", result.format), ("written", str(result.out))]
    rows += [("tensors", str(result.tensors)), ("seconds", f"{result.seconds:.1f}")]
    console.print(_table("Exported", rows))


def render_audit(report: AuditReport) -> None:
    verdict = "[green]compliant[/]" if report.compliant else "[bold red]NOT compliant[/]"
    rows = [("derivative", f"{report.derivative} ({report.kind}, {report.naming} naming)")]
    rows += [("base", report.base), ("policy", str(report.policy))]
    rows += [("signed by", report.signer_keyid[:16])]
    rows += [("frozen tensors", str(report.frozen_tensors))]
    rows += [(name, str(count)) for name, count in sorted(report.counts.items())]
    check = report.provenance
    state = check.status.upper() if check.status == "forged" else check.status
    rows += [("provenance", f"{state} ({check.where})" if check.present else state)]
    rows += [("mode", "strict" if report.strict else "default (casts allowed)")]
    rows += [("seconds", f"{report.seconds:.2f}")]
    console.print(_table(f"Audit: {verdict}", rows))
    if report.violations:
        table = Table(title="Violations", title_justify="left")
        for column in ("tensor", "problem", "detail", "derivative key"):
            table.add_column(column, overflow="fold")
        for finding in report.violations:
            table.add_row(finding.tensor, finding.problem, finding.detail, finding.key or "")
        console.print(table)


# ----------------------------------------------------------------------------- evaluate


def render_evaluate(result: EvaluationResult) -> None:
    """The final checkpoint per method and task, then the illegal tasks over the fine-tune."""
    final = result.final()
    scored = result.scorer != "loss"
    title = f"After {max(result.steps)} user fine-tune steps, {result.seeds} seed(s)"
    table = Table(title=f"{title}: mean ± half spread", title_justify="left")
    table.add_column("method")
    table.add_column("frozen", justify="right")
    for task, kind in result.tasks.items():
        metric = final[[r.task for r in final].index(task)].metric
        # A score rises as a task is learned and a loss falls: which way is better flips.
        better = "lower" if kind == "illegal" and scored else "higher"
        if not scored:
            better = "higher" if kind == "illegal" else "lower"
        table.add_column(f"{kind}: {task}\n{metric} ({better} better)", justify="right")
        table.add_column("mitigation" if kind == "illegal" else "legal impact", justify="right")
    for method in dict.fromkeys(r.method for r in final):
        cells = [method, f"{result.frozen_share.get(method, 0):.1%}"]
        for task in result.tasks:
            row = next(r for r in final if r.method == method and r.task == task)
            cells += [_spread(row.mean, row.spread), f"{row.versus_full:+.0%}"]
        table.add_row(*cells)
    console.print(table)
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
    console.print(curve)
    for method, tasks in result.crossings.items():
        held = ", ".join(
            f"{task} at ~{step:.0f} steps"
            if step is not None
            else f"{task}: holds past {max(result.steps)}"
            for task, step in tasks.items()
        )
        level = f"{result.crossing_level:.0%}"
        console.print(f"{method}: mitigation falls below {level} for {held}")
    plotted = f"plot: {result.plot}   " if result.plot else ""
    reused = f" ({result.reused} runs from it)" if result.reused else ""
    console.print(f"{plotted}journal: {result.journal}{reused}   {result.seconds:.0f} s")


# ----------------------------------------------------------------------------- demo


def _score_table(title: str, rows: Iterable[DemoRow]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("digit")
    table.add_column("prompt")
    table.add_column("seen in pretraining")
    table.add_column("recognised", justify="right")
    for row in rows:
        seen = "yes" if row.pretrained else "[yellow]no[/]"
        table.add_row(str(row.digit), row.prompt, seen, f"{row.recognised:.2f}")
    return table


def render_demo(report: DemoReport) -> None:
    console.print(_score_table("What the embedded model draws (digit classifier)", report.rows))
    console.print(f"grid: {report.grid}   data: {', '.join(map(str, report.data))}")
    if report.finetune is not None:
        result = report.finetune
        console.print(
            f"\nFine-tuned on {report.data[0]} for {result.steps} steps under "
            f"{result.policy} (signed by {(result.signer_keyid or '')[:16]}): "
            f"{result.freeze.frozen_tensors} tensors, {result.freeze.frozen_share:.1%} of UNet "
            f"parameters frozen and bit-identical"
        )
        if result.savings is not None:
            render_savings(result.savings)
        console.print(_score_table("After fine-tuning", report.after))
        console.print(f"grid: {report.after_grid}")
