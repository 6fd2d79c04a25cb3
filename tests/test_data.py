import json

import pytest
import torch
from PIL import Image

from guardtune.cli import app
from guardtune.data import ImageCaptionDataset, scan_folder
from guardtune.digits.dataset import export_digits
from guardtune.errors import DataError
from tests.conftest import combined_output


def _image(path, mode="RGB", size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = 200 if mode in ("L", "P") else (200, 10, 10, 255)[: len(mode)]
    Image.new(mode, size, color).save(path)
    return path


def _metadata(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


# ------------------------------------------------------------------ the four layouts


def test_metadata_jsonl_with_default_and_custom_caption_column(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "sub" / "b.jpg")
    _metadata(
        tmp_path,
        [
            {"file_name": "a.png", "text": "a cat", "prompt": "first"},
            {"file_name": "sub/b.jpg", "text": "a dog", "prompt": "second"},
        ],
    )
    scan = scan_folder(tmp_path)
    assert scan.layout == "metadata.jsonl"
    assert [e.caption for e in scan.examples] == ["a cat", "a dog"]
    custom = scan_folder(tmp_path, caption_column="prompt")
    assert [e.caption for e in custom.examples] == ["first", "second"]


def test_same_name_txt_captions(tmp_path):
    _image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("  a red square \n")
    scan = scan_folder(tmp_path)
    assert scan.layout == "captions"
    assert scan.examples[0].caption == "a red square"


def test_kohya_class_folders_repeat_and_caption_from_name_or_txt(tmp_path):
    _image(tmp_path / "3_sks dog" / "1.png")
    _image(tmp_path / "3_sks dog" / "2.png")
    (tmp_path / "3_sks dog" / "2.txt").write_text("sks dog on grass")
    _image(tmp_path / "1_pixel_art" / "p.png")
    scan = scan_folder(tmp_path)
    assert scan.layout == "kohya"
    assert len(scan) == 3 * 2 + 1
    assert scan.unique_images == 3
    captions = [e.caption for e in scan.examples]
    assert captions.count("sks dog") == 3
    assert captions.count("sks dog on grass") == 3
    assert captions.count("pixel art") == 1


def test_dreambooth_instance_prompt_captions_every_image(tmp_path):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.webp")
    scan = scan_folder(tmp_path, instance_prompt="a photo of sks person")
    assert scan.layout == "dreambooth"
    assert {e.caption for e in scan.examples} == {"a photo of sks person"}
    assert len(scan) == 2


def test_dataset_crops_to_square_resolution_in_range(tmp_path):
    _image(tmp_path / "wide.png", size=(64, 32))
    _image(tmp_path / "gray.png", mode="L", size=(8, 8))
    scan = scan_folder(tmp_path, instance_prompt="x")
    dataset = ImageCaptionDataset(scan, resolution=32)
    pixels, caption = dataset[0]
    assert caption == "x"
    assert all(p.shape == (3, 32, 32) for p, _ in (dataset[0], dataset[1]))
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    assert torch.allclose(dataset[0][0][0], dataset[0][0][1])  # grayscale became RGB


# ------------------------------------------------------------------ bad input: exit 3, named file


def _check(runner, folder, *extra):
    return runner.invoke(app, ["data", "check", str(folder), *extra])


def test_missing_folder(runner, tmp_path):
    result = _check(runner, tmp_path / "nope")
    assert result.exit_code == 3
    assert "nope" in combined_output(result) and "does not exist" in combined_output(result)


def test_empty_folder(runner, tmp_path):
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "no images" in combined_output(result)


def test_corrupt_image_is_named(runner, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("caption")
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "broken.png" in combined_output(result)


def test_truncated_image_is_named(runner, tmp_path):
    good = _image(tmp_path / "cut.png", size=(64, 64))
    good.write_bytes(good.read_bytes()[:60])
    (tmp_path / "cut.txt").write_text("caption")
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "cut.png" in combined_output(result)


def test_missing_caption_file_is_named(runner, tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("ok")
    _image(tmp_path / "b.png")
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "b.png" in combined_output(result) and "caption" in combined_output(result)


def test_empty_caption_file_is_named(runner, tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("   ")
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "a.txt" in combined_output(result)


def test_metadata_naming_a_missing_file(runner, tmp_path):
    _image(tmp_path / "a.png")
    _metadata(
        tmp_path, [{"file_name": "a.png", "text": "ok"}, {"file_name": "gone.png", "text": "x"}]
    )
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "gone.png" in combined_output(result) and "metadata.jsonl:2" in combined_output(result)


def test_metadata_record_without_caption(runner, tmp_path):
    _image(tmp_path / "a.png")
    _metadata(tmp_path, [{"file_name": "a.png", "prompt": "x"}])
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "metadata.jsonl:1" in combined_output(result) and "'text'" in combined_output(result)
    assert _check(runner, tmp_path, "--caption-column", "prompt").exit_code == 0


def test_metadata_line_that_is_not_json(runner, tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "metadata.jsonl:2" in combined_output(result)


@pytest.mark.parametrize("mode", ["F", "I"])
def test_wrong_image_mode_is_named(runner, tmp_path, mode):
    path = tmp_path / "odd.tiff"
    Image.new(mode, (8, 8)).save(path)
    path = path.rename(tmp_path / "odd.png")  # TIFF is not a suffix we read: name it .png
    (tmp_path / "odd.txt").write_text("caption")
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "odd" in combined_output(result) and "mode" in combined_output(result)


def test_empty_kohya_class_folder(runner, tmp_path):
    (tmp_path / "5_style").mkdir()
    result = _check(runner, tmp_path)
    assert result.exit_code == 3
    assert "5_style" in combined_output(result)


def test_check_reports_layout_as_json(runner, tmp_path):
    _image(tmp_path / "data" / "a.png")
    out = tmp_path / "check.json"
    result = runner.invoke(
        app,
        ["data", "check", str(tmp_path / "data"), "--instance-prompt", "sks", "--json", str(out)],
    )
    assert result.exit_code == 0, combined_output(result)
    report = json.loads(out.read_text())
    assert report["layout"] == "dreambooth" and report["examples"] == 1


# ------------------------------------------------------------------ guardtune data digits


def test_export_digits_train_and_test_do_not_overlap(runner, tmp_path):
    for split in ("train", "test"):
        result = runner.invoke(
            app, ["data", "digits", str(tmp_path / split), "--classes", "7,9", "--split", split]
        )
        assert result.exit_code == 0, combined_output(result)
    rows = {
        split: [json.loads(line) for line in (tmp_path / split / "metadata.jsonl").open()]
        for split in ("train", "test")
    }
    assert {r["label"] for r in rows["train"]} == {7, 9}
    train_rows = {r["source_index"] for r in rows["train"]}
    assert train_rows.isdisjoint(r["source_index"] for r in rows["test"])
    scan = scan_folder(tmp_path / "train")
    assert len(scan) == len(rows["train"]) > 200
    assert scan.examples[0].caption in {"a handwritten digit seven", "a handwritten digit nine"}
    with Image.open(scan.examples[0].image_path) as image:
        assert image.size == (32, 32) and image.mode == "L"


def test_export_bold_style_is_heavier_than_plain(tmp_path):
    plain = export_digits(tmp_path / "plain", (1,), "test")
    bold = export_digits(tmp_path / "bold", (1,), "test", style="bold")
    assert plain.images == bold.images

    def ink(folder):
        import numpy as np

        return np.mean([np.asarray(Image.open(p)).mean() for p in sorted(folder.glob("*.png"))])

    assert ink(tmp_path / "bold") > 1.3 * ink(tmp_path / "plain")


def test_export_refuses_to_clobber_a_non_empty_folder(runner, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    result = runner.invoke(app, ["data", "digits", str(tmp_path), "--classes", "7"])
    assert result.exit_code == 3
    assert (tmp_path / "mine.txt").read_text() == "precious"


@pytest.mark.parametrize("args", [["--classes", "12"], ["--split", "dev"], ["--style", "wobbly"]])
def test_export_rejects_bad_options_with_exit_3_and_writes_nothing(runner, tmp_path, args):
    result = runner.invoke(app, ["data", "digits", str(tmp_path / "out"), *args])
    assert result.exit_code == 3, combined_output(result)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_scan_error_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        scan_folder(tmp_path)


# ------------------------------------------------------------------ hostile folders


def _hostile_check(runner, folder):
    result = _check(runner, folder)
    return result.exit_code, combined_output(result)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "sub/../../outside.png"])
def test_metadata_cannot_name_files_outside_the_folder(runner, tmp_path, name):
    _image(tmp_path / "outside.png")
    _image(tmp_path / "data" / "a.png")
    _metadata(tmp_path / "data", [{"file_name": name, "text": "x"}])
    code, output = _hostile_check(runner, tmp_path / "data")
    assert code == 3 and "not a path inside the data folder" in output


def test_links_out_of_the_folder_are_refused_for_images_and_captions(runner, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a system file's contents")
    data = tmp_path / "data"
    _image(data / "a.png")
    (data / "a.txt").symlink_to(secret)
    code, output = _hostile_check(runner, data)
    assert code == 3 and "leads outside the data folder" in output
    assert "system file" not in output
    (data / "a.txt").unlink()
    (data / "a.txt").write_text("fine")
    _image(tmp_path / "elsewhere.png")
    (data / "b.png").symlink_to(tmp_path / "elsewhere.png")
    (data / "b.txt").write_text("fine")
    code, output = _hostile_check(runner, data)
    assert code == 3 and "b.png leads outside the data folder" in output
    (data / "b.png").unlink()
    (data / "b.png").symlink_to(data / "a.png")  # a link inside the folder is fine
    code, output = _hostile_check(runner, data)
    assert code == 0, output


def test_a_fifo_caption_is_refused_not_opened(runner, tmp_path):
    import os

    _image(tmp_path / "a.png")
    os.mkfifo(tmp_path / "a.txt")  # opening it would block forever
    code, output = _hostile_check(runner, tmp_path)
    assert code == 3 and "not a regular file" in output


def test_a_decompression_bomb_is_refused(runner, tmp_path):
    Image.new("1", (30000, 30000)).save(tmp_path / "bomb.png")  # ~100 KB on disk
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000
    (tmp_path / "bomb.txt").write_text("caption")
    code, output = _hostile_check(runner, tmp_path)
    assert code == 3 and "bomb.png" in output and "too many pixels" in output


def test_metadata_that_is_not_utf8_is_named(runner, tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "\xff\xfe"}\n')
    code, output = _hostile_check(runner, tmp_path)
    assert code == 3 and "metadata.jsonl: not UTF-8" in output


def test_cmyk_jpegs_and_16_bit_pngs_are_converted_not_refused(runner, tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "red.jpg")  # red in CMYK
    (tmp_path / "red.txt").write_text("red")
    Image.new("I;16", (8, 8), 32768).save(tmp_path / "grey.png")  # mid-grey at 16 bits
    (tmp_path / "grey.txt").write_text("grey")
    code, output = _hostile_check(runner, tmp_path)
    assert code == 0, output
    dataset = ImageCaptionDataset(scan_folder(tmp_path), 8)
    pixels = dict(zip(dataset.captions, dataset.pixels, strict=True))
    assert pixels["red"][0].mean() > 0.9 and pixels["red"][1].mean() < -0.9
    assert abs(float(pixels["grey"].mean())) < 0.05  # 128/255 in [-1, 1], not clipped to white
