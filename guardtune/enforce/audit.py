"""Auditing a fine-tuned derivative: did it leave every frozen tensor as the publisher shipped it?

This is where a policy is enforced against a user who trained with any tool. `audit` verifies
the policy exactly as `finetune` does (signature, trust, expiry, binding to the base weights),
then reads the derivative without trusting it:

- full weights (a diffusers folder or a single `.safetensors` in diffusers, guardtune or
  original SD naming): every frozen tensor must equal the base. Same dtype: its sha256-tensor-v1
  digest under the policy's name must be the policy's digest, so the base is not read again.
  Other dtype: the base tensor cast to the derivative's dtype must match byte for byte; a cast
  that keeps every value (fp16 weights stored as fp32) is `lossless`, a rounding one is `cast`,
  which `--strict` refuses. Changed, missing and renamed tensors are listed with how much
  they moved.
- LoRA files (diffusers/peft or kohya naming): every adapter key is mapped to the UNet module it
  adapts; adapting a frozen weight is a violation, and so is a key that cannot be mapped (the
  audit cannot prove it misses the frozen tensors, so it fails closed).
- provenance (`guardtune-provenance.json` or the safetensors metadata `finetune` writes): if
  present it must name this base, this policy, its signer and the policy's frozen digests.

Tensors are read one at a time from the files (hashing is zero-copy from an mmap), so an SD
model is never in memory twice. The CLI turns a non-compliant report into exit 7.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from guardtune.contract import (
    LDM_UNET_PREFIX,
    LORA_FILE,
    PROVENANCE_FILE,
    PROVENANCE_METADATA_KEY,
    RunProvenance,
    weight_files,
)
from guardtune.enforce.freeze import frozen_unet_names
from guardtune.enforce.keynames import (
    ModuleIndex,
    diffusers_to_ldm_unet,
    is_lora_key,
    parse_lora_key,
)
from guardtune.errors import DataError
from guardtune.models import ModelSource, resolve_model
from guardtune.trust.fingerprint import (
    TensorRecord,
    hash_records,
    load_record,
    model_tensors,
    read_header,
    read_header_and_metadata,
    renamed,
)
from guardtune.trust.verify import VerifiedPolicy, verify_policy

# A bare UNet state dict (no component prefix) starts with one of these.
_UNET_ROOTS = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "up_blocks.")


@dataclass(frozen=True)
class Finding:
    """One frozen tensor (or adapted module) that breaks the policy, and how."""

    tensor: str  # the policy's name (`unet....weight`)
    problem: str  # changed | missing | renamed | cast | lora-on-frozen | unmapped | provenance
    detail: str
    key: str | None = None  # the derivative's own key, where it differs from `tensor`


@dataclass(frozen=True)
class ProvenanceCheck:
    present: bool
    consistent: bool | None  # None when absent
    where: str | None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditReport:
    derivative: Path
    kind: str  # "full" or "lora"
    naming: str  # diffusers | original-sd | peft/diffusers | kohya | mixed
    base: str
    policy: Path
    signer_keyid: str
    strict: bool
    frozen_tensors: int
    counts: dict[str, int]  # outcome -> how many (frozen tensors, or adapted modules for LoRA)
    provenance: ProvenanceCheck
    violations: tuple[Finding, ...]
    seconds: float

    @property
    def compliant(self) -> bool:
        return not self.violations


@dataclass(frozen=True)
class Derivative:
    """What the audit found at the path: its kind, naming, tensors and provenance text."""

    path: Path
    kind: str
    naming: str
    records: tuple[TensorRecord, ...]  # names as stored, folder component prefixed (`unet.`)
    provenance: str | None
    provenance_where: str | None


def audit(
    derivative: Path,
    base: str | ModelSource = "digits",
    policy_path: Path | None = None,
    trusted_files: Iterable[Path] = (),
    use_trust_dirs: bool = True,
    model_config: Path | None = None,
    strict: bool = False,
) -> AuditReport:
    """Check a derivative against the base's verified policy; never raises for violations."""
    start = time.perf_counter()
    source = base if isinstance(base, ModelSource) else resolve_model(base, model_config)
    verified = verify_policy(source, policy_path, trusted_files, use_trust_dirs, model_config)
    frozen = sorted(f"unet.{n}" for n in frozen_unet_names(verified.policy))
    base_records = {r.name: r for r in model_tensors(source, ("unet",))["unet"]}
    found = locate(derivative)
    if found.kind == "full":
        counts, violations = _audit_full(found, frozen, verified, base_records, strict)
    else:
        counts, violations = _audit_lora(found, frozen, verified, base_records, strict)
    provenance = check_provenance(found, verified)
    if provenance.consistent is False:
        violations += [
            Finding("provenance", "provenance", problem, found.provenance_where)
            for problem in provenance.problems
        ]
    return AuditReport(
        derivative=derivative, kind=found.kind, naming=found.naming, base=source.label,
        policy=verified.policy_path, signer_keyid=verified.signer_keyid, strict=strict,
        frozen_tensors=len(frozen), counts=dict(counts), provenance=provenance,
        violations=tuple(violations), seconds=time.perf_counter() - start,
    )  # fmt: skip


