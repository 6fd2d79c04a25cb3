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
  they moved. A tensor frozen in part (a schema 3 policy's rows) is judged by its frozen rows
  alone, by their sha256-rows-v1 digest and, where that differs, value by value. What a loader
  might read instead is a violation too: a key in the UNet's namespace that is no base tensor
  (a norm delta a LoRA loader applies, EMA weights), the UNet stored again under a second
  naming, a pickle beside the pipeline.
- LoRA files (diffusers/peft or kohya naming): every adapter key is mapped to the UNet module it
  adapts; adapting a frozen weight is a violation, and so is a key that cannot be mapped (the
  audit cannot prove it misses the frozen tensors, so it fails closed). On a tensor frozen in
  part, an adapter may only have an update that is zero on the frozen rows: its up tensor
  (lora_B / lora_up, whose rows are the output channels) and any full difference must be zero
  there, and none of its tensors may hold inf or NaN (0 x inf is NaN); an adapter bias on a
  module the base gives no bias reaches its weight's rows; an adapter that reaches every row at
  once (DoRA, LoHa, LoKr) is a violation. Whole tensors in the file, in any naming, are audited
  as full weights, and a key that is neither an adapter, a base tensor nor a text encoder's is
  unmapped.
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
    PROVENANCE_FILE,
    PROVENANCE_METADATA_KEY,
    RunProvenance,
    read_small_file,
)
from guardtune.enforce.freeze import frozen_unet_names
from guardtune.enforce.keynames import (
    TEXT_ENCODER_PREFIXES,
    ModuleIndex,
    diffusers_to_ldm_unet,
    is_lora_key,
    parse_lora_key,
)
from guardtune.errors import DataError, UsageError
from guardtune.resolve import PICKLE_SUFFIXES, ModelSource, resolve_model, weight_sets
from guardtune.tensorfile import (
    SAFETENSORS_TO_TORCH,
    TensorRecord,
    load_record,
    read_header_and_metadata,
    renamed,
)
from guardtune.trust.fingerprint import hash_records, model_tensors, record_rows_digest
from guardtune.trust.policy import FrozenRows
from guardtune.trust.verify import VerifiedPolicy, verify_policy

# The original SD UNet's own top-level modules, under `model.diffusion_model.`.
_LDM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "out", "label_emb")
# Prefixes of components the policy does not cover (text encoders, VAE), in every naming.
_OTHER_COMPONENTS = (*TEXT_ENCODER_PREFIXES, "vae.", "first_stage_model.", "cond_stage_model.",
                     "conditioner.", "text_encoders.")  # fmt: skip


@dataclass(frozen=True)
class Finding:
    """One frozen tensor (or adapted module) that breaks the policy, and how."""

    tensor: str  # the policy's name (`unet....weight`)
    # changed | missing | renamed | cast | lora-on-frozen | unmapped | unaccountable |
    # forged provenance
    problem: str
    detail: str
    key: str | None = None  # the derivative's own key, where it differs from `tensor`


