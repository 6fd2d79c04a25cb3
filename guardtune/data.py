"""Reading the image folders fine-tuning users already have.

Four layouts are recognised, in this order (the first that applies wins):

1. `metadata.jsonl` (Hugging Face imagefolder): one JSON object per line with `file_name` and a
   caption column (`text` unless `caption_column` says otherwise).
2. DreamBooth: every image in the folder, all captioned with `instance_prompt`.
3. kohya class folders `<repeats>_<class name>/`: each image is seen `repeats` times per epoch;
   its caption is a same-name `.txt` file if present, else the class name.
4. Images with same-name `.txt` caption files.

`scan_folder` validates everything up front (every image decodes and has a usable mode, every
caption exists) and raises DataError naming the offending file, so a run never starts on bad
data. `ImageCaptionDataset` turns the scan into tensors for the training recipes, one image at
a time (never the whole set at once: memory must not grow with the data);
`check_folder` is `guardtune data check`: the same scan, summarised.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from guardtune.contract import regular_file_inside
from guardtune.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Modes that convert to RGB without guessing (as diffusers' training scripts convert them);
# 32-bit integer and float images are refused: their range is not known.
ACCEPTED_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L")
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
MAX_REPEATS = 10_000


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


@dataclass(frozen=True)
class FolderScan:
    """A validated training set: examples (repeats already expanded) and the layout found."""

    root: Path
    layout: str
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def unique_images(self) -> int:
        return len({e.image_path for e in self.examples})


def _inside(path: Path, root: Path) -> Path:
    """`path` if it is a regular file inside the data folder once links are followed."""
    regular_file_inside(path, root.resolve(), f"leads outside the data folder {root}; refused")
    return path


def _images_in(folder: Path, root: Path) -> list[Path]:
    names = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [_inside(p, root) for p in names if not p.is_dir()]


def check_image(path: Path) -> None:
    """Decode the image fully; DataError naming the file if it is corrupt or of a bad mode."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
    except Image.DecompressionBombError as error:
        raise DataError(f"{path}: refused, too many pixels to decode safely ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: not a readable image ({error})") from error
    if mode not in ACCEPTED_MODES:
        raise DataError(
            f"{path}: image mode {mode} is not supported",
            hint=f"save it as one of {', '.join(ACCEPTED_MODES)}",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of an accepted mode. 16-bit grey keeps its top 8 bits: PIL's own conversion
    clips every value above 255 to white."""
    if image.mode.startswith("I;16"):
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def _read_caption(path: Path, root: Path) -> str:
    _inside(path, root)
    try:
        caption = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: caption file not readable ({error})") from error
    if not caption:
        raise DataError(f"{path}: caption file is empty")
    return caption


def _scan_metadata(root: Path, caption_column: str) -> list[Example]:
    metadata = _inside(root / "metadata.jsonl", root)
    try:
        text = metadata.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        detail = f"{error.reason} at byte {error.start}"
        raise DataError(f"{metadata}: not UTF-8 text ({detail})") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from error
        except ValueError as error:  # e.g. an integer of more than 4300 digits
            raise DataError(f"{where}: not valid JSON ({error})") from error
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply") from None
        if not isinstance(record, dict) or "file_name" not in record:
            raise DataError(f"{where}: record has no 'file_name'")
        caption = record.get(caption_column)
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(
                f"{where}: record has no caption in column '{caption_column}'",
                hint="choose the column with --caption-column",
            )
        name = record["file_name"]
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"{where}: file_name {name!r} is not a path inside the data folder")
        try:
            (name + caption).encode("utf-8")  # JSON can spell a lone surrogate ("\ud800")
        except UnicodeEncodeError:
            raise DataError(f"{where}: record holds a lone surrogate, which is not text") from None
        image_path = root / name
        if not os.path.exists(image_path):  # False, not OSError, for a name too long to look up
            raise DataError(f"{where}: names {name}, which does not exist")
        examples.append(Example(_inside(image_path, root), caption.strip()))
    return examples


def _scan_kohya(folders: list[Path], root: Path) -> list[Example]:
    examples = []
    for folder in folders:
        match = _KOHYA_FOLDER.match(folder.name)
        assert match is not None
        repeats, class_name = int(match.group(1)), match.group(2).replace("_", " ").strip()
        if not 1 <= repeats <= MAX_REPEATS:  # a huge count would fill memory with examples
            raise DataError(f"{folder}: repeats must be between 1 and {MAX_REPEATS}")
        images = _images_in(folder, root)
        if not images:
            raise DataError(f"{folder}: class folder has no images")
        for image_path in images:
            caption_file = image_path.with_suffix(".txt")
            exists = caption_file.exists() or caption_file.is_symlink()
            caption = _read_caption(caption_file, root) if exists else class_name
            examples.extend([Example(image_path, caption)] * repeats)
    return examples


def scan_folder(
    root: Path, caption_column: str = "text", instance_prompt: str | None = None
) -> FolderScan:
    """Find the layout of `root`, check every image and caption, return the examples."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    kohya_folders = sorted(p for p in root.iterdir() if p.is_dir() and _KOHYA_FOLDER.match(p.name))
    if (root / "metadata.jsonl").is_file():
        layout, examples = "metadata.jsonl", _scan_metadata(root, caption_column)
    elif instance_prompt is not None:
        if not instance_prompt.strip():
            raise DataError("--instance-prompt is empty")
        layout = "dreambooth"
        examples = [Example(p, instance_prompt.strip()) for p in _images_in(root, root)]
    elif kohya_folders:
        layout, examples = "kohya", _scan_kohya(kohya_folders, root)
    else:
        layout = "captions"
        examples = []
        for image_path in _images_in(root, root):
            caption_file = image_path.with_suffix(".txt")
            if not (caption_file.exists() or caption_file.is_symlink()):
                raise DataError(
                    f"{image_path}: no caption file {caption_file.name}",
                    hint="add captions, a metadata.jsonl, or pass --instance-prompt",
                )
            examples.append(Example(image_path, _read_caption(caption_file, root)))
    if not examples:
        raise DataError(f"data folder {root} has no images", hint="add PNG or JPEG files")
    for image_path in sorted({e.image_path for e in examples}):
        check_image(image_path)
    return FolderScan(root, layout, tuple(examples))


@dataclass(frozen=True)
class FolderCheck:
    """What `guardtune data check` reports: the layout found and what an epoch holds."""

    folder: Path
    layout: str
    examples: int  # per epoch, kohya repeats included
    unique_images: int
    captions: tuple[str, ...]  # distinct, sorted


def check_folder(
    folder: Path, *, caption_column: str = "text", instance_prompt: str | None = None
) -> FolderCheck:
    """Validate a data folder as a run would (DataError naming the bad file) and summarise it."""
    scan = scan_folder(folder, caption_column, instance_prompt)
    captions = tuple(sorted({e.caption for e in scan.examples}))
    return FolderCheck(scan.root, scan.layout, len(scan), scan.unique_images, captions)


def cover(source: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The size (width, height) `source` is resized to so that it just covers `target`."""
    scale = max(target[0] / source[0], target[1] / source[1])
    return (max(target[0], round(source[0] * scale)), max(target[1], round(source[1] * scale)))


def crop_origin(
    resized: tuple[int, int], target: tuple[int, int], crop: tuple[float, float]
) -> tuple[int, int]:
    """(left, top) of a `target` crop of a `resized` image, placed at `crop` (left, top: each 0
    to 1 of the slack; 0.5, 0.5 is the centre)."""
    return round((resized[0] - target[0]) * crop[0]), round((resized[1] - target[1]) * crop[1])


def load_image_tensor(
    path: Path, resolution: int, crop: tuple[float, float] = (0.5, 0.5),
    size: tuple[int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """RGB image to (3, H, W) in [-1, 1] for a target `size` (width, height; default a square
    of `resolution`): resized to cover it, then cropped to it at `crop` (see `crop_origin`)."""
    target = size or (resolution, resolution)
    with Image.open(path) as image:
        rgb = to_rgb(image)
    resized = cover(rgb.size, target)
    if resized != rgb.size:
        rgb = rgb.resize(resized, Image.Resampling.BICUBIC)
    left, top = crop_origin(resized, target, crop)
    rgb = rgb.crop((left, top, left + target[0], top + target[1]))
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding it."""
    with Image.open(path) as image:
        return image.size


class ImageCaptionDataset(torch.utils.data.Dataset):
    """The examples of a FolderScan as pixel tensors and captions, decoded when asked for.

    `images` are the distinct image files (kohya repeats name one file many times) and
    `image_row[i]` is example i's image among them, so the recipes encode each file once.
    """

    def __init__(self, scan: FolderScan, resolution: int) -> None:
        self.scan = scan
        self.resolution = resolution
        self.images = sorted({e.image_path for e in scan.examples})
        row = {path: i for i, path in enumerate(self.images)}
        self.image_row = torch.tensor([row[e.image_path] for e in scan.examples], dtype=torch.long)
        self.captions = [e.caption for e in scan.examples]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.image(int(self.image_row[index])), self.captions[index]

    def image(
        self, row: int, flip: bool = False, crop: tuple[float, float] = (0.5, 0.5),
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Distinct image `row` as (3, H, W) in [-1, 1] (a square of the resolution unless
        `size` is given), mirrored if `flip`; `crop` places the crop (see `crop_origin`)."""
        pixels = load_image_tensor(self.images[row], self.resolution, crop, size)
        return pixels.flip(-1) if flip else pixels

    def original_size(self, row: int) -> tuple[int, int]:
        return image_size(self.images[row])

    @property
    def pixels(self) -> list[torch.Tensor]:
        """Every example's pixels, centre-cropped: for small sets (held-out images) only."""
        decoded = [self.image(i) for i in range(len(self.images))]
        return [decoded[int(row)] for row in self.image_row]
