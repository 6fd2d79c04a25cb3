"""Fuzzing LoRA key parsing (`is_lora_key`, `parse_lora_key`) and `audit` of LoRA files.

Inputs: keys built from the embedded UNet's real module names, spelled in every naming the
audit knows (diffusers/peft, kohya, original SD, the old attention-processor form) with every
adapter suffix, then mutated: characters inserted, removed or replaced, fragments repeated,
any text around them; and long keys, a fragment repeated up to 20,000 times (what makes a
backtracking regex slow).

Property: the parser answers quickly and never raises; what it answers is well-formed (a known
component and parameter, a module of the UNet or none), and an unmutated key maps to its module.
`guardtune audit` of a LoRA file holding such keys exits 0, 3 or 7, never 1.
"""

from __future__ import annotations

import json
import struct
import time

from hypothesis import given
from hypothesis import strategies as st

from guardtune.contract import LDM_UNET_PREFIX
from guardtune.enforce.keynames import (
    _ADAPTER,
    ModuleIndex,
    _adapter,
    diffusers_to_ldm_unet,
    is_lora_key,
    module_of,
    parse_lora_key,
)
from guardtune.resolve import EMBEDDED_DIR
from guardtune.tensorfile import read_header
from tests.fuzz.support import any_text, fuzz, invoke, timeout

UNET_NAMES = [
    r.name for r in read_header(EMBEDDED_DIR / "unet" / "diffusion_pytorch_model.safetensors")
]
INDEX = ModuleIndex.for_unet(UNET_NAMES)
MODULES = sorted({module_of(n) for n in UNET_NAMES})
LDM_MODULES = {module_of(d): module_of(o) for d, o in diffusers_to_ldm_unet(UNET_NAMES).items()}
SUFFIXES = [
    ".lora_A.weight", ".lora_B.default.weight", ".lora.down.weight", ".lora_linear_layer.up.weight",
    ".lora_down.weight", ".alpha", ".dora_scale", ".hada_w1_a", ".lokr_w1", ".diff", ".diff_b",
    ".lora_magnitude_vector", ".lora_A.bias",
]  # fmt: skip
FRAGMENTS = [".alpha", ".lora_A", ".diff", "_", ".", "..", "lora_unet_", ".processor", "0"]


@st.composite
def spelled_keys(draw) -> tuple[str, str | None]:
    """A real module's LoRA key, and the module it must map to (None: do not check)."""
    module = draw(st.sampled_from(MODULES))
    suffix = draw(st.sampled_from(SUFFIXES))
    form = draw(st.sampled_from(["unet", "peft", "ldm", "kohya", "processor", "bare"]))
    if form == "ldm" and module in LDM_MODULES:
        return f"{LDM_UNET_PREFIX}{LDM_MODULES[module]}{suffix}", module
    if form == "kohya":
        return f"lora_unet_{module.replace('.', '_')}{suffix}", None  # may be ambiguous
    if form == "processor":
        return f"unet.{module}.processor.to_q_lora.down.weight", None
    prefix = {"unet": "unet.", "peft": "base_model.model."}.get(form, "")
    return f"{prefix}{module}{suffix}", module


@st.composite
def mutated(draw, key: str) -> str:
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(key)))
        how = draw(st.sampled_from(["insert", "delete", "replace", "repeat", "wrap"]))
        if how == "insert":
            key = key[:i] + draw(any_text) + key[i:]
        elif how == "delete":
            key = key[:i] + key[i + draw(st.integers(1, 8)) :]
        elif how == "replace":
            key = key[:i] + draw(any_text) + key[i + 1 :]
        elif how == "repeat":
            fragment = draw(st.sampled_from(FRAGMENTS)) * draw(st.integers(0, 100))
            key = key[:i] + fragment + key[i:]
        else:
            key = draw(any_text) + key + draw(any_text)
    return key


@st.composite
def long_keys(draw) -> str:
    """A fragment repeated thousands of times around a real key: a slow regex shows here."""
    fragment = draw(st.sampled_from(FRAGMENTS)) * draw(st.integers(1_000, 20_000))
    end = draw(st.sampled_from(["", ".", "x", ".."]))
    key = draw(spelled_keys())[0]
    return draw(st.sampled_from([fragment + end + key, key + fragment + end]))


fuzzed_keys = spelled_keys().flatmap(lambda case: mutated(case[0])) | long_keys() | any_text


def _check_parse(key: str, module: str | None = None) -> None:
    start = time.perf_counter()
    assert is_lora_key(key) in (True, False)
    parsed = parse_lora_key(key, INDEX)
    assert time.perf_counter() - start < 1.0, f"{len(key)}-character key took too long"
    assert parsed.key == key
    assert parsed.component in ("unet", "text_encoder", "unknown")
    assert parsed.parameter in ("weight", "bias")
    assert parsed.module is None or parsed.module in INDEX.dotted.values()
    if module is not None:
        assert parsed.module == module and is_lora_key(key)


@timeout(0.5)
@fuzz()
@given(case=spelled_keys())
def test_real_lora_keys_map_to_their_module(case):
    _check_parse(*case)


@timeout(0.5)
@fuzz()
@given(key=fuzzed_keys)
def test_mutated_lora_keys_parse_quickly_into_a_well_formed_answer(key):
    _check_parse(key)


def _lora_file(keys: list[str]) -> bytes:
    header = {key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for key in keys}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


@timeout(1.0)
@fuzz(deadline=None)
@given(keys=st.lists(fuzzed_keys, min_size=1, max_size=4))
def test_audit_of_a_fuzzed_lora_file_exits_with_a_named_code(signed_setup, tmp_path, keys):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(_lora_file(keys))
    args = ["audit", path, "--base", signed_setup["model"], "--trusted", signed_setup["pub"]]
    invoke(args, **signed_setup["env"])


def test_a_long_key_of_repeated_adapter_names_parses_in_linear_time():
    # Found by the fuzzer: `_ADAPTER.search` backtracked over every `.alpha` to the final dot,
    # quadratic in the key's length (15 s for 96 KB; a safetensors header may hold 100 MB).
    key = ".alpha" * 20_000 + "."
    start = time.perf_counter()
    assert parse_lora_key(key, INDEX).component == "unknown"
    assert time.perf_counter() - start < 0.5


@timeout(0.2)
@fuzz()
@given(parts=st.lists(st.sampled_from([".", "\n", "x", *FRAGMENTS, *SUFFIXES]), max_size=12))
def test_the_linear_adapter_search_agrees_with_the_plain_regex(parts):
    key = "".join(parts)
    linear, plain = _adapter(key), _ADAPTER.search(key)
    assert (linear and (linear.start(), linear.groups())) == (
        plain and (plain.start(), plain.groups())
    )