@dataclass(frozen=True)
class ProvenanceCheck:
    """What a derivative's provenance claims, against the base and policy audited with.

    `status`: absent; consistent; other base, other policy or shipped policy ignored (made
    from something else, or knowingly without the base's own policy: no lie, and the tensors
    decide compliance); forged (it names this base and
    policy but lies about the signer, the frozen tensors or their digests, or is not a
    readable record). Only a forged provenance is a violation.
    """

    present: bool
    consistent: bool | None  # None when absent
    where: str | None
    problems: tuple[str, ...] = ()  # what a forged record lies about
    status: str = "absent"


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
    base: str | ModelSource | None = None,
    policy_path: Path | None = None,
    trusted_files: Iterable[Path] = (),
    use_trust_dirs: bool = True,
    model_config: Path | None = None,
    strict: bool = False,
) -> AuditReport:
    """Check a derivative against the base's verified policy; never raises for violations.

    Without `base`, the base is the one the derivative's provenance names, if it is here
    (the embedded model, a local folder, a hub snapshot in the local cache); otherwise a
    UsageError (exit 2) asks for it. The provenance only says where to look: the policy
    found there is verified as always, and the tensors decide compliance.
    """
    start = time.perf_counter()
    artefacts, violations = locate(derivative)
    if base is None:
        base = _base_from_provenance(artefacts)
    source = resolve_model(base, model_config)
    verified = verify_policy(source, policy_path, trusted_files, use_trust_dirs, model_config)
    frozen = sorted(f"unet.{n}" for n in frozen_unet_names(verified.policy))
    base_records = {r.name: r for r in model_tensors(source, ("unet",))["unet"]}
    counts: Counter[str] = Counter()
    checks = []
    for found in artefacts:
        audit_one = _audit_full if found.kind == "full" else _audit_lora
        found_counts, found_violations = audit_one(found, frozen, verified, base_records, strict)
        if len(artefacts) > 1:  # say which file each finding is in
            found_violations = [_in(found, v) for v in found_violations]
        counts.update(found_counts)
        violations += found_violations
        check = check_provenance(found, verified)
        checks.append(check)
        violations += [
            Finding("provenance", "forged provenance", problem, check.where)
            for problem in check.problems
        ]
    counts["violations"] = len(violations)
    if verified.policy.frozen_rows:
        counts["tensors frozen in part"] = len(verified.policy.frozen_rows)
    provenance = _combined(checks)
    kinds = "+".join(sorted({f.kind for f in artefacts})) or "none"
    naming = "+".join(sorted({f.naming for f in artefacts})) or "none"
    return AuditReport(
        derivative=derivative, kind=kinds, naming=naming, base=source.label,
        policy=verified.policy_path, signer_keyid=verified.signer_keyid, strict=strict,
        frozen_tensors=len(frozen), counts=dict(counts), provenance=provenance,
        violations=tuple(violations), seconds=time.perf_counter() - start,
    )  # fmt: skip


# ----------------------------------------------------------------------------- finding the files


def locate(path: Path) -> tuple[list[Derivative], list[Finding]]:
    """Every artefact at `path` that a loader could read, and what cannot be accounted for.

    A single file is one artefact. A folder (a `finetune` run, a diffusers pipeline, or a UNet
    folder) contributes every weight set of its UNet (the plain weights and each variant, each
    resolved as `guardtune.resolve` does, shards and indexes included) and every safetensors
    file beside them (LoRA files, single-file checkpoints). A weight layout the resolver refuses
    is a violation here: the audit cannot prove what a loader would read from it.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"derivative {path} not found")
    if path.is_file():
        return [_single_file(path)], []
    run_provenance = path / PROVENANCE_FILE
    artefacts: list[Derivative] = []
    findings: list[Finding] = []
    model = path / "model" if (path / "model" / "model_index.json").is_file() else path
    unet = model / "unet" if (model / "model_index.json").is_file() else model
    text, where = _provenance_file(model / PROVENANCE_FILE)
    if text is None:
        text, where = _provenance_file(run_provenance)
    try:
        sets = weight_sets(unet)
    except DataError as error:
        findings.append(Finding("?", "unaccountable", error.one_line(), str(unet)))
        sets = {}
    for variant, records in sets.items():
        label = unet / (f"weights ({variant})" if variant else "weights")
        artefacts.append(Derivative(label, "full", "diffusers", records, text, where))
    for folder in dict.fromkeys((path, model)):
        if folder == unet:
            continue  # the UNet folder's files are its weight sets, above
        for file in sorted(folder.iterdir()):
            if file.name.endswith(PICKLE_SUFFIXES):  # load_lora_weights falls back to a .bin
                findings.append(Finding("?", "unaccountable", "a pickle, which a loader may read "
                                        "(audit reads only .safetensors)", str(file)))  # fmt: skip
            elif file.suffix == ".safetensors":
                fallback = run_provenance if file.parent == path else None
                artefacts.append(_single_file(file, fallback_provenance=fallback))
    if not artefacts and not findings:
        raise DataError(
            f"{path} holds no UNet weights",
            hint="give a diffusers folder, its unet/ folder, a .safetensors file or a LoRA file",
        )
    return artefacts, findings


def _base_from_provenance(artefacts: list[Derivative]) -> ModelSource:
    """The base a derivative's provenance names, when it resolves here."""
    for found in artefacts:
        if found.provenance is None:
            continue
        try:
            named = RunProvenance.from_json(found.provenance).base_model
        except ValueError:
            continue
        hub_id, _, commit = named.partition("@")
        try:
            if commit:
                return resolve_model(hub_id, revision=commit)
            return resolve_model(named)
        except DataError:
            break
    raise UsageError(
        "the derivative's provenance names no base model that is here",
        hint="pass --base with the published model it was fine-tuned from",
    )


