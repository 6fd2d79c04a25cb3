"""Encoding training data once: VAE latents and text embeddings, kept on disk, read per batch.

The VAE and the text encoders are never trained here, so every recipe (fine-tune, mask learner,
evaluate's simulated user and defences) encodes its data up front and draws batches from the
encodings. Memory must not grow with the data, so nothing here holds a whole set:

- images are decoded and encoded 32 at a time, straight into `.npy` files;
- those files are memory-mapped, and a batch copies out only its own rows;
- the files live in a cache (`default_cache_dir`, or `--cache-dir`) under a key of everything
  that decides their content, so a later run, `publish` or `evaluate` on the same data and
  model reuses them: latents are keyed by each image's sha256, the resolution, the flip option
  and the VAE's weights; text embeddings by the captions, the text encoders' weights and the
  tokenizers. A changed byte in any of them is a different key, never a stale hit.

An entry is written into a staging folder and renamed into place, so a killed run leaves no
half-written entry; an entry whose files do not match its record is encoded again. With
`cache=False` the files are anonymous temporaries, removed when the data is dropped.
`data_digest` names a data folder's content for run identities and journals.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guardtune import atomic
from guardtune.data import FolderScan, ImageCaptionDataset, cover, crop_origin
from guardtune.training.conditioning import encode_captions, is_sdxl, pooled_width, with_time_ids
from guardtune.training.order import assign_buckets
from guardtune.training.progress import track

CACHE_ENV = "GUARDTUNE_CACHE"
CACHE_FORMAT = 1  # bump when what an entry holds changes: old entries are then never read
ENCODE_BATCH = 32
ENTRY = "entry.json"


def default_cache_dir() -> Path:
    """$GUARDTUNE_CACHE, else guardtune/ under $XDG_CACHE_HOME (default ~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "guardtune"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_digest(scan: FolderScan) -> str:
    """sha256 over every example's caption and image bytes, in order."""
    digest = hashlib.sha256()
    for example in scan.examples:
        digest.update(example.caption.encode() + b"\x00")
        digest.update(bytes.fromhex(file_sha256(example.image_path)))
    return digest.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes and bytes), as loaded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())  # hashed in place, not copied
    return digest.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    """The vocabulary and merges that decide a caption's token ids."""
    ranks = getattr(tokenizer, "bpe_ranks", {})
    content = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "merges": sorted((" ".join(pair), rank) for pair, rank in ranks.items()),
        "max_length": tokenizer.model_max_length,
    }
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


class _Store:
    """Arrays of fixed rows written in batches and then memory-mapped: a cache entry, or
    anonymous temporary files when there is no cache."""

    def __init__(self, cache_dir: Path | None, kind: str, material: dict[str, Any]) -> None:
        self.material = material
        self._temporary: tempfile.TemporaryDirectory | None = None
        if cache_dir is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="guardtune-encoded-")
            self.folder = Path(self._temporary.name) / "entry"
        else:
            self.folder = Path(cache_dir) / kind / _key(material)

    def load(self, names: tuple[str, ...], rows: int) -> dict[str, torch.Tensor] | None:
        """The entry's arrays, memory-mapped, if the entry is complete and is this one."""
        record = self.folder / ENTRY
        if self._temporary is not None or not record.is_file():
            return None
        try:
            if json.loads(record.read_text()) != self.material:
                return None
            arrays = {n: np.load(self.folder / f"{n}.npy", mmap_mode="c") for n in names}
        except (OSError, ValueError):
            return None  # unreadable or damaged: encode again, replacing it
        if any(a.dtype != np.float32 or a.shape[0] != rows for a in arrays.values()):
            return None
        return {n: torch.from_numpy(a) for n, a in arrays.items()}

    def write(self, batches, names: tuple[str, ...], rows: int) -> dict[str, torch.Tensor]:
        """Fill the arrays from `batches` (one tuple of tensors per batch, in row order)."""
        with atomic.staged_dir(self.folder) as staging:
            arrays: dict[str, np.memmap] = {}
            start = 0
            for batch in batches:
                for name, tensor in zip(names, batch, strict=True):
                    if name not in arrays:
                        shape = (rows, *tensor.shape[1:])
                        path = staging / f"{name}.npy"
                        arrays[name] = np.lib.format.open_memmap(path, "w+", np.float32, shape)
                    arrays[name][start : start + len(tensor)] = tensor.float().cpu().numpy()
                start += len(batch[0])
            for array in arrays.values():
                array.flush()
            del arrays
            (staging / ENTRY).write_text(json.dumps(self.material, sort_keys=True))
        loaded = self.load(names, rows) if self._temporary is None else None
        if loaded is None:  # no cache: map the temporaries themselves
            arrays_read = {n: np.load(self.folder / f"{n}.npy", mmap_mode="c") for n in names}
            loaded = {n: torch.from_numpy(a) for n, a in arrays_read.items()}
        return loaded


