"""Encodings on disk: the cache key, reuse, damage, flips, crops, caption dropout and order."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from guardtune.data import ImageCaptionDataset, scan_folder
from guardtune.digits.dataset import export_digits
from guardtune.training.encode import EncodedData
from guardtune.training.order import (
    BucketOrder,
    EpochOrder,
    assign_buckets,
    batch_number,
    bucket_sizes,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return export_digits(tmp_path_factory.mktemp("data") / "sevens", (7,), "test").out


@pytest.fixture
def counted(embedded_pipeline, monkeypatch):
    """The embedded pipeline with its VAE's encode calls counted (images encoded)."""
    calls = []
    encode = embedded_pipeline.vae.encode

    def counting(pixels, *args, **kwargs):
        calls.append(len(pixels))
        return encode(pixels, *args, **kwargs)

    monkeypatch.setattr(embedded_pipeline.vae, "encode", counting)
    return embedded_pipeline, calls


def _encode(pipeline, folder: Path, cache_dir: Path | None, **options) -> EncodedData:
    dataset = ImageCaptionDataset(scan_folder(folder), 32)
    return EncodedData(pipeline, dataset, CPU, cache=cache_dir is not None, cache_dir=cache_dir,
                       **options)  # fmt: skip


def test_a_second_run_on_the_same_data_reads_the_cache(counted, data, tmp_path):
    pipeline, calls = counted
    first = _encode(pipeline, data, tmp_path)
    encoded_images = sum(calls)
    assert encoded_images == len({e.image_path for e in scan_folder(data).examples})
    second = _encode(pipeline, data, tmp_path)
    assert sum(calls) == encoded_images  # nothing encoded again
    assert torch.equal(first.latent_mean, second.latent_mean)
    assert torch.equal(first.embeddings, second.embeddings)
    generator = torch.Generator().manual_seed(3)
    a = first.batch(8, generator)
    b = second.batch(8, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_changed_image_resolution_or_vae_is_a_different_entry(counted, data, tmp_path):
    pipeline, calls = counted
    _encode(pipeline, data, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    first_image = sorted(copy.glob("*.png"))[0]
    with Image.open(first_image) as image:
        changed = image.convert("RGB")
    changed.putpixel((0, 0), (255, 0, 0))
    changed.save(first_image)
    before = sum(calls)
    _encode(pipeline, copy, tmp_path)
    assert sum(calls) > before  # one pixel is a new key
    before = sum(calls)
    EncodedData(pipeline, ImageCaptionDataset(scan_folder(data), 24), CPU, cache_dir=tmp_path)
    assert sum(calls) > before
    before = sum(calls)
    weight = next(iter(pipeline.vae.parameters()))
    with torch.no_grad():
        weight[0].add_(1e-3)
    try:
        _encode(pipeline, data, tmp_path)
    finally:
        with torch.no_grad():
            weight[0].sub_(1e-3)
    assert sum(calls) > before
    assert len(list((tmp_path / "latents").iterdir())) == 4


def test_a_damaged_entry_is_encoded_again_not_read(counted, data, tmp_path):
    pipeline, calls = counted
    reference = _encode(pipeline, data, tmp_path).latent_mean.clone()
    gc.collect()  # the damage below is done between runs, not under a live mapping
    (entry,) = (tmp_path / "latents").iterdir()
    mean = entry / "mean.npy"
    mean.write_bytes(mean.read_bytes()[:200])  # truncated
    before = sum(calls)
    again = _encode(pipeline, data, tmp_path)
    assert sum(calls) > before
    assert torch.equal(reference, again.latent_mean)
    # An entry whose record names other content (a copied or edited folder) is not trusted.
    record = json.loads((entry / "entry.json").read_text())
    (entry / "entry.json").write_text(json.dumps(record | {"resolution": 99}))
    before = sum(calls)
    _encode(pipeline, data, tmp_path)
    assert sum(calls) > before


def test_without_a_cache_nothing_is_left_behind(embedded_pipeline, data, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    encoded = _encode(embedded_pipeline, data, None)
    assert len(list(tmp_path.iterdir())) == 2  # latents and text, while the data lives
    latents, _ = encoded.batch(4, torch.Generator().manual_seed(0))
    assert latents.shape[0] == 4
    del encoded
    assert list(tmp_path.iterdir()) == []


def test_the_dataset_decodes_nothing_up_front(data, monkeypatch):
    import guardtune.data as data_module

    decoded = []
    load = data_module.load_image_tensor
    monkeypatch.setattr(data_module, "load_image_tensor",
                        lambda *a, **k: decoded.append(a[0]) or load(*a, **k))  # fmt: skip
    dataset = ImageCaptionDataset(scan_folder(data), 32)
    assert decoded == []
    dataset.image(0)
    assert len(decoded) == 1


def test_flipped_rows_are_the_mirrored_images(embedded_pipeline, data, tmp_path):
    encoded = _encode(embedded_pipeline, data, tmp_path, flip=True)
    dataset = ImageCaptionDataset(scan_folder(data), 32)
    mirrored = dataset.image(0, flip=True)[None]
    with torch.no_grad():
        expected = embedded_pipeline.vae.encode(mirrored).latent_dist.mean
    assert encoded.latent_mean is not None
    assert torch.allclose(encoded.latent_mean[1], expected[0], atol=1e-5)
    assert not torch.allclose(encoded.latent_mean[0], expected[0], atol=1e-3)
    # Draws take either view: over many draws of one example, both appear.
    index = torch.zeros(64, dtype=torch.long)
    latents, _ = encoded.take(index, torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    flips = (torch.rand(64, generator=replay) < 0.5).long()
    assert 0 < int(flips.sum()) < 64
    noise = torch.randn(latents.shape, generator=replay)
    rows = encoded.image_row[index] * 2 + flips
    expected = (encoded.latent_mean[rows] + encoded.latent_std[rows] * noise) * encoded.scaling
    assert torch.equal(latents, expected)


def test_random_crops_encode_each_draw_anew(counted, tmp_path):
    pipeline, calls = counted
    folder = tmp_path / "wide"
    folder.mkdir()
    image = Image.new("RGB", (64, 32))
    for x in range(64):
        for y in range(32):
            image.putpixel((x, y), (4 * x, 0, 255 - 4 * x))
    image.save(folder / "a.png")
    (folder / "a.txt").write_text("a gradient")
    encoded = _encode(pipeline, folder, tmp_path, random_crop=True)
    assert encoded.latent_mean is None and calls == []
    index = torch.zeros(2, dtype=torch.long)
    first, _ = encoded.take(index, torch.Generator().manual_seed(0))
    second, _ = encoded.take(index, torch.Generator().manual_seed(1))
    assert calls == [2, 2]
    assert not torch.allclose(first, second)
    # The crops are of the image itself: their left edges differ in colour.
    dataset = ImageCaptionDataset(scan_folder(folder), 32)
    left, right = dataset.image(0, crop=(0.0, 0.5)), dataset.image(0, crop=(1.0, 0.5))
    assert float(left[0, 0, 0]) < float(right[0, 0, 0])


def test_caption_dropout_trains_some_draws_on_the_empty_caption(embedded_pipeline, data, tmp_path):
    encoded = _encode(embedded_pipeline, data, tmp_path, extra_captions=("",))
    empty = encoded.embeddings[encoded.captions.index("")]
    index = torch.arange(len(encoded)).repeat(4)[:64]
    _, kept = encoded.take(index, torch.Generator().manual_seed(0))
    assert not any(torch.equal(s, empty) for s in kept)
    _, dropped = encoded.take(index, torch.Generator().manual_seed(0), caption_dropout=0.5)
    empties = sum(torch.equal(s, empty) for s in dropped)
    assert 10 < empties < 54


def test_epochs_are_permutations_whatever_the_split_into_draws():
    order = EpochOrder(10, seed=4)
    whole = order.indices(0, 30)
    for epoch in range(3):
        assert sorted(whole[10 * epoch : 10 * epoch + 10].tolist()) == list(range(10))
    assert not torch.equal(whole[:10], whole[10:20])
    pieces = torch.cat([EpochOrder(10, seed=4).indices(start, 3) for start in range(0, 30, 3)])
    assert torch.equal(pieces, whole)
    batches = EpochOrder(10, seed=4, batch_size=5)
    assert torch.equal(torch.cat([batches.batch(k) for k in range(6)]), whole)
    assert batch_number(step=2, micro=1, rank=1, grad_accum=2, processes=2) == 11


def test_buckets_are_kohyas_multiples_of_the_step_within_the_area():
    sizes = bucket_sizes(512, 64, 256, 1024)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert all(min(w, h) >= 256 and max(w, h) <= 1024 for w, h in sizes)
    chosen = assign_buckets([(1000, 400), (400, 1000), (300, 300)], sizes)
    assert [sizes[int(i)] for i in chosen] == [(768, 320), (320, 768), (512, 512)]  # 2.4 ~ 2.5


def test_bucket_batches_cover_each_epoch_and_never_mix_shapes():
    buckets = torch.tensor([0, 1, 0, 2, 1, 0, 0, 2, 1, 0])
    order = BucketOrder(buckets, seed=1, batch_size=3)
    assert order.batches_per_epoch == 2 + 1 + 1  # ceil(5/3) + ceil(3/3) + ceil(2/3)
    epoch = [order.batch(k) for k in range(4)]
    assert sorted(torch.cat(epoch).tolist()) == list(range(10))
    assert all(len(set(buckets[b].tolist())) == 1 for b in epoch)
    assert [b.tolist() for b in epoch] == [
        b.tolist() for b in BucketOrder(buckets, 1, 3).batches(0)
    ]
    assert [b.tolist() for b in epoch] != [order.batch(k).tolist() for k in range(4, 8)]


def _mixed_shapes(folder: Path) -> Path:
    folder.mkdir()
    for name, size in (("wide", (64, 32)), ("tall", (32, 64)), ("square", (40, 40))):
        Image.new("RGB", size, (200, 30, 30)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} red image")
    return folder


def test_bucketed_encodings_keep_each_images_shape(embedded_pipeline, tmp_path):
    folder = _mixed_shapes(tmp_path / "mixed")
    buckets = bucket_sizes(32, 8, 16, 64)
    encoded = _encode(embedded_pipeline, folder, tmp_path / "cache", buckets=buckets)
    shapes = {}
    for example in range(len(encoded)):
        latents, _ = encoded.take(torch.tensor([example]), torch.Generator().manual_seed(0))
        shapes[encoded.captions[int(encoded.caption_row[example])]] = tuple(latents.shape[-2:])
    factor = embedded_pipeline.vae_scale_factor
    wide = buckets[int(encoded.bucket_of_image[2])]  # images sort as square, tall, wide
    assert wide[0] > wide[1] and shapes["a wide red image"] == (
        wide[1] // factor,
        wide[0] // factor,
    )
    assert shapes["a tall red image"] == (wide[0] // factor, wide[1] // factor)
    assert shapes["a square red image"] == (32 // factor, 32 // factor)
    with pytest.raises(ValueError, match="a batch must be of one bucket"):
        encoded.take(torch.tensor([0, 1]), torch.Generator())


def test_sdxl_draws_carry_their_own_size_and_crop(tmp_path):
    from guardtune.models import load_pipeline
    from guardtune.training.conditioning import unet_inputs
    from tests.sdxl_model import make_tiny_sdxl

    pipeline = load_pipeline(str(make_tiny_sdxl(tmp_path / "sdxl")), device=CPU)
    folder = tmp_path / "wide"
    folder.mkdir()
    Image.new("RGB", (48, 32), (0, 0, 255)).save(folder / "a.png")
    (folder / "a.txt").write_text("a blue image")
    plain = _encode(pipeline, folder, tmp_path / "cache")
    _, states = plain.take(torch.tensor([0]), torch.Generator())
    ids = unet_inputs(pipeline.unet, states)["added_cond_kwargs"]["time_ids"]
    # Original 32x48 (h, w), resized to cover 32x32 as is and cropped 8 px in from the left.
    assert ids.tolist() == [[32.0, 48.0, 0.0, 8.0, 32.0, 32.0]]
    cropped = _encode(pipeline, folder, tmp_path / "cache", random_crop=True)
    lefts = set()
    for seed in range(6):
        _, states = cropped.take(torch.tensor([0]), torch.Generator().manual_seed(seed))
        lefts.add(unet_inputs(pipeline.unet, states)["added_cond_kwargs"]["time_ids"][0, 3].item())
    assert len(lefts) > 1 and all(0 <= left <= 16 for left in lefts)
