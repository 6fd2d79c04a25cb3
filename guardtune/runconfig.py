"""Run configuration files: `--config FILE` of `finetune`, `publish` and `evaluate`, and the
`run.toml` each of them writes into its run folder so that a run can be repeated exactly.

Used by the CLI alone: `guardtune.cli` reads a file here into the command's Click
`default_map` (so the command line overrides the file and the options' own defaults apply
beneath both), and renders a finished parse back to TOML here; the recipes only receive that
text and write it. It imports nothing of guardtune's but the errors and, to read a file, the
contract. It knows Click parameters, not commands: an option added to a command later is read
and written with no code here.

The format is flat TOML, one key per option: the option's long name as `--help` spells it,
without the dashes (`batch-size = 8`, `lora = true`, `illegal = ["data/7", "data/9"]`), and a
positional argument under its own name (`data = "data/"`). Only that spelling is read: an alias,
a `no-` form or an underscore spelling is refused with the one to write. A value has the TOML
type of the option (an integer for a count, a number for a float, a boolean for a flag, a string
for a path or a choice, an array for a repeatable option) and then passes the option's own
conversion and checks. Paths are kept as written: relative to the working directory, exactly as
on the command line, so a `run.toml` repeats its run from the folder the run was started in.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Collection, Mapping
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from guardtune.errors import DataError, UsageError

if TYPE_CHECKING:
    import typer

# What TOML can hold bare as a key; every option name is one.
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# TOML basic strings escape these by name, other control characters as \uXXXX.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}  # fmt: skip


def key_of(param: Any) -> str:
    """The file's key of a Click parameter: its first long option without `--`, or the name of
    a positional argument with dashes for underscores."""
    longs = [opt for opt in param.opts if opt.startswith("--")]
    return longs[0][2:] if longs else param.name.replace("_", "-")


def _kind(value: Any) -> str:
    """A TOML (or converted) value's type in the words of a message."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str | PurePath):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"  # the only other TOML values


def _same_kind(raw: Any, converted: Any) -> bool:
    """Whether a TOML value already had the type its option converted it to: Click converts
    leniently ("8" -> 8, 1 -> True), a file should say what it means."""
    if isinstance(converted, list | tuple):
        return isinstance(raw, list)  # its items are compared one by one
    if isinstance(converted, bool):
        return isinstance(raw, bool)
    if isinstance(converted, int):
        return isinstance(raw, int) and not isinstance(raw, bool)
    if isinstance(converted, float):  # an integer is a fine number
        return isinstance(raw, int | float) and not isinstance(raw, bool)
    if isinstance(converted, str | PurePath):
        return isinstance(raw, str)
    return True  # a type no option has yet: its own conversion decides


def _parse_toml(data: bytes, path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 reads TOML with tomli, tomllib's original
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            message = f"--config needs Python 3.11 or the tomli package to read {path}"
            raise UsageError(message) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"config file {path} is not valid TOML: {error}") from None


def read_config(
    path: Path,
    ctx: typer.Context,
    refused: Collection[str] = (),
    renamed: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The options a config file sets for the command of `ctx`, as its `default_map` wants
    them: by parameter name, the file's values checked but not converted (Click converts
    whatever reaches a parameter, from the command line or from here).

    `refused` are parameter names a file may not set (`--config` itself); `renamed` maps keys
    that an option used to have to its key now. A file that cannot be read is DataError
    (exit 3); anything wrong inside it is UsageError (exit 2), naming the file and the key.
    """
    import typer

    from guardtune.contract import read_small_file

    try:
        data = read_small_file(path, "config file")
    except FileNotFoundError:
        raise DataError(f"config file {path} does not exist") from None
    table = _parse_toml(data, path)
    params = {key_of(p): p for p in ctx.command.params if p.expose_value}
    settable = {key: p for key, p in params.items() if p.name not in refused}
    # Other spellings of a settable option, each pointing at the one key a file uses.
    spellings = {}
    for key, p in settable.items():
        for opt in [f"--{key.replace('-', '_')}", *p.opts, *getattr(p, "secondary_opts", [])]:
            if opt.startswith("--") and opt[2:] != key:
                spellings[opt[2:]] = key
    command = ctx.info_name
    defaults: dict[str, Any] = {}
    for key, value in table.items():
        where = f"config file {path}: {key!r}"
        if renamed and key in renamed:
            hint = f"see guardtune {command} --help"
            raise UsageError(f"{where} is now {renamed[key]!r}", hint=hint)
        if key in spellings:
            raise UsageError(f"config file {path}: write {key!r} as {spellings[key]!r}")
        if key in params and key not in settable:
            raise UsageError(f"{where} cannot be set in a config file")
        if key not in settable:
            raise UsageError(f"config file {path}: guardtune {command} has no option {key!r}")
        param = settable[key]
        if (param.multiple or param.nargs == -1) and not isinstance(value, list):
            raise UsageError(f"{where} must be an array, not {_kind(value)}")
        try:
            converted = param.process_value(ctx, value)
        except typer.BadParameter as error:  # the option's own message, without its flag
            raise UsageError(f"{where}: {error.message}") from None
        if isinstance(converted, list | tuple) and isinstance(value, list):
            items = enumerate(zip(value, converted, strict=True), start=1)
            pairs = [(f"{where} item {i}", raw, wanted) for i, (raw, wanted) in items]
        else:
            pairs = [(where, value, converted)]
        for what, raw, wanted in pairs:
            if not _same_kind(raw, wanted):
                raise UsageError(f"{what} must be {_kind(wanted)}, not {_kind(raw)}")
        defaults[param.name] = value
    return defaults


def effective_config(ctx: typer.Context, left_out: Collection[str] = ()) -> dict[str, Any]:
    """Every parameter's value of a parsed command (command line, config file and defaults
    merged), by the file's key, in the command's order; `left_out` are parameter names."""
    return {
        key_of(p): ctx.params[p.name]
        for p in ctx.command.params
        if p.expose_value and p.name not in left_out and p.name in ctx.params
    }


def _string(text: str, key: str) -> str:
    out = []
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:  # a file name that is not UTF-8 (surrogate-escaped)
            raise DataError(f"{key} = {text!r} cannot be written to a TOML file (not UTF-8)")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 1e-05, 0.3, inf and nan are TOML floats as Python writes them
    if isinstance(value, str | PurePath):
        return _string(str(value), key)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item, key) for item in value) + "]"
    raise TypeError(f"{key}: cannot write {type(value).__name__} {value!r} as TOML")


def dumps(values: Mapping[str, Any], header: str = "") -> str:
    """`values` as a flat TOML document, in their order, each line of `header` as a comment
    above them. None means an option left unset, so it is left out: reading the file back
    gives the same values, None ones absent."""
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for key, value in values.items():
        if value is None:
            continue
        name = key if _BARE_KEY.match(key) else _string(key, key)
        lines.append(f"{name} = {_value(value, key)}")
    return "\n".join(lines) + "\n"


def loads(text: str, path: Path = Path("<text>")) -> dict[str, Any]:
    """A flat TOML document's values (what `dumps` wrote), UsageError if it is not TOML."""
    return _parse_toml(text.encode("utf-8"), path)
