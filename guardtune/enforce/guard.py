"""The guard: proof, during and after training, that no frozen tensor changed.

`FrozenDigests` holds the digest and stored dtype of every frozen tensor, taken from the
verified policy and the model's safetensors headers. `check` re-hashes the live tensors (cast
back to the stored dtype, which is exact for the upcast weights training uses) and raises
IntegrityError (exit 7) naming the first tensor that differs. Tensors frozen in part are
checked by the digest of their frozen rows, and any LoRA adapter on them (peft's `lora_B`) must
be zero on those rows, so the adapter's update cannot reach them. The recipe calls it at every
checkpoint and before it writes any output. (`audit` reads derivatives from their files and
compares digests there; it does not load them into modules.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from guardtune.errors import IntegrityError
from guardtune.tensorfile import SAFETENSORS_TO_TORCH, TensorRecord
from guardtune.trust.fingerprint import tensor_digest, tensor_rows_digest
from guardtune.trust.policy import FrozenRows


@dataclass(frozen=True)
class FrozenDigests:
    """Fully qualified name -> (stored safetensors dtype, sha256-tensor-v1 digest)."""

    entries: dict[str, tuple[str, str]]
    rows: dict[str, tuple[str, FrozenRows]] = field(default_factory=dict)  # name -> dtype, rows

    @classmethod
    def from_policy(
        cls,
        frozen: tuple[str, ...],
        digests: dict[str, str],
        records: dict[str, TensorRecord],
        rows: dict[str, FrozenRows] | None = None,
    ) -> FrozenDigests:
        return cls(
            {name: (records[name].dtype, digests[name]) for name in frozen},
            {name: (records[name].dtype, r) for name, r in (rows or {}).items()},
        )

    def check(self, module: nn.Module, component: str = "unet") -> int:
        """IntegrityError if any frozen tensor of `module` differs; return how many were checked."""
        state = dict(module.named_parameters())
        prefix = f"{component}."
        checked = 0
        for name, (dtype_code, expected) in sorted(self.entries.items()):
            if not name.startswith(prefix):
                continue
            local = name[len(prefix) :]
            tensor = state.get(local)
            if tensor is None:
                raise IntegrityError(f"frozen tensor {name} is missing from the model")
            stored = tensor.detach().to("cpu", SAFETENSORS_TO_TORCH[dtype_code]).contiguous()
            raw = stored.reshape(-1).view(torch.uint8).numpy()
            if tensor_digest(name, dtype_code, tuple(stored.shape), raw.data) != expected:
                raise IntegrityError(
                    f"frozen tensor {name} changed during training",
                    hint="nothing was written; report this, it is a bug or tampering",
                )
            checked += 1
        for name, (dtype_code, rows) in sorted(self.rows.items()):
            if not name.startswith(prefix):
                continue
            local = name[len(prefix) :]
            # peft keeps a wrapped module's own weight as `<module>.base_layer.weight`.
            owner, _, leaf = local.rpartition(".")
            tensor = state.get(local, state.get(f"{owner}.base_layer.{leaf}"))
            if tensor is None:
                raise IntegrityError(f"tensor {name} (frozen in part) is missing from the model")
            if tensor_rows_digest(name, tensor, dtype_code, rows.ranges) != rows.digest:
                raise IntegrityError(
                    f"frozen rows of {name} changed during training",
                    hint="nothing was written; report this, it is a bug or tampering",
                )
            adapters = (
                [n for n in state if n.startswith(f"{owner}.lora_B.")] if leaf == "weight" else []
            )
            for adapter in adapters:
                values = state[adapter].detach()
                if any(values[a:b].count_nonzero() for a, b in rows.ranges):
                    raise IntegrityError(
                        f"LoRA adapter {adapter} reaches frozen rows of {name}",
                        hint="nothing was written; report this, it is a bug or tampering",
                    )
            checked += 1
        return checked
