"""The publisher's recipe (`guardtune publish`): learn which tensors to freeze, sign the policy.

load model -> (freezeasguard+uce: edit the model with UCE on the illegal prompts, write the
edited copy, continue on it) -> encode illegal and legal data once -> learn the mask
(FreezeAsGuard or random-p) -> bind the frozen list to the model's fingerprint -> sign with the
publisher's key(s) -> write the policy (beside model_index.json by default), a JSON log and a
learning-curve PNG.

The combined defence edits first and learns second, so that the tensors frozen are the ones a
user would need to undo the edit, and its policy binds the edited weights: the publisher ships
the edited folder (`edited_out`) with the policy beside it.

Learning checkpoints into a work folder (`runs/publish/<model>` by default) and continues there
with `resume`. Under `accelerate launch` every process learns with its own batches and the
learner averages gradients across them; only the main process writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guardtune import atomic
from guardtune.data import FolderScan, ImageCaptionDataset, scan_folder
from guardtune.distributed import is_main_process
from guardtune.errors import DataError
from guardtune.evaluate.defenses import COMBINED  # the method evaluate compares it as
from guardtune.learn.binarize import SHARE_BY, fill_to_share, random_scores, share_weights
from guardtune.learn.freezeasguard import GRANULARITIES, LearnerConfig, RoundLog, learn_mask
from guardtune.models import encoders, load_pipeline
from guardtune.resolve import ModelSource, resolve_model
from guardtune.rowranges import Ranges
from guardtune.training.encode import EncodedData, data_digest
from guardtune.training.progress import track
from guardtune.training.rundir import RUN_CONFIG, lock_folder, unlock_folder
from guardtune.trust.build import sign_policy
from guardtune.trust.fingerprint import fingerprint_model
from guardtune.trust.policy import Provenance
from guardtune.trust.signing import PrivateKey
from guardtune.trust.verify import policy_output_path

METHODS = ("freezeasguard", "random", COMBINED)


@dataclass(frozen=True)
class PublishResult:
    policy: Path
    method: str
    frozen_tensors: int
    frozen_share_parameters: float
    frozen_share_tensors: float
    signers: tuple[str, ...]
    log: Path
    curve: Path | None
    seconds: float
    tensors_in_part: int = 0  # tensors of which a channel mask freezes some rows


def _merge(scans: list[FolderScan]) -> FolderScan:
    examples = tuple(e for scan in scans for e in scan.examples)
    return FolderScan(scans[0].root, "+".join(sorted({s.layout for s in scans})), examples)


def _plot_curve(history: list[RoundLog], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h.round for h in history]
    figure, (losses, share) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses.plot(rounds, [h.illegal_loss for h in history], label="illegal loss", color="tab:red")
    losses.plot(rounds, [h.legal_loss for h in history], label="legal loss", color="tab:green")
    losses.set_xlabel("mask update")
    losses.legend()
    share.plot(rounds, [h.mask_share for h in history], color="tab:blue")
    share.set_xlabel("mask update")
    share.set_ylabel("share(m), continuous mask")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic.write_bytes(out, buffer.getvalue())


def _edit_first(
    pipeline, base: ModelSource, illegal: FolderScan, legal: FolderScan, out: Path, accelerator
) -> tuple[ModelSource, dict[str, Any]]:
    """UCE on the illegal captions (the legal ones preserved), written as a model folder.

    Returns the edited model and what the policy's provenance records of the edit: the base it
    was made from (its fingerprint roots), the prompts and the edit's strength.
    """
    from guardtune.edited import write_edited
    from guardtune.evaluate.uce import UCE_LAMBDA, uce_edit

    erase = sorted({e.caption for e in illegal.examples})
    preserve = tuple(sorted({e.caption for e in legal.examples} - set(erase)))
    weights = uce_edit(pipeline, erase, "", preserve, UCE_LAMBDA)
    edited = base
    if is_main_process():
        edited = write_edited(base, weights, out)
    accelerator.wait_for_everyone()  # the other ranks load what the main process wrote
    if not is_main_process():
        edited = resolve_model(str(out))
    roots = {name: fp.root for name, fp in fingerprint_model(base).items()}
    record = {"base": base.label, "base_fingerprint": roots, "erase": erase,
              "preserve": list(preserve), "guide": "", "lambda": UCE_LAMBDA,
              "edited": sorted(weights)}  # fmt: skip
    return edited, record


def publish(
    illegal: list[Path],
    legal: list[Path],
    keys: list[PrivateKey],
    model: str | ModelSource = "digits",
    model_config: Path | None = None,
    method: str = "freezeasguard",
    config: LearnerConfig | None = None,
    out: Path | None = None,
    caption_column: str = "text",
    show_progress: bool = True,
    workdir: Path | None = None,
    resume: bool = False,
    settings: str | None = None,
    edited_out: Path | None = None,
) -> PublishResult | None:
    """Learn (or draw) the mask and write the signed policy; None on non-main processes.

    `settings` is the run's effective configuration as TOML text (the CLI's options, file and
    command line merged); it is written into the work folder as the run starts.
    """
    start = time.perf_counter()
    config = config or LearnerConfig()
    if method not in METHODS:
        raise DataError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if config.share_by not in SHARE_BY or not 0 < config.ratio < 1:
        raise DataError("--ratio must be in (0, 1) and --share-by parameters or tensors")
    if config.granularity not in GRANULARITIES:
        raise DataError(f"--granularity must be one of {', '.join(GRANULARITIES)}")
    if method == "random" and config.granularity != "tensor":
        raise DataError("random-p draws whole tensors; --granularity channel needs freezeasguard")
    if not illegal or not legal:
        raise DataError("publish needs at least one --illegal and one --legal data folder")
    source = resolve_model(model, model_config)
    if method == COMBINED and edited_out is None:
        raise DataError(f"{COMBINED} writes an edited model", hint="pass --edited-model-out")
    if method != COMBINED and edited_out is not None:
        raise DataError(f"--edited-model-out is for --method {COMBINED}")
    if edited_out is not None:
        from guardtune.edited import check_free

        check_free(edited_out)  # before the edit and the learner run, not after them
    if method != COMBINED:
        target = policy_output_path(source, out)
    illegal_scan = _merge([scan_folder(p, caption_column) for p in illegal])
    legal_scan = _merge([scan_folder(p, caption_column) for p in legal])
    if config.relearn_steps < 1 or config.rounds < 1 or config.user_steps < 1:
        raise DataError(
            "--relearn-steps, --mask-updates and --user-steps-per-update must be at least 1"
        )
    from accelerate import Accelerator

    # One process, or one rank of `accelerate launch` (gloo on CPU, as finetune does).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    pipeline = load_pipeline(source, device=accelerator.device, dtype=torch.float32)
    edit: dict[str, Any] = {}
    if method == COMBINED:
        assert edited_out is not None
        base = source
        source, edit = _edit_first(
            pipeline, base, illegal_scan, legal_scan, edited_out, accelerator
        )
        target = policy_output_path(source, out)
        # Learn on the edited weights exactly as stored (the edit is rounded to their dtype).
        pipeline = load_pipeline(source, device=accelerator.device, dtype=torch.float32)
    unet = pipeline.unet
    names = [n for n, _ in unet.named_parameters()]
    numel = {n: p.numel() for n, p in unet.named_parameters()}
    history: list[RoundLog] = []
    rows: dict[str, Ranges] = {}
    workdir = workdir or Path("runs") / "publish" / (source.path.stem or "model")
    run_config = workdir / RUN_CONFIG

    def keep_settings() -> None:
        if settings is not None and is_main_process():
            atomic.write_text(run_config, settings)

    if method == "random":
        keep_settings()  # nothing to learn, nothing to resume: the run is these settings
        draw = random_scores(names, config.seed)
        order = sorted(names, key=lambda n: -draw[n])
        frozen = sorted(fill_to_share(order, share_weights(numel, config.share_by), config.ratio))
    else:
        from diffusers import DDPMScheduler

        resolution = unet.config.sample_size * pipeline.vae_scale_factor
        illegal_data = EncodedData(
            pipeline, ImageCaptionDataset(illegal_scan, resolution), unet.device
        )
        legal_data = EncodedData(pipeline, ImageCaptionDataset(legal_scan, resolution), unet.device)
        for module in encoders(pipeline):
            module.requires_grad_(False)
        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        unet.train()
        # What a checkpoint must match besides the config: these weights and this data.
        model_root = fingerprint_model(source, ("unet",))["unet"].root
        data_key = "/".join((model_root, data_digest(illegal_scan), data_digest(legal_scan)))
        if is_main_process():  # two runs in one work folder would write the same checkpoints
            lock_folder(workdir, "work folder", "--work-dir")
        if not resume and (workdir / "state.json").exists():
            unlock_folder(workdir)
            raise DataError(
                f"{workdir} holds an earlier run",
                hint="pass --resume to continue it, or --work-dir for a fresh one",
            )
        if not resume:  # a fresh run: its folder says what it is from the start
            keep_settings()
        total = config.relearn_steps + config.rounds
        enabled = show_progress and is_main_process()
        with track("learn mask", total, accelerator.device, enabled=enabled) as report:
            learned = learn_mask(unet, scheduler, illegal_data, legal_data, config, report,
                                 workdir, resume, data_key)  # fmt: skip
        frozen, rows, history = learned.frozen, learned.rows, learned.history
        if resume:  # only now: a resume that its checkpoint refused must not replace the file
            keep_settings()
    if not is_main_process():
        return None  # the main process signs and writes
    hyperparameters = {k: v for k, v in dataclasses.asdict(config).items()}
    if edit:
        hyperparameters["uce"] = edit
    datasets = {"illegal": data_digest(illegal_scan), "legal": data_digest(legal_scan)}
    provenance = Provenance(method, hyperparameters, datasets)
    signed = sign_policy(source, [f"unet.{n}" for n in frozen], provenance, keys, target,
                         frozen_rows={f"unet.{n}": r for n, r in rows.items()})  # fmt: skip
    log = target.with_name(target.stem + ".log.json")
    atomic.write_json(log, {"policy_sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                            "method": method, "config": hyperparameters, "frozen": frozen,
                            "frozen_rows": {n: [list(p) for p in r] for n, r in rows.items()},
                            "history": [dataclasses.asdict(h) for h in history]})  # fmt: skip
    if workdir is not None:
        (workdir / "relearned.safetensors").unlink(missing_ok=True)  # two model copies of disk
        unlock_folder(workdir)
    curve = None
    if history:
        curve = target.with_name(target.stem + ".curve.png")
        _plot_curve(history, curve)
    return PublishResult(
        policy=signed.policy, method=method, frozen_tensors=signed.frozen_tensors,
        frozen_share_parameters=signed.frozen_share_parameters,
        frozen_share_tensors=signed.frozen_share_tensors, signers=signed.signers, log=log,
        curve=curve, seconds=time.perf_counter() - start, tensors_in_part=signed.tensors_in_part,
    )  # fmt: skip