def _in(found: Derivative, finding: Finding) -> Finding:
    """The finding, saying which of several artefacts it is in."""
    where = f"{found.path}: {finding.key or finding.tensor}"
    return Finding(finding.tensor, finding.problem, finding.detail, where)


def _combined(checks: list[ProvenanceCheck]) -> ProvenanceCheck:
    present = [c for c in checks if c.present]
    if not present:
        return ProvenanceCheck(False, None, None)
    wheres = ", ".join(dict.fromkeys(c.where for c in present if c.where))
    problems = tuple(p for c in present for p in c.problems)
    # The worst of the artefacts' statuses speaks for the derivative.
    order = ("forged", "shipped policy ignored", "other base", "other policy", "consistent")
    status = min((c.status for c in present), key=order.index)
    return ProvenanceCheck(True, status == "consistent", wheres or None, problems, status)


def _single_file(path: Path, fallback_provenance: Path | None = None) -> Derivative:
    if not path.resolve().is_file():
        raise DataError(f"{path} is not a regular file")
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
    naming = "original-sd" if any(n.startswith(LDM_UNET_PREFIX) for n in names) else "diffusers"
    return Derivative(path, "full", naming, tuple(records), text, where)


def _provenance_file(path: Path) -> tuple[str | None, str | None]:
    try:
        return read_small_file(path, "provenance").decode("utf-8"), str(path)
    except FileNotFoundError:
        return None, None
    except UnicodeDecodeError as error:
        raise DataError(f"provenance {path} is not UTF-8 text") from error


# ----------------------------------------------------------------------------- full weights


@dataclass(frozen=True)
class UnetTensors:
    """A file's tensors sorted by what the policy can say of them."""

    tensors: dict[str, TensorRecord]  # policy name (`unet....`) -> the derivative's record
    again: tuple[tuple[str, TensorRecord], ...]  # a base tensor stored a second time
    unknown: tuple[TensorRecord, ...]  # in the UNet's namespace, but no tensor of the base
    namings: tuple[str, ...]  # how the UNet's tensors are spelled (more than one: ambiguous)
    other: int  # tensors of components the policy does not cover (text encoders, VAE)
    foreign: tuple[TensorRecord, ...]  # in no namespace known here (e.g. schedule buffers)


def unet_tensors(
    records: Iterable[TensorRecord], base_records: dict[str, TensorRecord]
) -> UnetTensors:
    """Every UNet tensor under the policy's name, whatever the naming: diffusers (`unet.`),
    original SD (`model.diffusion_model.`, or its bare UNet state dict as ComfyUI loads it) or a
    bare diffusers state dict. A key in the UNet's namespace that names no base tensor is
    `unknown`: a loader may still apply it."""
    bare = {n.removeprefix("unet."): n for n in base_records}
    roots = {n.split(".")[0] for n in bare}
    to_diffusers = {ldm: f"unet.{name}" for name, ldm in diffusers_to_ldm_unet(bare).items()}
    tensors: dict[str, TensorRecord] = {}
    again: list[tuple[str, TensorRecord]] = []
    unknown: list[TensorRecord] = []
    foreign: list[TensorRecord] = []
    namings: set[str] = set()
    other = 0
    for record in records:
        name = record.name
        root = name.split(".")[0]
        if name.startswith(LDM_UNET_PREFIX):
            naming, policy_name = "original-sd", to_diffusers.get(name[len(LDM_UNET_PREFIX) :])
        elif root in _LDM_ROOTS:
            naming, policy_name = "original-sd without prefix", to_diffusers.get(name)
        elif name.startswith("unet."):
            naming, policy_name = "diffusers", name if name in base_records else None
        elif root in roots:
            naming, policy_name = "diffusers without prefix", bare.get(name)
        elif name.startswith(_OTHER_COMPONENTS):
            other += 1
            continue
        elif name.startswith(("model_ema.", "lora")) or "unet" in name or "diffusion" in name:
            # EMA weights a loader may use instead, adapter-like keys of other spellings
            unknown.append(record)
            continue
        else:
            foreign.append(record)
            continue
        if policy_name is None:
            unknown.append(record)
            continue
        namings.add(naming)
        if policy_name in tensors:
            again.append((policy_name, record))
        else:
            tensors[policy_name] = record
    return UnetTensors(tensors, tuple(again), tuple(unknown), tuple(sorted(namings)), other,
                       tuple(foreign))  # fmt: skip