class EncodedData:
    """VAE latent distributions (mean, std) per distinct image and text conditioning per
    distinct caption (`guardtune.training.conditioning` says what a row holds), memory-mapped.

    Example i is image `image_row[i]` with caption `caption_row[i]`. Images are encoded at
    their bucket's size (`buckets`, (width, height) each, with `bucket_of_image`; one square of
    the resolution by default), one store per bucket. With `flip`, every image is encoded
    mirrored as well (rows 2k and 2k+1 of its bucket), and each draw picks one of the two. With
    `random_crop`, latents are not stored: each draw crops and encodes its images anew (a crop
    differs per draw), so the VAE stays with the data. For SDXL, every draw carries its own
    size conditioning: the image's original size, where it was cropped, and the bucket's size.
    """

    def __init__(
        self, pipeline, dataset: ImageCaptionDataset, device: torch.device,
        show_progress: bool = False, *, cache: bool = True, cache_dir: Path | None = None,
        flip: bool = False, random_crop: bool = False, extra_captions: tuple[str, ...] = (),
        buckets: list[tuple[int, int]] | None = None,
    ) -> None:  # fmt: skip
        vae = pipeline.vae
        self.scaling = float(vae.config.scaling_factor)
        self.flip, self.random_crop = flip, random_crop
        self.image_row = dataset.image_row
        folder = (cache_dir or default_cache_dir()) if cache else None
        captions = sorted(set(dataset.captions) | set(extra_captions))
        self.captions = captions  # embeddings[i] encodes captions[i]
        row = {c: i for i, c in enumerate(captions)}
        self.caption_row = torch.tensor([row[c] for c in dataset.captions], dtype=torch.long)
        self._dataset: ImageCaptionDataset | None = dataset if random_crop else None
        self._vae: Any = vae if random_crop else None
        square = (dataset.resolution, dataset.resolution)
        self.buckets = list(buckets) if buckets else [square]
        sizes = [dataset.original_size(i) for i in range(len(dataset.images))]
        self.bucket_of_image = (
            assign_buckets(sizes, self.buckets)
            if buckets
            else torch.zeros(len(dataset.images), dtype=torch.long)
        )
        self._original_sizes = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
        self._row_in_bucket = torch.zeros(len(dataset.images), dtype=torch.long)
        for b in range(len(self.buckets)):
            members = torch.nonzero(self.bucket_of_image == b).flatten()
            self._row_in_bucket[members] = torch.arange(len(members))
        unet = pipeline.unet
        self._sdxl_width = pooled_width(unet) if is_sdxl(unet) else None
        self._means: list[torch.Tensor] = []
        self._stds: list[torch.Tensor] = []
        self._stores: list[_Store] = []

        views = 2 if flip else 1
        counts = torch.bincount(self.bucket_of_image, minlength=len(self.buckets)).tolist()
        image_batches = sum(-(-c * views // ENCODE_BATCH) for c in counts)
        text_batches = -(-len(captions) // ENCODE_BATCH)
        total = (0 if random_crop else image_batches) + text_batches
        with torch.no_grad(), track("encode", total, device, show_progress) as report:
            if not random_crop:
                vae_digest = module_digest(vae) if folder else None
                for bucket in range(len(self.buckets)):
                    self._encode_bucket(vae, vae_digest, dataset, bucket, device, folder, report)
            self.embeddings = self._encode_text(pipeline, dataset, device, folder, report)

    @property
    def latent_mean(self) -> torch.Tensor | None:
        """The latent means of a one-bucket encoding (None when random crops store none)."""
        return self._means[0] if len(self._means) == 1 else None

    @property
    def latent_std(self) -> torch.Tensor | None:
        return self._stds[0] if len(self._stds) == 1 else None

    @property
    def bucket_of_example(self) -> torch.Tensor:
        return self.bucket_of_image[self.image_row]

    def _encode_bucket(self, vae, vae_digest, dataset, bucket, device, folder, report) -> None:
        views = 2 if self.flip else 1
        size = self.buckets[bucket]
        members = torch.nonzero(self.bucket_of_image == bucket).flatten().tolist()
        rows = len(members) * views
        material = {
            "format": CACHE_FORMAT, "kind": "latents", "size": list(size),
            "flip": self.flip, "vae": vae_digest,
            "images": [file_sha256(dataset.images[i]) for i in members] if folder else None,
        }  # fmt: skip
        store = _Store(folder, "latents", material)
        names = ("mean", "std")
        arrays = store.load(names, rows) if rows else None
        if arrays is None and rows:
            order = [(i, bool(f)) for i in members for f in range(views)]

            def batches():
                for start in range(0, rows, ENCODE_BATCH):
                    chunk = order[start : start + ENCODE_BATCH]
                    pixels = torch.stack([dataset.image(i, flip, size=size) for i, flip in chunk])
                    posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
                    report()
                    # The VAE hands back channels-last latents; oneDNN's CPU convolution
                    # backward in torch 2.13 segfaults on them once some (not all) conv
                    # weights are frozen, so latents leave in the default memory format.
                    yield posterior.mean.contiguous(), posterior.std.contiguous()

            arrays = store.write(batches(), names, rows)
        elif rows:
            report(advance=-(-rows // ENCODE_BATCH))
        if arrays is None:  # an empty bucket
            arrays = {n: torch.empty(0) for n in names}
        self._stores.append(store)
        self._means.append(arrays["mean"])
        self._stds.append(arrays["std"])

    def _encode_text(self, pipeline, dataset, device, folder, report) -> torch.Tensor:
        encoders = [pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)]
        tokenizers = [pipeline.tokenizer, getattr(pipeline, "tokenizer_2", None)]
        material = {
            "format": CACHE_FORMAT, "kind": "text", "resolution": dataset.resolution,
            "captions": self.captions,
            "encoders": [module_digest(e) for e in encoders if e is not None] if folder else None,
            "tokenizers": [_tokenizer_digest(t) for t in tokenizers if t is not None]
            if folder
            else None,
        }  # fmt: skip
        store = _Store(folder, "text", material)
        arrays = store.load(("states",), len(self.captions))
        if arrays is None:

            def batches():
                for start in range(0, len(self.captions), ENCODE_BATCH):
                    chunk = self.captions[start : start + ENCODE_BATCH]
                    report()
                    yield (encode_captions(pipeline, chunk, device, dataset.resolution),)

            arrays = store.write(batches(), ("states",), len(self.captions))
        else:
            report(advance=-(-len(self.captions) // ENCODE_BATCH))
        self._stores.append(store)
        return arrays["states"]

    @classmethod
    def concat(cls, parts: list[EncodedData]) -> EncodedData:
        """One set over several encoded with the same model (e.g. all illegal classes).

        The parts' rows are copied into memory: for evaluation sets, not for large data.
        """
        if any(p.random_crop or p.flip or len(p._means) != 1 for p in parts):
            raise ValueError("only plain encodings (no flip, crop or buckets) can be joined")
        joined = cls.__new__(cls)
        first = parts[0]
        joined.scaling, joined.buckets, joined._sdxl_width = (
            first.scaling, first.buckets, first._sdxl_width,
        )  # fmt: skip
        joined.flip, joined.random_crop = False, False
        joined._dataset, joined._vae = None, None
        joined._stores = [s for p in parts for s in p._stores]
        joined._means = [torch.cat([p._means[0] for p in parts])]
        joined._stds = [torch.cat([p._stds[0] for p in parts])]
        images = sum(len(p.bucket_of_image) for p in parts)
        joined.bucket_of_image = torch.zeros(images, dtype=torch.long)
        joined._row_in_bucket = torch.arange(images)
        joined._original_sizes = torch.cat([p._original_sizes for p in parts])
        image_offsets = itertools.accumulate([0] + [len(p.bucket_of_image) for p in parts[:-1]])
        joined.image_row = torch.cat(
            [p.image_row + o for p, o in zip(parts, image_offsets, strict=True)]
        )
        offsets = list(itertools.accumulate([0] + [p.embeddings.shape[0] for p in parts[:-1]]))
        rows = [p.caption_row + o for p, o in zip(parts, offsets, strict=True)]
        joined.caption_row = torch.cat(rows)
        joined.embeddings = torch.cat([p.embeddings for p in parts])
        joined.captions = [c for p in parts for c in p.captions]
        return joined

    def __len__(self) -> int:
        return len(self.caption_row)

    def example_latents(self) -> torch.Tensor:
        """Every example's latent mean, scaled (centre crop, not mirrored): small sets only."""
        assert self.latent_mean is not None, "only one-bucket stored encodings hold this"
        views = 2 if self.flip else 1
        return self.latent_mean[self._row_in_bucket[self.image_row] * views] * self.scaling

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` examples drawn with replacement: their noised latents and conditioning."""
        return self.take(torch.randint(len(self), (size,), generator=generator), generator)

    def take(
        self, index: torch.Tensor, generator: torch.Generator, caption_dropout: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples `index` (all of one bucket): latents sampled from their posteriors (scaled)
        and conditioning; with `caption_dropout`, each caption is replaced by the empty one
        with that chance."""
        images = self.image_row[index]
        bucket = int(self.bucket_of_image[images[0]])
        if bool((self.bucket_of_image[images] != bucket).any()):
            raise ValueError("a batch must be of one bucket (one latent shape)")
        size = self.buckets[bucket]
        flips = torch.rand(len(index), generator=generator) < 0.5 if self.flip else None
        places = torch.full((len(index), 2), 0.5)
        if self.random_crop:
            places = torch.rand(len(index), 2, generator=generator)
            mean, std = self._encode_crops(images, flips, places, size)
        else:
            rows = self._row_in_bucket[images]
            rows = rows * 2 + flips.long() if flips is not None else rows
            mean, std = self._means[bucket][rows], self._stds[bucket][rows]
        noise = torch.randn(mean.shape, generator=generator)
        latents = (mean + std * noise) * self.scaling
        captions = self.caption_row[index]
        if caption_dropout > 0:
            dropped = torch.rand(len(index), generator=generator) < caption_dropout
            captions = torch.where(dropped, self.captions.index(""), captions)
        states = self.embeddings[captions]
        if self._sdxl_width is not None:
            ids = self._size_ids(images, flips, places, size)
            states = with_time_ids(states, self._sdxl_width, ids)
        return latents, states

    def _size_ids(self, images, flips, places, size) -> torch.Tensor:
        """SDXL's size conditioning of each draw, as diffusers' SDXL training script computes
        it: original (height, width), the crop's (top, left) in the resized image (mirrored
        with the image), and the target (height, width)."""
        rows = []
        for i, image in enumerate(images.tolist()):
            width, height = (int(v) for v in self._original_sizes[image])
            resized = cover((width, height), size)
            left, top = crop_origin(resized, size, (float(places[i, 0]), float(places[i, 1])))
            if flips is not None and bool(flips[i]):
                left = resized[0] - size[0] - left
            rows.append([height, width, top, left, size[1], size[0]])
        return torch.tensor(rows, dtype=torch.float32)

    def _encode_crops(self, images, flips, places, size) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._dataset is not None and self._vae is not None
        pixels = torch.stack([
            self._dataset.image(int(row), bool(flips[i]) if flips is not None else False,
                                (float(places[i, 0]), float(places[i, 1])), size)
            for i, row in enumerate(images)
        ])  # fmt: skip
        vae = self._vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return posterior.mean.float().cpu().contiguous(), posterior.std.float().cpu().contiguous()
