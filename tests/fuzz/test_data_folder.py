"""Fuzzing the data-folder readers: `metadata.jsonl`, caption files and kohya folder names.

Inputs: a data folder beside a secret file it must never read, holding an image, links that
lead out of it, and a `metadata.jsonl` of fuzzed lines: records whose `file_name` is `..`, an
absolute path to the secret, a link, a NUL byte, a very long name or not a string, captions of
any type, lines of hostile JSON or of bytes that are not UTF-8. Also caption files of random
bytes, and kohya class folders whose repeat count is huge.

Property: `check_folder` returns a summary or raises DataError (exit 3); it never opens a file
outside the folder (every `open` is watched) and no caption holds the secret. `guardtune data
check` exits 0 or 3, never 1, and never prints the secret.
"""

from __future__ import annotations

import builtins
import io
import json
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from guardtune.data import MAX_REPEATS, check_folder
from guardtune.errors import DataError
from tests.fuzz.support import (
    HOSTILE_TOKENS,
    any_text,
    dumps,
    fuzz,
    invoke,
    json_values,
    only_named_errors,
    timeout,
)

SECRET = "SECRET-CAPTION-OUTSIDE-THE-FOLDER"
SECRET_PATH = "{secret}"  # replaced by the secret file's absolute path

tricky_names = st.sampled_from(
    [
        "a.png", "./a.png", "sub/../a.png", "../secret.png", "../secret.txt", SECRET_PATH,
        "link.png", "linkdir/secret.png", "a.png\x00.txt", "", ".", "/", "..", "a.png/",
        "x" * 300, "~/secret.png", "%2e%2e/secret.png", "A.PNG", "a.png ", "metadata.jsonl",
    ]
)  # fmt: skip
# Weighted towards records that pass the earlier checks, so that the later ones are reached.
file_names = st.one_of(tricky_names, tricky_names, tricky_names, any_text, json_values())
captions = st.one_of(st.just("a caption"), st.just("a caption"), any_text, json_values())


@st.composite
def records(draw) -> str:
    record = {}
    if draw(st.integers(0, 5)):
        record["file_name"] = draw(file_names)
    if draw(st.integers(0, 3)):
        record["text"] = draw(captions)
    record.update(draw(st.dictionaries(any_text, json_values(), max_size=2)))
    return dumps(record)


lines = st.one_of(
    records(),
    records(),
    records(),
    records(),
    st.sampled_from(HOSTILE_TOKENS),
    json_values().map(dumps),
    any_text,
)


@st.composite
def metadata_files(draw) -> bytes:
    text = draw(st.sampled_from(["\n", "\r\n", "\u2028", "\x1c"])).join(draw(st.lists(lines)))
    data = text.encode("utf-8", "surrogatepass")
    return draw(st.just(data) | st.binary(max_size=8).map(lambda junk: data + junk))


def _image(path: Path) -> None:
    Image.new("RGB", (4, 4), (200, 10, 10)).save(path)


def _sandbox(parent: Path) -> tuple[Path, Path]:
    """A fresh `data/` folder beside a secret caption and image, with links leading to them."""
    root = Path(tempfile.mkdtemp(dir=parent))
    (root / "secret.txt").write_text(SECRET)
    _image(root / "secret.png")
    data = root / "data"
    data.mkdir()
    _image(data / "a.png")
    (data / "link.png").symlink_to(root / "secret.png")
    (data / "link.txt").symlink_to(root / "secret.txt")
    (data / "linkdir").symlink_to(root)
    return root, data


def _check_stays_inside(data: Path, **options) -> None:
    """check_folder's property, with every file it opens watched."""
    opened: list[Path] = []
    real_open = io.open

    def watched_open(file, *args, **kwargs):
        if isinstance(file, str | Path):
            opened.append(Path(file))
        return real_open(file, *args, **kwargs)

    with (
        mock.patch.object(builtins, "open", watched_open),
        mock.patch.object(io, "open", watched_open),
        only_named_errors(),
    ):
        report = check_folder(data, **options)
        assert all(SECRET not in caption for caption in report.captions)
        assert report.examples >= report.unique_images >= 1
    inside = data.resolve()
    outside = [p for p in opened if inside not in p.resolve().parents]
    assert not outside, f"opened outside the data folder: {outside}"


