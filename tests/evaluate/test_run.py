"""`guardtune evaluate` end to end on the embedded model, at a tiny budget, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardtune.cli import app
from guardtune.digits.dataset import export_digits
from guardtune.evaluate.defenses import DEFAULT_METHODS as METHODS
from guardtune.evaluate.run import Measurement, Task, summarise
from tests.conftest import combined_output


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-data")
    return {
        "illegal": export_digits(root / "sevens", (7,), "test").out,
        "legal": export_digits(root / "bold", (0, 1), "test", "bold").out,
    }


def _evaluate(runner, folders, *extra):
    arguments = ["--illegal", str(folders["illegal"]), "--legal", str(folders["legal"])]
    return runner.invoke(app, ["evaluate", *arguments, *extra])


def test_every_method_and_metric_lands_in_the_json_and_the_plot(runner, folders, tmp_path):
    out, plot = tmp_path / "result.json", tmp_path / "plot.png"
    tiny = [
        "--work-dir",
        str(tmp_path / "work"),
        "--user-steps",
        "1,2",
        "--seeds",
        "1",
        "--samples",
        "2",
        "--defense-steps",
        "1",
        "--batch-size",
        "2",
    ]
    result = _evaluate(runner, folders, *tiny, "--plot", str(plot), "--json", str(out))
    assert result.exit_code == 0, combined_output(result)
    record = json.loads(out.read_text())
    assert set(record["frozen_share"]) == set(METHODS)
    assert record["frozen_share"]["full"] == 0 and record["frozen_share"]["imma"] == 0
    policy_share = record["frozen_share"]["freezeasguard"]
    assert 0.25 < policy_share < 0.35  # the shipped policy, p = 0.3 by parameters
    for method in ("random", "blocks"):  # matched frozen-parameter share
        assert abs(record["frozen_share"][method] - policy_share) < 0.02
    measured = {(m["method"], m["task"], m["step"]) for m in record["measurements"]}
    assert len(measured) == len(METHODS) * 2 * 2
    for m in record["measurements"]:
        assert {"held_out_loss", "recognisability", "quality", "frechet"} <= set(m["metrics"])
        per_class = {k for k in m["metrics"] if k.startswith("held_out_loss: ")}
        expected = {"seven"} if m["kind"] == "illegal" else {"zero", "one"}
        assert {k.rsplit(" ", 1)[1] for k in per_class} == expected
    final = [r for r in record["summary"] if r["step"] == 2]
    assert {r["metric"] for r in final} == {"recognisability", "quality"}
    assert all(r["versus_full"] == 0 for r in final if r["method"] == "full")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mitigation" in result.stdout and "freezeasguard" in result.stdout
    # The journal holds every run: the same command again resumes them all and trains nothing.
    journal = Path(record["journal"])
    runs = json.loads(journal.read_text())["runs"]
    assert journal.parent == tmp_path / "work" and record["reused"] == 0
    assert sum(len(r["measurements"]) for r in runs) == len(record["measurements"])
    again = _evaluate(runner, folders, *tiny, "--plot", str(plot), "--json", str(out))
    assert again.exit_code == 0, combined_output(again)
    repeated = json.loads(out.read_text())
    assert repeated["measurements"] == record["measurements"]
    assert repeated["reused"] == len(METHODS) * 2
    assert repeated["seconds"] < record["seconds"] / 2


def test_a_wider_or_changed_evaluation_reruns_only_what_changed(runner, folders, tmp_path):
    tiny = ["--work-dir", str(tmp_path / "work"), "--user-steps", "1", "--seeds", "1",
            "--samples", "2", "--batch-size", "2", "--plot", str(tmp_path / "p.png")]  # fmt: skip

    def run(methods: str, ratio: str) -> dict:
        out = tmp_path / f"{methods}-{ratio}.json"
        result = _evaluate(runner, folders, *tiny, "--methods", methods, "--ratio", ratio,
                           "--json", str(out))  # fmt: skip
        assert result.exit_code == 0, combined_output(result)
        return json.loads(out.read_text())

    def rows(record: dict, method: str) -> list[dict]:
        return [m for m in record["measurements"] if m["method"] == method]

    first = run("full,random", "0.2")
    wider = run("full,random,blocks", "0.2")  # one more method: only its runs (2 tasks) train
    assert wider["reused"] == 4 and len(rows(wider, "blocks")) == 2
    assert rows(wider, "random") == rows(first, "random")
    changed = run("full,random", "0.25")  # another share: random reruns, full does not
    assert changed["reused"] == 2
    assert rows(changed, "full") == rows(first, "full")
    assert abs(changed["frozen_share"]["random"] - 0.25) < 0.01
    assert abs(first["frozen_share"]["random"] - 0.2) < 0.01


def test_summary_compares_with_full_finetuning():
    task = Task("illegal x", "illegal", None, None, None)  # type: ignore[arg-type]
    legal = Task("legal y", "legal", None, None, None)  # type: ignore[arg-type]
    rows = [
        Measurement("full", 0, "illegal x", "illegal", 5, {"recognisability": 0.8}),
        Measurement("full", 1, "illegal x", "illegal", 5, {"recognisability": 0.6}),
        Measurement("random", 0, "illegal x", "illegal", 5, {"recognisability": 0.35}),
        Measurement("random", 1, "illegal x", "illegal", 5, {"recognisability": 0.35}),
        Measurement("full", 0, "legal y", "legal", 5, {"quality": 0.5}),
        Measurement("full", 1, "legal y", "legal", 5, {"quality": 0.5}),
        Measurement("random", 0, "legal y", "legal", 5, {"quality": 0.4}),
        Measurement("random", 1, "legal y", "legal", 5, {"quality": 0.5}),
    ]
    summary = {
        (r.method, r.task): r for r in summarise(rows, ("full", "random"), [task, legal], [5], True)
    }
    assert summary["full", "illegal x"].spread == pytest.approx(0.2)
    assert summary["random", "illegal x"].versus_full == pytest.approx(0.5)  # mitigation
    assert summary["random", "legal y"].versus_full == pytest.approx(0.1)  # legal impact


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "full,sorcery"], "unknown method 'sorcery'"),
        (["--ratio", "1.5"], "--ratio must be in (0, 1)"),
        (["--scorer", "fid"], "unknown scorer"),
    ],
)
def test_bad_requests_are_one_line_exit_3(runner, folders, extra, message):
    result = _evaluate(runner, folders, *extra)
    assert result.exit_code == 3
    assert message in combined_output(result) and "Traceback" not in combined_output(result)


def test_missing_folder_and_untrusted_policy_fail_closed(runner, folders, tmp_path):
    missing = runner.invoke(
        app, ["evaluate", "--illegal", str(tmp_path / "none"), "--legal", str(folders["legal"])]
    )
    assert missing.exit_code == 3 and "does not exist" in combined_output(missing)
    forged = tmp_path / "policy.json"
    forged.write_text("{}")
    refused = _evaluate(runner, folders, "--policy", str(forged))
    assert refused.exit_code == 4 and "Traceback" not in combined_output(refused)


def test_without_a_scorer_the_held_out_loss_rise_is_the_measure():
    task = Task("illegal x", "illegal", None, None, None)  # type: ignore[arg-type]
    rows = [
        Measurement("full", 0, "illegal x", "illegal", 5, {"held_out_loss": 0.10}),
        Measurement("blocks", 0, "illegal x", "illegal", 5, {"held_out_loss": 0.15}),
    ]
    summary = {r.method: r for r in summarise(rows, ("full", "blocks"), [task], [5], False)}
    assert summary["blocks"].metric == "held_out_loss"
    assert summary["blocks"].versus_full == pytest.approx(0.5)  # 50% more loss than full


def test_crossing_says_how_long_a_defence_holds():
    from guardtune.evaluate.run import crossing

    steps = [50, 100, 200, 400]
    assert crossing(steps, [0.45, 0.57, 0.34, 0.19]) == pytest.approx(200 + 200 * 0.14 / 0.15)
    assert crossing(steps, [0.45, 0.57, 0.34, 0.25]) is None  # holds at every budget
    assert crossing(steps, [0.1, 0.57, 0.34, 0.25]) == 50  # below from the first budget
    assert crossing(steps, [0.3, 0.2, 0.1, 0.0]) == 100  # reaches 0.2 at 100, below after
