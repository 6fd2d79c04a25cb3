"""The on-disk contract: every file name, metadata key and record that two modules share.

What `finetune` writes, `audit` reads; what `publish` and `policy sign` write, `verify` reads.
Each such name is spelled here once, with the record type both sides use (`RunProvenance`), so a
writer and its reader cannot drift apart. Also here: which files of a model folder hold weights
and that a file named by a user stays in its folder, the components whose tensors a policy
fingerprints, the key prefix of original (LDM) Stable Diffusion checkpoints, and the default
device. Imported by the trust chain, the enforcement and the recipes; it imports nothing of
guardtune's but the errors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from guardtune.errors import DataError, GuardtuneError

PACKAGE_DIR = Path(__file__).parent
ASSETS_DIR = PACKAGE_DIR / "assets"

# A model folder carries its signed policy beside model_index.json.
POLICY_FILE = "guardtune-policy.json"
# A fine-tune's record of what it was made from: in the run folder and inside its model folder.
PROVENANCE_FILE = "guardtune-provenance.json"
# ... and, for a LoRA file, in its safetensors metadata under this key.
PROVENANCE_METADATA_KEY = "guardtune_provenance"
# diffusers' name for a LoRA file (`load_lora_weights` looks for it in a folder).
LORA_FILE = "pytorch_lora_weights.safetensors"

# The components whose tensors a policy fingerprints; a guardtune single file prefixes each
# tensor with one of them (`unet.conv_in.weight`).
COMPONENTS = ("unet", "text_encoder", "vae")
# Original Stable Diffusion (LDM) checkpoints name the UNet's tensors under this prefix.
LDM_UNET_PREFIX = "model.diffusion_model."
# diffusers writes `*.fp16.safetensors` (or bf16) for `variant="fp16"`; they are not the
# default weights of a folder that also holds plain ones.
VARIANT_INFIXES = (".fp16.", ".bf16.")


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """A component folder's safetensors files: (plain, variant), each sorted by name."""
    files = sorted(Path(folder).glob("*.safetensors"))
    variants = [f for f in files if any(infix in f.name for infix in VARIANT_INFIXES)]
    return [f for f in files if f not in variants], variants


def regular_file_inside(path: Path, real_root: Path, outside: str) -> Path:
    """The resolved `path`, if it is a regular file that stays inside `real_root` (a resolved
    folder) once links are followed; DataError otherwise, `outside` saying what leaving it means.

    Paths from users' files never leave the folder they came from, and special files (FIFOs,
    devices) are refused before anything opens them: reading one can block forever.
    """
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise DataError(f"{path} {outside}")
    if not real.is_file():
        raise DataError(f"{path} is not a regular file")
    return real


# The most a small file a user names (a policy, a mask, a key, a provenance record) may hold:
# far above any real one, far below what would exhaust memory when read whole.
SMALL_FILE_LIMIT = 64 << 20


def read_small_file(
    path: Path, what: str, error: type[GuardtuneError] = DataError, limit: int = SMALL_FILE_LIMIT
) -> bytes:
    """The bytes of a small file a user names; `error` if it is not a regular file (a FIFO
    would block the read forever), is larger than `limit`, or cannot be read. A missing file
    raises FileNotFoundError, for the caller to say what its absence means."""
    if path.exists() and not path.is_file():
        raise error(f"{what} {path} is not a regular file")
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise
    except OSError as failure:
        raise error(f"cannot read {what} {path} ({failure.strerror})") from failure
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit >> 20} MiB")
    return data


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 autocast is 8-24x slower there), bf16 or fp16 on GPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


_PROVENANCE_FIELDS: dict[str, tuple[type, ...]] = {
    "tool_version": (str,),
    "base_model": (str,),
    "base_fingerprint": (dict, type(None)),
    "policy_sha256": (str,),
    "signer_keyid": (str, type(None)),
    "data_sha256": (str,),
    "config": (dict,),
    "mode": (str,),
    "frozen_tensor_digests": (dict,),
    "ignored_policy_sha256": (str, type(None)),
}
# Fields a record written before they existed may lack.
_OPTIONAL = {"ignored_policy_sha256"}


@dataclass(frozen=True)
class RunProvenance:
    """What a fine-tune was made from; written by `finetune`, checked by `audit`.

    `base_fingerprint` maps each component to the root digest of the base's weights and
    `frozen_tensor_digests` each frozen tensor to (stored dtype, digest) (both empty or None
    for a run without a policy); `policy_sha256` is the sha256 of the policy's canonical
    payload, or "none".
    """

    tool_version: str
    base_model: str
    base_fingerprint: dict[str, str] | None
    policy_sha256: str
    signer_keyid: str | None
    data_sha256: str
    config: dict[str, Any]
    mode: str  # "full" or "lora"
    frozen_tensor_digests: dict[str, tuple[str, str]]
    # sha256 of the model's own policy when the run set it aside (--ignore-shipped-policy)
    ignored_policy_sha256: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunProvenance:
        """Parse a record an untrusted derivative carries; ValueError says what is wrong."""
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError("provenance is not valid JSON") from None
        if not isinstance(raw, dict):
            raise ValueError("provenance is not an object")
        for name, types in _PROVENANCE_FIELDS.items():
            if name not in raw and name in _OPTIONAL:
                continue
            if name not in raw:
                raise ValueError(f"provenance has no {name}")
            if not isinstance(raw[name], types):
                raise ValueError(f"provenance field {name} has the wrong type")
        unknown = sorted(set(raw) - set(_PROVENANCE_FIELDS))
        if unknown:
            raise ValueError(f"provenance has an unknown field {unknown[0]}")
        digests = raw["frozen_tensor_digests"]
        if not all(isinstance(v, list) and len(v) == 2 for v in digests.values()):
            raise ValueError("provenance lists frozen-tensor digests that are not (dtype, digest)")
        return cls(**{**raw, "frozen_tensor_digests": {k: tuple(v) for k, v in digests.items()}})
