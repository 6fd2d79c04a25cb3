"""`--config FILE` of finetune, publish and evaluate, the run.toml each run keeps, and the old
option names that now stop with their new ones."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guardtune.cli import app
from guardtune.digits.dataset import export_digits
from guardtune.errors import UsageError
from guardtune.runconfig import dumps, loads
from guardtune.trust.signing import create_keypair
from tests.conftest import combined_output

UNET = Path("model") / "unet" / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("runconfig-data")
    folders = {
        "illegal": export_digits(root / "sevens", (7,), "test").out,
        "legal": export_digits(root / "bold", (1,), "test", "bold").out,
    }
    for folder in folders.values():  # 6 images each: what the tiny runs need, encoded quicker
        metadata = folder / "metadata.jsonl"
        lines = metadata.read_text().splitlines()
        for line in lines[6:]:
            (folder / json.loads(line)["file_name"]).unlink()
        metadata.write_text("\n".join(lines[:6]) + "\n")
    return folders


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in the files, and runs/, land here


def _ok(runner, *args) -> dict:
    """Run a command that must succeed and return its --json result."""
    out = Path(f"result-{len(list(Path().glob('result-*.json')))}.json")
    result = runner.invoke(app, [*map(str, args), "--json", str(out)])
    assert result.exit_code == 0, combined_output(result)
    return json.loads(out.read_text())


def _error(runner, *args) -> tuple[int, str]:
    result = runner.invoke(app, list(map(str, args)))
    return result.exit_code, combined_output(result).strip()


def test_written_values_read_back_as_they_were():
    values = {
        "data": Path("data/my 7s"),
        "prompt": 'a "quoted" back\\slash, tab\t, newline\n, bell\x07, del\x7f and é',
        "steps": 200,
        "lr": 1e-5,
        "ratio": 0.3,
        "negative": -2.5e300,
        "lora": True,
        "compare": False,
        "illegal": (Path("data/7"), Path("data/9")),
        "trusted": [],
        "unset": None,
    }
    text = dumps(values, header="first line\nsecond line")
    assert text.startswith("# first line\n# second line\n")
    read = loads(text)
    expected = {k: v for k, v in values.items() if v is not None}
    expected |= {"data": "data/my 7s", "illegal": ["data/7", "data/9"]}
    assert read == expected and list(read) == list(expected)  # the order is kept too
    assert math.isinf(loads(dumps({"x": math.inf}))["x"])


def test_finetune_from_a_file_equals_the_run_from_flags_and_run_toml_repeats_it(runner, folders):
    data = folders["illegal"]
    flags = ["--max-train-steps", 2, "--batch-size", 2, "--lr", "1e-3", "--seed", 5, "--no-compare"]
    by_flags = _ok(runner, "finetune", data, "--out", "a", *flags)
    # The file sets every option; the command line overrides one (7 steps would differ).
    Path("b.toml").write_text(
        f'data = "{data}"\nout = "b"\nsteps = 7\nbatch-size = 2\nlr = 1e-3\nseed = 5\n'
        "compare = false\n"
    )
    by_file = _ok(runner, "finetune", "--config", "b.toml", "--steps", 2)
    # run.toml alone (the output folder aside: "a" holds a finished run) repeats the run.
    repeated = _ok(runner, "finetune", "--config", Path("a") / "run.toml", "--out", "c")
    weights = {run: load_file(str(Path(run) / UNET)) for run in ("a", "b", "c")}
    assert by_flags["losses"] == by_file["losses"] == repeated["losses"]
    for name, tensor in weights["a"].items():
        assert torch.equal(tensor, weights["b"][name]) and torch.equal(tensor, weights["c"][name])
    kept = loads(Path("a/run.toml").read_text())
    assert kept["data"] == str(data) and kept["out"] == "a"  # paths as they were typed
    assert (kept["steps"], kept["batch-size"], kept["lr"], kept["seed"]) == (2, 2, 1e-3, 5)
    assert kept["compare"] is False and kept["model"] == "digits"
    assert not {"json", "resume", "report", "config"} & set(kept)  # not what the run is
    assert loads(Path("b/run.toml").read_text())["steps"] == 2  # the command line won
    assert loads(Path("c/run.toml").read_text()) == kept | {"out": "c"}


def test_a_data_folder_on_the_command_line_wins_over_the_files(runner, folders):
    Path("run.toml").write_text(f'data = "{folders["illegal"]}"\n')
    code, message = _error(runner, "finetune", "elsewhere", "--config", "run.toml")
    assert (code, message) == (3, "error: data folder elsewhere does not exist")


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        ("bogus = 1\n", 2, "guardtune finetune has no option 'bogus'"),
        ('batch-size = "8"\n', 2, "'batch-size' must be an integer, not a string"),
        ("lora = 1\n", 2, "'lora' must be a boolean, not an integer"),
        ('lr = "1e-3"\n', 2, "'lr' must be a number, not a string"),
        ('trusted = "k.pub"\n', 2, "'trusted' must be an array, not a string"),
        ("batch-size = 0\n", 2, "'batch-size': Input should be greater than or equal to 1"),
        ("batch_size = 2\n", 2, "write 'batch_size' as 'batch-size'"),
        ("max-train-steps = 2\n", 2, "write 'max-train-steps' as 'steps'"),
        ("no-compare = true\n", 2, "write 'no-compare' as 'compare'"),
        ('config = "other.toml"\n', 2, "'config' cannot be set in a config file"),
        ("[finetune]\nsteps = 2\n", 2, "guardtune finetune has no option 'finetune'"),
    ],
)
def test_what_a_file_gets_wrong_is_a_usage_error_naming_the_file_and_key(
    runner, text, code, message
):
    Path("run.toml").write_text(text)
    assert _error(runner, "finetune", "--config", "run.toml") == (
        code,
        f"error: config file run.toml: {message}",
    )


def test_an_unreadable_or_malformed_file_and_old_keys(runner):
    assert _error(runner, "finetune", "--config", "none.toml") == (
        3,
        "error: config file none.toml does not exist",
    )
    Path("bad.toml").write_text("steps = \n")
    assert _error(runner, "finetune", "--config", "bad.toml") == (
        2,
        "error: config file bad.toml is not valid TOML: Invalid value (at line 1, column 9)",
    )
    Path("old.toml").write_text("steps = 3\n")
    moved = "error: config file old.toml: 'steps' is now 'mask-updates'"
    assert _error(runner, "publish", "--config", "old.toml") == (
        2,
        f"{moved} (see guardtune publish --help)",
    )
    with pytest.raises(UsageError, match=re.escape("<text> is not valid TOML")):
        loads("= 1")


@pytest.mark.parametrize(
    ("command", "new"),
    [("publish", "--mask-updates"), ("evaluate", "--user-steps"),
     ("generate", "--num-inference-steps")],
)  # fmt: skip
def test_an_old_steps_option_stops_with_its_new_name(runner, command, new):
    expected = f"error: --steps is now {new} (--steps means a fine-tune's optimizer steps)"
    assert _error(runner, command, "--steps", "3") == (2, expected)
    assert _error(runner, command, "--steps=3") == (2, expected)


def test_publish_reads_a_file_and_keeps_its_settings(runner, folders):
    keys = create_keypair(Path("publisher"))
    Path("publish.toml").write_text(
        f'illegal = ["{folders["illegal"]}"]\nlegal = ["{folders["legal"]}"]\n'
        f'key = ["{keys.private_key}"]\nmethod = "random"\nratio = 0.2\nshare-by = "tensors"\n'
        'out = "policy.json"\nwork-dir = "work"\n'
    )
    first = _ok(runner, "publish", "--config", "publish.toml", "--ratio", "0.5")
    assert 0.5 <= first["frozen_share_tensors"] < 0.51  # the command line's ratio
    kept = loads(Path("work/run.toml").read_text())
    assert kept["ratio"] == 0.5 and kept["method"] == "random" and kept["key"] == ["publisher.key"]
    again = _ok(runner, "publish", "--config", "work/run.toml", "--out", "again.json")
    frozen = [json.loads(Path(r["log"]).read_text())["frozen"] for r in (first, again)]
    assert frozen[0] == frozen[1]


def test_evaluate_reads_a_file_and_its_run_toml_repeats_the_evaluation(runner, folders):
    Path("evaluate.toml").write_text(
        f'illegal = ["{folders["illegal"]}"]\nlegal = ["{folders["legal"]}"]\n'
        'methods = "full"\nuser-steps = "1"\nseeds = 3\nsamples = 1\nbatch-size = 2\n'
        'scorer = "loss"\nwork-dir = "work"\nplot = "work/plot.png"\n'
    )
    first = _ok(runner, "evaluate", "--config", "evaluate.toml", "--seeds", 1)
    assert first["seeds"] == 1 and first["steps"] == [1] and first["reused"] == 0
    kept = loads(Path("work/run.toml").read_text())
    assert (kept["seeds"], kept["user-steps"], kept["methods"]) == (1, "1", "full")
    again = _ok(runner, "evaluate", "--config", "work/run.toml")
    assert again["reused"] == 2 and again["measurements"] == first["measurements"]
