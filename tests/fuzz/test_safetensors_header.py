"""Fuzzing the safetensors header reader (`tensorfile.read_header_and_metadata`).

Inputs: an 8-byte little-endian length and a JSON header built entry by entry (valid and invalid
dtypes, shapes with negative or huge dimensions, data offsets consistent, reversed, overlapping
or out of range, `__metadata__` of every type, hostile JSON tokens), a declared length that may
not fit, header bytes that may be flipped or not UTF-8, and files cut short or padded.

Property: a DataError (exit 3) or records that each point inside the file, with a known dtype,
non-negative dimensions and exactly the bytes their shape needs; each record then loads as a
tensor of its shape (or a DataError). Never another exception, never a read past the file.
"""

from __future__ import annotations

import json
import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardtune.errors import DataError
from guardtune.tensorfile import load_record, read_header, read_header_and_metadata
from tests.fuzz.support import (
    EDGE_INTS,
    HOSTILE_TOKENS,
    Raw,
    dumps,
    fuzz,
    hostile_scalars,
    json_values,
    only_named_errors,
    timeout,
)

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
ITEM_BYTES |= {"U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
DTYPES = [*ITEM_BYTES, "F4", "f32", "", "I128", "__metadata__"]

dims = st.integers(0, 4) | st.sampled_from([*EDGE_INTS, -2, -(2**70), 2**70]) | hostile_scalars
tensor_names = st.sampled_from(["__metadata__", "unet.conv_in.weight", ""]) | st.text(max_size=16)


def _offset_mutations(start: int, end: int) -> st.SearchStrategy:
    return st.one_of(
        st.just([start, end]),
        st.just([end, start]),  # reversed
        st.just([0, end - start]),  # overlapping the first tensor
        st.sampled_from(EDGE_INTS).map(lambda n: [start, end + n]),  # past the end
        st.sampled_from(EDGE_INTS).map(lambda n: [start - n, end - n]),  # before the start
        st.lists(hostile_scalars, max_size=3),
        hostile_scalars,
    )


@st.composite
def headers(draw) -> tuple[dict, int]:
    """A header dict (values may be `Raw` tokens) and how many data bytes it claims."""
    header, offset = {}, 0
    for name in draw(st.lists(tensor_names, max_size=5)):
        if draw(st.booleans()):
            header[name] = draw(json_values())  # anything at all
            continue
        dtype = draw(st.sampled_from(DTYPES) | hostile_scalars)
        shape = draw(st.lists(dims, max_size=4) | hostile_scalars)
        valid_dims = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        size = math.prod(shape) * ITEM_BYTES.get(dtype, 0) if valid_dims else 0  # type: ignore
        size = size if 0 <= size <= 4096 else 0
        offsets = draw(_offset_mutations(offset, offset + size))
        offset += size
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    if draw(st.booleans()):
        strings = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
        header["__metadata__"] = draw(strings | json_values())
    return header, offset


@st.composite
def safetensors_files(draw) -> bytes:
    header, data_size = draw(headers())
    text = dumps(header).encode()
    text = draw(
        st.one_of(
            st.just(text),
            st.just(text + b" " * draw(st.integers(0, 8))),  # padding, as safetensors writes
            st.binary(max_size=64),  # not JSON
            st.sampled_from(HOSTILE_TOKENS).map(str.encode),
            st.just(text.replace(b'"', b"\xff", 1)),  # not UTF-8
            st.integers(0, max(0, len(text) - 1)).map(lambda i: text[:i]),  # cut short
        )
    )
    length = draw(
        st.just(len(text))
        | st.sampled_from([0, len(text) + 1, max(0, len(text) - 1), 2**64 - 1, 100 * 2**20 + 1])
        | st.integers(0, 2**64 - 1)
    )
    data = b"\x01" * data_size
    data = draw(st.just(data) | st.integers(0, data_size + 16).map(lambda n: b"\x02" * n))
    whole = struct.pack("<Q", length) + text + data
    return draw(st.just(whole) | st.binary(max_size=16))  # sometimes shorter than 8 bytes


def _check_records_fit(path, records, metadata) -> None:
    size = path.stat().st_size
    (declared,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert all(isinstance(value, str) for value in metadata.values())
    for record in records:
        record.name.encode("utf-8")  # printable: no lone surrogate
        assert record.dtype in ITEM_BYTES, record
        assert all(d >= 0 for d in record.shape), record
        assert 8 + declared <= record.start <= record.end <= size, record
        assert record.end - record.start == record.numel * ITEM_BYTES[record.dtype], record
        with only_named_errors():
            tensor = load_record(record)
            assert tuple(tensor.shape) == record.shape


@timeout(0.2)
@fuzz()
@given(data=safetensors_files())
def test_header_reader_refuses_or_returns_records_inside_the_file(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    with only_named_errors():
        records, metadata = read_header_and_metadata(path)
        _check_records_fit(path, records, metadata)
    with only_named_errors():
        read_header(path)


# ----------------------------------------------------------------------------- regressions
# Minimal inputs the fuzzer found: each escaped as a bare Python exception (exit 1).


def _file(tmp_path, header: str | dict, data: bytes = b"\0" * 8):
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _entry(shape, offsets) -> dict:
    return {"t": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}


@pytest.mark.parametrize(
    "header",
    [
        "[" * 100_000 + "]" * 100_000,  # RecursionError
        '{"t": ' + "1" * 5000 + "}",  # ValueError: more than 4300 digits
        dumps(_entry([Raw("1e999")], [0, 0])),  # OverflowError: int(inf)
        _entry([-1, -1], [0, 4]),  # negative dimensions, loaded as a RuntimeError
        _entry([-1], [4, 0]),  # reversed offsets: a record of negative length
        _entry([0, 2**70], [0, 0]),  # a dimension torch cannot hold: TypeError on load
        _entry([2**62, 4, 0], [0, 0]),  # no bytes, but torch's size computation overflows
        '{"\\ud87e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',  # printing failed
    ],
    ids=[
        "deep",
        "long-int",
        "inf-dim",
        "negative-dims",
        "reversed",
        "huge-dim",
        "overflow",
        "surrogate",
    ],
)
def test_corrupt_headers_are_data_errors(tmp_path, header):
    with pytest.raises(DataError, match=r"bad\.safetensors"):
        read_header(_file(tmp_path, header))
