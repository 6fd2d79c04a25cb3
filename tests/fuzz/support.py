"""What every fuzz test shares: the property, its settings, and hostile JSON.

The property, for every parser an attacker can feed: any input ends normally or in a
GuardtuneError with a named exit code (3 data, 4 policy, 5 signature, 6 model, 7 integrity).
Any other exception is a bug (the CLI's exit 1), and so is a hang (the per-example deadline
and the per-test timeout).

`GUARDTUNE_FUZZ_EXAMPLES` sets how many inputs each test tries: 40 by default, so the suite stays
fast; a campaign is `GUARDTUNE_FUZZ_EXAMPLES=5000 pytest tests/fuzz`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from guardtune.errors import GuardtuneError
from tests.conftest import combined_output

PROFILE = "guardtune-fuzz"
EXAMPLES = int(os.environ.get("GUARDTUNE_FUZZ_EXAMPLES", "40"))
NAMED_EXIT_CODES = frozenset({3, 4, 5, 6, 7})
CLI_EXIT_CODES = NAMED_EXIT_CODES | {0}


settings.register_profile(
    PROFILE,
    max_examples=EXAMPLES,
    database=None,  # nothing written into the repository
    deadline=timedelta(seconds=5),  # one input this slow: a worse one hangs
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # tmp folders that each example rewrites
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
    print_blob=True,
)


def fuzz(**overrides: Any) -> settings:
    """The `guardtune-fuzz` profile, with per-test overrides."""
    return settings(settings.get_profile(PROFILE), **overrides)


def timeout(seconds_per_example: float) -> pytest.MarkDecorator:
    """A whole-test limit that grows with the example count: a hang fails, a campaign does not."""
    return pytest.mark.timeout(60 + math.ceil(EXAMPLES * seconds_per_example))


@contextmanager
def only_named_errors() -> Iterator[None]:
    """The property: the block returns, or raises a GuardtuneError with a named exit code.

    Any other exception propagates and fails the test with its own traceback."""
    try:
        yield
    except GuardtuneError as error:
        assert error.exit_code in NAMED_EXIT_CODES, (
            f"{type(error).__name__} has exit code {int(error.exit_code)}: {error}"
        )


def invoke(args: Sequence[object], **env: str) -> Result:
    """Run the CLI in-process; its exit code must be 0 or a named one, never 1."""
    from guardtune.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env or None)
    assert result.exit_code in CLI_EXIT_CODES, (
        f"exit {result.exit_code}: {combined_output(result)!r} {result.exception!r}"
    )
    return result


# ----------------------------------------------------------------------------- hostile JSON


@dataclass(frozen=True)
class Raw:
    """JSON text spliced in as it is: what json.dumps never writes."""

    text: str


HOSTILE_TOKENS = (
    "1" * 5000,  # more digits than Python converts to int by default
    "-" + "9" * 4400,
    "1e999",  # parses to inf
    "-1e999",
    "1e-999",
    "NaN",
    "Infinity",
    "-Infinity",
    "[" * 50_000 + "]" * 50_000,  # deeper than Python's recursion limit
    '{"a":' * 30_000 + "0" + "}" * 30_000,
    '"\\ud800"',  # a lone surrogate
    '"\\udcff\\u0000"',
    '{"k": 1, "k": 2}',  # a duplicate key
    "18446744073709551616",  # 2**64
    "-9223372036854775809",  # one below int64
    "9223372036854775807",
    "0.5",
    "-0",
    "true",
    "null",
)
EDGE_INTS = (0, 1, -1, 2, 255, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30)

# Any text, lone surrogates (JSON can spell them: "\ud800") and NUL made likely.
any_text = st.text(
    st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udcff", "\x00"]),
    max_size=12,
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(EDGE_INTS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)
hostile_scalars = json_scalars | st.sampled_from(HOSTILE_TOKENS).map(Raw)


def json_values(leaves: st.SearchStrategy[Any] = hostile_scalars) -> st.SearchStrategy[Any]:
    """Nested JSON values whose leaves may be hostile raw tokens."""
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
        ),
        max_leaves=10,
    )


def dumps(value: Any) -> str:
    """json.dumps that also writes `Raw` tokens (lone surrogates stay escaped: ASCII out)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def json_documents() -> st.SearchStrategy[bytes]:
    """Whole documents: hostile JSON, valid JSON of any shape, or no JSON at all."""
    return st.one_of(
        json_values().map(lambda v: dumps(v).encode()),
        st.binary(max_size=64),
        any_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
