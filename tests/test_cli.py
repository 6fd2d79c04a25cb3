import json

from guardtune.cli import app
from tests.conftest import combined_output


def test_help_lists_the_commands(runner):
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "data", "demo"):
        assert command in result.stdout


def test_usage_error_is_exit_2(runner):
    assert (
        runner.invoke(app, ["generate", "--num", "0", "--prompt", "x", "--out", "a.png"]).exit_code
        == 2
    )
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


def test_bad_model_is_one_red_line_with_exit_3(runner, tmp_path):
    args = ["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", "g.png"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3
    lines = [line for line in combined_output(result).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "Traceback" not in combined_output(result)


def test_debug_shows_the_traceback(runner, tmp_path):
    args = ["--debug", "data", "check", str(tmp_path / "none")]
    result = runner.invoke(app, args)
    assert result.exit_code == 3
    assert "Traceback" in combined_output(result)


def test_demo_draws_base_digits_and_not_unseen_ones(runner, tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--out", str(out), "--samples", "8", "--json", str(out / "r.json")]
    )
    assert result.exit_code == 0, combined_output(result)
    report = json.loads((out / "r.json").read_text())
    rows = {row["digit"]: row for row in report["rows"]}
    base = [rows[d]["recognised"] for d in range(7)]
    unseen = [rows[d]["recognised"] for d in (7, 8, 9)]
    assert sum(base) / 7 > 0.8
    assert max(unseen) < 0.5
    assert (out / "samples.png").is_file()
    assert (out / "data" / "digits-7-9" / "metadata.jsonl").is_file()
    # The fine-tune ran under the embedded model's own signed policy, with the savings probe.
    tuned = report["finetune"]
    assert tuned["policy"].endswith("guardtune-policy.json") and tuned["signer_keyid"]
    assert tuned["freeze"]["frozen_tensors"] > 0
    assert tuned["savings"]["frozen_params"] == tuned["freeze"]["frozen_params"]
    assert {row["digit"] for row in report["after"]} == {7, 9}
    assert (out / "finetune" / "model" / "guardtune-policy.json").is_file()