# ----------------------------------------------------------------------------- finding the files


def locate(path: Path) -> Derivative:
    """Recognise a derivative: diffusers folder, UNet folder, finetune output, or one file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"derivative {path} not found")
    if path.is_file():
        return _single_file(path)
    if (path / "model" / "model_index.json").is_file():  # a `finetune` output folder
        return locate(path / "model")
    if (path / LORA_FILE).is_file():
        return _single_file(path / LORA_FILE, fallback_provenance=path / PROVENANCE_FILE)
    folder = path / "unet" if (path / "model_index.json").is_file() else path
    plain, variants = weight_files(folder)
    # A folder saved with `variant="fp16"` has only variant files; otherwise they are extras.
    files = plain or variants
    if not files:
        raise DataError(
            f"{path} holds no UNet weights",
            hint="give a diffusers folder, its unet/ folder, a .safetensors file or a LoRA file",
        )
    records = tuple(renamed(r, f"unet.{r.name}") for f in files for r in read_header(f))
    text, where = _provenance_file(path / PROVENANCE_FILE)
    return Derivative(path, "full", "diffusers", records, text, where)


def _single_file(path: Path, fallback_provenance: Path | None = None) -> Derivative:
    if path.suffix != ".safetensors":
        raise DataError(f"{path} is not a .safetensors file", hint="convert it first")
    records, metadata = read_header_and_metadata(path)
    text = metadata.get(PROVENANCE_METADATA_KEY)
    where: str | None = f"{path.name} metadata"
    if text is None and fallback_provenance is not None:
        text, where = _provenance_file(fallback_provenance)
    if text is None:
        where = None
    names = [r.name for r in records]
    if any(is_lora_key(n) for n in names):
        kohya = any(n.startswith("lora_unet_") for n in names)
        peft = any(not n.startswith(("lora_unet_", "lora_te")) for n in names)
        naming = "mixed" if kohya and peft else "kohya" if kohya else "peft/diffusers"
        return Derivative(path, "lora", naming, tuple(records), text, where)
    if any(n.startswith(LDM_UNET_PREFIX) for n in names):
        return Derivative(path, "full", "original-sd", tuple(records), text, where)
    if not any(n.startswith("unet.") for n in names) and any(
        n.startswith(_UNET_ROOTS) for n in names
    ):
        records = [renamed(r, f"unet.{r.name}") for r in records]  # a bare UNet state dict
    return Derivative(path, "full", "diffusers", tuple(records), text, where)


def _provenance_file(path: Path) -> tuple[str | None, str | None]:
    try:
        return path.read_text(), str(path)
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} ({error})") from error


# ----------------------------------------------------------------------------- full weights


def _policy_names(
    found: Derivative, base_records: dict[str, TensorRecord]
) -> dict[str, TensorRecord]:
    """The derivative's UNet tensors under the policy's names (original SD keys translated)."""
    if found.naming != "original-sd":
        return {r.name: r for r in found.records if r.name.startswith("unet.")}
    to_diffusers = {
        ldm: f"unet.{name}"
        for name, ldm in diffusers_to_ldm_unet(
            n.removeprefix("unet.") for n in base_records
        ).items()
    }
    mapped = {}
    for record in found.records:
        if record.name.startswith(LDM_UNET_PREFIX):
            name = to_diffusers.get(record.name.removeprefix(LDM_UNET_PREFIX), record.name)
            mapped[name] = record
    return mapped


def _audit_full(
    found: Derivative,
    frozen: list[str],
    verified: VerifiedPolicy,
    base_records: dict[str, TensorRecord],
    strict: bool,
) -> tuple[Counter[str], list[Finding]]:
    derivative = _policy_names(found, base_records)
    expected = verified.policy.model["unet"].tensors
    counts: Counter[str] = Counter()
    violations: list[Finding] = []
    # Same dtype and shape: compare digests (zero-copy, in parallel); the rest value by value.
    direct = [
        renamed(derivative[n], n)
        for n in frozen
        if n in derivative
        and derivative[n].dtype == base_records[n].dtype
        and derivative[n].shape == base_records[n].shape
    ]
    digests = hash_records(direct)
    missing = []
    for name in frozen:
        record = derivative.get(name)
        if record is None:
            missing.append(name)
            continue
        key = record.name if record.name != name else None
        if digests.get(name) == expected[name]:
            counts["identical"] += 1
            continue
        outcome, detail = compare_values(base_records[name], record)
        if outcome == "changed" or (outcome == "cast" and strict):
            if outcome == "cast":
                detail += " (--strict requires the base's exact values)"
            violations.append(Finding(name, outcome, detail, key))
        else:
            counts[outcome] += 1
    unexpected = [r for n, r in derivative.items() if n not in base_records]
    for name in missing:
        violations.append(_missing(name, base_records[name], unexpected))
    counts["violations"] = len(violations)
    return counts, violations


def compare_values(base: TensorRecord, derivative: TensorRecord) -> tuple[str, str]:
    """identical | lossless | cast | changed, and a human description, for one tensor."""
    if base.shape != derivative.shape:
        return "changed", f"shape {list(derivative.shape)}, base {list(base.shape)}"
    before, after = load_record(base), load_record(derivative)
    if before.dtype == after.dtype:
        if _same_bytes(before, after):
            return "identical", ""
        return "changed", _change(before, after)
    if not _same_bytes(before.to(after.dtype), after):
        return "changed", _change(before, after)
    if _same_bytes(after.to(before.dtype), before):
        return "lossless", f"stored as {derivative.dtype}, every value equal to the base's"
    return "cast", f"stored as {derivative.dtype}: the base rounded from {base.dtype}"


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def _change(before: torch.Tensor, after: torch.Tensor) -> str:
    difference = after.double() - before.double()
    reference = before.double().norm().item()
    relative = difference.norm().item() / reference if reference else float("inf")
    changed = (difference != 0).sum().item()
    return (
        f"{changed:,} of {difference.numel():,} values differ; max |change| "
        f"{difference.abs().max().item():.3g}, relative L2 {relative:.3g}"
    )


def _missing(name: str, base: TensorRecord, unexpected: list[TensorRecord]) -> Finding:
    """A frozen tensor that is absent: renamed, if an unknown key holds its exact values."""
    same_shape = [r for r in unexpected if r.shape == base.shape]
    for candidate in same_shape:
        if compare_values(base, candidate)[0] in ("identical", "lossless", "cast"):
            return Finding(name, "renamed", f"absent; its values are under {candidate.name}")
    if same_shape:
        keys = ", ".join(r.name for r in same_shape[:3])
        return Finding(
            name, "missing", f"absent; unknown keys of its shape hold other values: {keys}"
        )
    return Finding(name, "missing", "absent from the derivative")


# ----------------------------------------------------------------------------- LoRA


def _audit_lora(
    found: Derivative,
    frozen: list[str],
    verified: VerifiedPolicy,
    base_records: dict[str, TensorRecord],
    strict: bool,
) -> tuple[Counter[str], list[Finding]]:
    index = ModuleIndex.for_unet(n.removeprefix("unet.") for n in base_records)
    frozen_set = set(frozen)
    counts: Counter[str] = Counter()
    on_frozen: dict[str, list[str]] = {}
    unmapped: list[str] = []
    adapted: set[str] = set()
    full_tensors = []
    for record in found.records:
        if not is_lora_key(record.name):
            full_tensors.append(record)  # e.g. a trained norm saved next to the adapters
            continue
        parsed = parse_lora_key(record.name, index)
        if parsed.component == "text_encoder":
            counts["text encoder keys (not covered)"] += 1
        elif parsed.module is None:
            unmapped.append(record.name)
        else:
            adapted.add(parsed.module)
            target = f"unet.{parsed.module}.{parsed.parameter}"
            if target in frozen_set:
                on_frozen.setdefault(target, []).append(record.name)
    violations = [
        Finding(name, "lora-on-frozen", f"{len(keys)} adapter tensor(s) adapt it", keys[0])
        for name, keys in sorted(on_frozen.items())
    ]
    violations += [
        Finding("?", "unmapped", "cannot tell which UNet module this adapts", key)
        for key in unmapped
    ]
    if full_tensors:  # whole tensors in a LoRA file must respect the freeze like a full model
        extra = Derivative(found.path, "full", "diffusers", tuple(full_tensors), None, None)
        present = sorted(frozen_set & set(_policy_names(extra, base_records)))
        _, full_violations = _audit_full(extra, present, verified, base_records, strict)
        violations += full_violations
        counts["whole frozen tensors carried"] += len(present)
    counts["adapted modules"] = len(adapted)
    counts["violations"] = len(violations)
    return counts, violations


# ----------------------------------------------------------------------------- provenance


def check_provenance(found: Derivative, verified: VerifiedPolicy) -> ProvenanceCheck:
    """Whether the derivative's provenance, if any, names this base, policy and signer."""
    if found.provenance is None:
        return ProvenanceCheck(False, None, None)
    try:
        claims = RunProvenance.from_json(found.provenance)
    except ValueError as error:
        return ProvenanceCheck(True, False, found.provenance_where, (str(error),))
    policy = verified.policy
    problems = []
    roots = {component: fp.root for component, fp in policy.model.items()}
    if claims.base_fingerprint != roots:
        problems.append("provenance names another base model (fingerprint roots differ)")
    if claims.policy_sha256 != hashlib.sha256(policy.to_json()).hexdigest():
        problems.append("provenance names another policy")
    if claims.signer_keyid != verified.signer_keyid:
        problems.append("provenance names another policy signer")
    digests = policy.model["unet"].tensors
    if set(claims.frozen_tensor_digests) != set(policy.frozen_tensors):
        problems.append("provenance lists other frozen tensors than the policy")
    elif any(v[-1] != digests[n] for n, v in claims.frozen_tensor_digests.items()):
        problems.append("provenance lists frozen-tensor digests that are not the base's")
    if claims.mode != found.kind:
        problems.append(f"provenance says a {claims.mode} fine-tune, the file is {found.kind}")
    return ProvenanceCheck(True, not problems, found.provenance_where, tuple(problems))