def _audit_full(
    found: Derivative,
    frozen: list[str],
    verified: VerifiedPolicy,
    base_records: dict[str, TensorRecord],
    strict: bool,
) -> tuple[Counter[str], list[Finding]]:
    unet = unet_tensors(found.records, base_records)
    return _audit_unet(unet, frozen, verified, base_records, strict, carried=False)


def _audit_unet(
    unet: UnetTensors,
    frozen: list[str],
    verified: VerifiedPolicy,
    base_records: dict[str, TensorRecord],
    strict: bool,
    carried: bool,
) -> tuple[Counter[str], list[Finding]]:
    """The frozen tensors and rows of a file's UNet tensors against the base. `carried`: they
    are whole tensors beside a LoRA's adapters, which need not be all there, and whose keys that
    name no base tensor the LoRA audit reports itself."""
    derivative = unet.tensors
    expected = verified.policy.model["unet"].tensors
    counts: Counter[str] = Counter()
    violations: list[Finding] = []
    if len(unet.namings) > 1:  # loaders differ in which spelling they read: both must pass
        violations.append(Finding("?", "unaccountable", "the UNet's tensors are stored under "
                                  f"more than one naming ({', '.join(unet.namings)})"))  # fmt: skip
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
    unexpected = list(unet.unknown)
    for name in missing:
        violations.append(_missing(name, base_records[name], unexpected))
    for name, rows in sorted(verified.policy.frozen_rows.items()):
        record = derivative.get(name)
        if record is None:
            if not carried:  # whole tensors beside a LoRA's adapters need not be all there
                violations.append(_missing(name, base_records[name], unexpected))
            continue
        key = record.name if record.name != name else None
        outcome, detail = _compare_rows(name, base_records[name], record, rows)
        if outcome == "changed" or (outcome == "cast" and strict):
            if outcome == "cast":
                detail += " (--strict requires the base's exact values)"
            violations.append(Finding(name, outcome, f"frozen rows: {detail}", key))
        else:
            counts[f"{outcome} (frozen rows)"] += 1
    for name, record in unet.again:  # a second copy: a loader may read it instead
        if name in frozen:
            outcome, detail = compare_values(base_records[name], record)
        elif name in verified.policy.frozen_rows:
            rows = verified.policy.frozen_rows[name]
            outcome, detail = _compare_rows(name, base_records[name], record, rows)
        else:
            continue
        if outcome == "changed" or (outcome == "cast" and strict):
            violations.append(Finding(name, outcome, f"second copy: {detail}", record.name))
    if carried:
        return counts, violations
    explained = {v.key for v in violations if v.problem == "renamed"}
    detail = "names no tensor of the base UNet, yet a loader may apply it (an adapter, EMA)"
    violations += [
        Finding("?", "unaccountable", detail, r.name)
        for r in unet.unknown
        if r.name not in explained
    ]
    return counts, violations


