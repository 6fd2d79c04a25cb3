"""The UNet's block structure, for reporting where a policy freezes.

Groups fully qualified UNet tensor names by block (conv_in, time_embedding, down_blocks.N,
mid_block, up_blocks.N, conv_out) and by part (resnets, attentions, samplers, other), in the
order data flows through the U. Used by `policy show` (table and heatmap) and `evaluate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PARTS = ("resnets", "attentions", "downsamplers", "upsamplers", "other")
_BLOCK = re.compile(r"^unet\.(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(\w+)")


def block_of(name: str) -> tuple[str, str]:
    """('down_blocks.1', 'attentions') for a fully qualified UNet tensor name."""
    match = _BLOCK.match(name)
    if match:
        part = match.group(2)
        return match.group(1), part if part in PARTS else "other"
    head = name.removeprefix("unet.").split(".", 1)[0]
    if head in ("conv_norm_out", "conv_out"):
        return "conv_out", "other"
    if head in ("time_embedding", "time_proj", "add_embedding", "class_embedding"):
        return "time_embedding", "other"
    return head, "other"


def _block_rank(block: str) -> tuple[int, int]:
    kind, _, index = block.partition(".")
    order = {"conv_in": 0, "time_embedding": 1, "down_blocks": 2, "mid_block": 3, "up_blocks": 4}
    return order.get(kind, 5), int(index) if index.isdigit() else 0


@dataclass(frozen=True)
class BlockShare:
    block: str
    frozen_tensors: int
    tensors: int
    frozen_parameters: int
    parameters: int

    @property
    def parameter_share(self) -> float:
        return self.frozen_parameters / self.parameters if self.parameters else 0.0


def shares_by_block(
    numel: dict[str, int],
    frozen: set[str],
    by_part: bool = False,
    parts: dict[str, float] | None = None,
) -> list[BlockShare]:
    """Frozen tensors and parameters per block (or per block/part), in U order; `parts` are
    tensors frozen in part, with the share of their rows that is (their parameters count)."""
    parts = parts or {}
    groups: dict[str, list[int]] = {}
    for name, count in numel.items():
        block, part = block_of(name)
        key = f"{block}/{part}" if by_part else block
        stats = groups.setdefault(key, [0, 0, 0, 0])
        stats[1] += 1
        stats[3] += count
        if name in frozen:
            stats[0] += 1
            stats[2] += count
        elif name in parts:
            stats[2] += round(count * parts[name])
    ordered = sorted(groups, key=lambda k: (_block_rank(k.split("/")[0]), k))
    return [BlockShare(k, *groups[k]) for k in ordered]


def plot_heatmap(
    numel: dict[str, int],
    frozen: set[str],
    out: Path,
    title: str,
    partial: dict[str, float] | None = None,
) -> Path:
    """A block x part heatmap of the frozen parameter share, annotated, written as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from guardtune import atomic

    cells = {s.block: s for s in shares_by_block(numel, frozen, True, partial)}
    blocks = [s.block for s in shares_by_block(numel, frozen)]
    parts = [p for p in PARTS if any(k.endswith(f"/{p}") for k in cells)]
    grid = np.full((len(parts), len(blocks)), np.nan)
    for row, part in enumerate(parts):
        for column, block in enumerate(blocks):
            cell = cells.get(f"{block}/{part}")
            if cell is not None:
                grid[row, column] = cell.parameter_share
    figure, axes = plt.subplots(figsize=(1.0 + 0.9 * len(blocks), 1.4 + 0.6 * len(parts)))
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#eeeeee")
    image = axes.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for row in range(len(parts)):
        for column in range(len(blocks)):
            if not np.isnan(grid[row, column]):
                value = grid[row, column]
                color = "white" if value > 0.6 else "black"
                axes.text(column, row, f"{value:.0%}", ha="center", va="center", color=color)
    axes.set_xticks(range(len(blocks)), [b.replace("_blocks", "") for b in blocks], rotation=45)
    axes.set_yticks(range(len(parts)), parts)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="frozen share of parameters")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic.write_bytes(out, buffer.getvalue())
    return out