@timeout(0.5)
@fuzz()
@given(metadata=metadata_files(), column=st.sampled_from(["text", "file_name", "nope"]))
def test_metadata_jsonl_never_leads_outside_the_folder(tmp_path, metadata, column):
    root, data = _sandbox(tmp_path)
    metadata = metadata.replace(SECRET_PATH.encode(), str(root / "secret.png").encode())
    (data / "metadata.jsonl").write_bytes(metadata)
    _check_stays_inside(data, caption_column=column)


@timeout(0.5)
@fuzz()
@given(name=file_names)
def test_file_name_of_a_captioned_record_never_leads_outside_the_folder(tmp_path, name):
    root, data = _sandbox(tmp_path)
    line = dumps({"file_name": name, "text": "a caption"}).replace(
        SECRET_PATH, str(root / "secret.png")
    )
    (data / "metadata.jsonl").write_text(line + "\n", encoding="utf-8", errors="surrogatepass")
    _check_stays_inside(data)


@timeout(0.5)
@fuzz()
@given(caption=st.binary(max_size=64) | any_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_caption_files_of_any_bytes(tmp_path, caption):
    _, data = _sandbox(tmp_path)
    for link in ("link.png", "link.txt", "linkdir"):
        (data / link).unlink()
    (data / "a.txt").write_bytes(caption)
    _check_stays_inside(data)


@timeout(0.5)
@fuzz()
@given(
    repeats=st.sampled_from(["0", "1", "3", "٣", "00", "10000", "10001", "10" * 7, "9" * 40]),
    name=st.text(
        st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)),
        min_size=1,
        max_size=12,
    ),
    caption=st.none() | st.binary(max_size=16),
)
def test_kohya_folders_of_any_name_and_repeat_count(tmp_path, repeats, name, caption):
    _, data = _sandbox(tmp_path)
    for link in ("link.png", "link.txt", "linkdir"):
        (data / link).unlink()
    folder = data / f"{repeats}_{name}"
    folder.mkdir(exist_ok=True)
    _image(folder / "b.png")
    if caption is not None:
        (folder / "b.txt").write_bytes(caption)
    _check_stays_inside(data)


@timeout(1.0)
@fuzz(deadline=None)
@given(metadata=metadata_files())
def test_data_check_exits_0_or_3_and_never_prints_the_secret(tmp_path, metadata):
    root, data = _sandbox(tmp_path)
    metadata = metadata.replace(SECRET_PATH.encode(), str(root / "secret.png").encode())
    (data / "metadata.jsonl").write_bytes(metadata)
    result = invoke(["data", "check", data, "--json", root / "report.json"])
    assert result.exit_code in (0, 3)
    assert SECRET not in result.output
    if result.exit_code == 0:
        assert SECRET not in (root / "report.json").read_text()


# ----------------------------------------------------------------------------- regressions
# Minimal inputs the fuzzer found; each escaped as a bare Python exception (exit 1).


def test_metadata_integer_too_long_to_convert_is_a_data_error(tmp_path):
    _, data = _sandbox(tmp_path)
    (data / "metadata.jsonl").write_text("1" * 5000 + "\n")  # ValueError: 4300 digits at most
    with pytest.raises(DataError, match=r"metadata\.jsonl:1: not valid JSON"):
        check_folder(data)


def test_file_name_too_long_to_look_up_is_a_data_error(tmp_path):
    _, data = _sandbox(tmp_path)
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "x" * 300, "text": "c"}))
    with pytest.raises(DataError, match=r"does not exist"):  # OSError: File name too long
        check_folder(data)


@pytest.mark.parametrize("repeats", ["10001", "10" * 7, "9" * 40])  # MemoryError, OverflowError
def test_kohya_repeat_count_is_bounded(tmp_path, repeats):
    folder = tmp_path / f"{repeats}_dog"
    folder.mkdir()
    _image(folder / "b.png")
    with pytest.raises(DataError, match=rf"repeats must be between 1 and {MAX_REPEATS}"):
        check_folder(tmp_path)


def test_lone_surrogate_in_a_caption_is_a_data_error(tmp_path):
    # The caption parsed, then `data check` failed to print it: UnicodeEncodeError (exit 1).
    _, data = _sandbox(tmp_path)
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a \\ud9c5 cat"}\n')
    with pytest.raises(DataError, match=r"lone surrogate"):
        check_folder(data)