def _compare_rows(
    name: str, base: TensorRecord, derivative: TensorRecord, rows: FrozenRows
) -> tuple[str, str]:
    """identical | lossless | cast | changed for the frozen rows of one tensor."""
    if derivative.shape != base.shape:
        return "changed", f"shape {list(derivative.shape)}, base {list(base.shape)}"
    if (
        derivative.dtype == base.dtype
        and record_rows_digest(derivative, rows.ranges, name) == rows.digest
    ):
        return "identical", ""
    not_float = _not_float(base, derivative)
    if not_float:
        return "changed", not_float
    before, after = load_record(base), load_record(derivative)
    if not before.dim():
        before, after = before.reshape(1), after.reshape(1)
    spans = [slice(start, stop) for start, stop in rows.ranges]
    return compare_tensors(
        torch.cat([before[s] for s in spans]), torch.cat([after[s] for s in spans]),
        base.dtype, derivative.dtype,
    )  # fmt: skip


def compare_values(base: TensorRecord, derivative: TensorRecord) -> tuple[str, str]:
    """identical | lossless | cast | changed, and a human description, for one tensor."""
    if base.shape != derivative.shape:
        return "changed", f"shape {list(derivative.shape)}, base {list(base.shape)}"
    not_float = _not_float(base, derivative)
    if not_float:
        return "changed", not_float
    return compare_tensors(load_record(base), load_record(derivative), base.dtype, derivative.dtype)


def _not_float(base: TensorRecord, derivative: TensorRecord) -> str | None:
    """Why a derivative's tensor cannot hold a floating-point base's values, or None.

    Asked before anything is loaded: an unknown dtype is not read at all. Cast back, integers
    and booleans equal the base only where it held whole numbers: a loader would read them as
    values, not as a rounding of the base.
    """
    stored = SAFETENSORS_TO_TORCH.get(derivative.dtype)
    if SAFETENSORS_TO_TORCH[base.dtype].is_floating_point and not (
        stored is not None and stored.is_floating_point
    ):
        return f"stored as {derivative.dtype}, not a floating-point type"
    return None


def compare_tensors(
    before: torch.Tensor, after: torch.Tensor, base_dtype: str, derivative_dtype: str
) -> tuple[str, str]:
    """`compare_values` on loaded values (the base's, the derivative's) of equal shape and of
    types `_not_float` accepts."""
    if before.dtype == after.dtype:
        if _same_bytes(before, after):
            return "identical", ""
        return "changed", _change(before, after)
    if not _same_bytes(before.to(after.dtype), after):
        return "changed", _change(before, after)
    if _same_bytes(after.to(before.dtype), before):
        return "lossless", f"stored as {derivative_dtype}, every value equal to the base's"
    return "cast", f"stored as {derivative_dtype}: the base rounded from {base_dtype}"


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
            detail = f"absent; its values are under {candidate.name}"
            return Finding(name, "renamed", detail, candidate.name)
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
    frozen_rows = verified.policy.frozen_rows
    counts: Counter[str] = Counter()
    on_frozen: dict[str, list[str]] = {}
    on_rows: list[Finding] = []
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
            if target not in base_records and parsed.parameter == "bias":
                # An adapter bias (peft's lora_bias) on a module the base gives no bias is
                # added to the module's output rows: the rows of its weight.
                target = f"unet.{parsed.module}.weight"
            if target in frozen_set:
                on_frozen.setdefault(target, []).append(record.name)
            elif target in frozen_rows:
                finding = _lora_rows(target, record, parsed.role, frozen_rows[target])
                if finding is not None:
                    on_rows.append(finding)
                else:
                    counts["adapter tensors clear of frozen rows"] += 1
    violations = [
        Finding(name, "lora-on-frozen", f"{len(keys)} adapter tensor(s) adapt it", keys[0])
        for name, keys in sorted(on_frozen.items())
    ]
    violations += on_rows
    violations += [
        Finding("?", "unmapped", "cannot tell which UNet module this adapts", key)
        for key in unmapped
    ]
    if full_tensors:  # whole tensors in a LoRA file must respect the freeze like a full model
        unet = unet_tensors(full_tensors, base_records)
        present = sorted(frozen_set & set(unet.tensors))
        violations += _audit_unet(unet, present, verified, base_records, strict, carried=True)[1]
        # A key no adapter format names and no base tensor is: what would a loader do with it?
        violations += [
            Finding("?", "unmapped", "neither an adapter nor a tensor of the base", r.name)
            for r in (*unet.unknown, *unet.foreign)
        ]
        counts["whole frozen tensors carried"] += len(present)
        if unet.other:
            counts["text encoder keys (not covered)"] += unet.other
    counts["adapted modules"] = len(adapted)
    return counts, violations


def _lora_rows(target: str, record: TensorRecord, role: str, rows: FrozenRows) -> Finding | None:
    """A finding if an adapter tensor can change the frozen rows of `target`, else None.

    The update of a LoRA pair is up @ down, so its row r is zero when row r of the up tensor
    is: the up tensor (and a full difference) must be exactly zero on every frozen row, and no
    tensor of the adapter may hold inf or NaN (0 x inf is NaN, on a frozen row as on any).
    """
    if role == "other":
        return Finding(target, "lora-on-frozen-rows", "this adapter type changes every output "
                       "row at once, so it cannot leave the frozen rows", record.name)  # fmt: skip
    if SAFETENSORS_TO_TORCH.get(record.dtype) is None or (role != "scalar" and not record.shape):
        return Finding(target, "lora-on-frozen-rows", f"unreadable {record.dtype} tensor "
                       f"{list(record.shape)}", record.name)  # fmt: skip
    values = load_record(record)
    if not torch.isfinite(values).all():  # merged, 0 x inf is NaN: on the frozen rows too
        return Finding(target, "lora-on-frozen-rows", "holds inf or NaN values, which reach "
                       "every output row", record.name)  # fmt: skip
    if role in ("down", "scalar"):
        return None  # reaches the rows only through the up tensor, which is checked itself
    if record.shape[0] != rows.height:
        return Finding(target, "lora-on-frozen-rows", f"{record.shape[0]} output rows where the "
                       f"tensor has {rows.height}", record.name)  # fmt: skip
    touched = sum(
        int((values[start:stop].reshape(stop - start, -1) != 0).any(dim=1).sum())
        for start, stop in rows.ranges
    )
    if touched:
        return Finding(target, "lora-on-frozen-rows", f"non-zero on {touched} of its "
                       f"{rows.count} frozen rows", record.name)  # fmt: skip
    return None


# ----------------------------------------------------------------------------- provenance


def check_provenance(found: Derivative, verified: VerifiedPolicy) -> ProvenanceCheck:
    """What the derivative's provenance, if any, says of this base, policy and signer."""
    if found.provenance is None:
        return ProvenanceCheck(False, None, None)
    where = found.provenance_where
    try:
        claims = RunProvenance.from_json(found.provenance)
    except ValueError as error:
        return ProvenanceCheck(True, False, where, (str(error),), "forged")
    policy = verified.policy
    roots = {component: fp.root for component, fp in policy.model.items()}
    ignored = claims.ignored_policy_sha256
    if (
        ignored is not None
        and ignored == hashlib.sha256(verified.policy_path.read_bytes()).hexdigest()
    ):
        return ProvenanceCheck(True, False, where, (), "shipped policy ignored")
    if claims.base_fingerprint != roots:
        return ProvenanceCheck(True, False, where, (), "other base")
    if claims.policy_sha256 != hashlib.sha256(policy.to_json()).hexdigest():
        return ProvenanceCheck(True, False, where, (), "other policy")
    problems = []
    if claims.signer_keyid != verified.signer_keyid:
        problems.append("provenance names another policy signer")
    digests = policy.model["unet"].tensors
    if set(claims.frozen_tensor_digests) != set(policy.frozen_tensors):
        problems.append("provenance lists other frozen tensors than the policy")
    elif any(v[-1] != digests[n] for n, v in claims.frozen_tensor_digests.items()):
        problems.append("provenance lists frozen-tensor digests that are not the base's")
    if claims.mode != found.kind:
        problems.append(f"provenance says a {claims.mode} fine-tune, the file is {found.kind}")
    status = "forged" if problems else "consistent"
    return ProvenanceCheck(True, not problems, where, tuple(problems), status)
