import dataclasses
import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from guardtune import cli
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


# ----------------------------------------------------------------------------- option defaults
# Each command's options default to what its library function (or config) defaults to, so
# `guardtune X` and `X()` from Python do the same thing. An option with a default is either
# compared here or declared CLI-only, so a new option cannot slip past the check.


def _defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """Parameters with a default, by name: a command's options, or a function's keywords."""
    parameters = inspect.signature(function).parameters.items()
    return {name: p.default for name, p in parameters if p.default is not inspect.Parameter.empty}


def _as_passed(trusted: list[Path] | None) -> tuple[Path, ...]:
    return tuple(trusted or ())  # what the commands hand the library for an unused --trusted


def _assert_defaults(
    command: Callable[..., Any],
    expected: dict[str, Any],
    cli_only: Iterable[str] = (),
    passed: dict[str, Callable[[Any], Any]] | None = None,
) -> None:
    """`command`'s option defaults, as the command passes them on, equal `expected`."""
    convert = {"trusted": _as_passed, **(passed or {})}
    options = {n: convert.get(n, lambda v: v)(v) for n, v in _defaults(command).items()}
    options.pop("json_path")
    if "model_config" in options:  # --revision and --variant go to resolve_model with it
        from guardtune.resolve import resolve_model

        resolver = _defaults(resolve_model)
        expected = expected | {name: resolver[name] for name in ("revision", "variant")}
    assert set(options) == set(expected) | set(cli_only)
    assert {name: options[name] for name in expected} == expected


def test_data_digits_defaults_are_export_digits_defaults():
    from guardtune.digits.dataset import export_digits

    library = _defaults(export_digits)
    expected = {name: library[name] for name in ("split", "style", "overwrite")}
    _assert_defaults(cli.data_digits, expected, cli_only={"classes"})


def test_data_check_defaults_are_check_folder_defaults():
    from guardtune.data import check_folder

    _assert_defaults(cli.data_check, _defaults(check_folder))


def test_generate_defaults_are_the_librarys_defaults():
    from guardtune.generate import generate, generate_to_files
    from guardtune.models import load_pipeline

    library = _defaults(generate)
    library.pop("show_progress")  # the CLI always shows progress
    _assert_defaults(cli.generate, library)
    # ... which are the sampler's and the loader's own.
    sampler, loader = _defaults(generate_to_files), _defaults(load_pipeline)
    sampler.pop("show_progress")  # off for the library's other callers
    assert {name: library[name] for name in sampler} == sampler
    assert (library["model"], library["model_config"]) == (loader["model"], loader["config_dir"])


def test_keygen_defaults_are_create_keypair_defaults():
    from guardtune.trust.signing import create_keypair

    library = _defaults(create_keypair)
    # --passphrase asks for one; the library takes its bytes (None: unencrypted).
    assert library["passphrase"] is None
    _assert_defaults(cli.keygen, {"key_type": library["key_type"]}, cli_only={"passphrase"})


def test_policy_sign_defaults_are_sign_mask_defaults():
    from guardtune.trust.build import sign_mask

    library = _defaults(sign_mask)
    library["expires"] = library.pop("expires_at")
    _assert_defaults(cli.policy_sign, library)


def test_policy_verify_defaults_are_verify_policy_defaults():
    from guardtune.trust.verify import verify_policy

    library = _defaults(verify_policy)
    expected = {"model": library["model"], "model_config": library["model_config"]}
    expected |= {"policy": library["policy_path"], "trusted": library["trusted_files"]}
    _assert_defaults(cli.policy_verify, expected)


def test_policy_show_defaults_are_describe_policy_defaults():
    from guardtune.trust.inspection import describe_policy

    _assert_defaults(cli.policy_show, _defaults(describe_policy))


def test_publish_defaults_are_the_recipes_and_the_learners_defaults():
    from guardtune.learn.freezeasguard import LearnerConfig
    from guardtune.publish import publish

    library, config = _defaults(publish), LearnerConfig()
    expected = {name: library[name] for name in ("model", "model_config", "method", "out")}
    expected |= {"work_dir": library["workdir"], "resume": library["resume"]}
    expected |= {name: getattr(config, name) for name in ("ratio", "share_by", "seed")}
    expected |= {name: getattr(config, name) for name in ("relearn_steps", "batch_size")}
    expected |= {name: getattr(config, name) for name in ("user_lr", "user_reset_every")}
    expected |= {"steps": config.rounds, "user_steps_per_update": config.user_steps}
    expected |= {"mask_lr": config.mask_lr, "granularity": config.granularity}
    expected |= {"horizon": config.horizon, "edited_model_out": library["edited_out"]}
    _assert_defaults(cli.publish, expected, cli_only={"config_file"})  # --config FILE


def test_finetune_defaults_are_the_recipes_and_train_configs_defaults():
    from guardtune.training.config import TrainConfig
    from guardtune.training.finetune import finetune

    library = _defaults(finetune)
    config = library.pop("config")
    assert config == TrainConfig()
    library.pop("show_progress")  # the CLI always shows progress
    library.pop("settings")  # the CLI's run.toml: its options merged (tests/test_runconfig.py)
    fields = [f.name for f in dataclasses.fields(TrainConfig)]  # every field is an option
    expected = library | {name: getattr(config, name) for name in fields}
    # Spelled as users know them: a repeatable --validation-prompt, and --no-latent-cache.
    expected["validation_prompt"] = expected.pop("validation_prompts")
    expected["no_latent_cache"] = not expected.pop("cache")
    passed = {"validation_prompt": lambda v: tuple(v or ())}
    # The recipe needs an output folder (the command offers one) and writes no report file.
    _assert_defaults(
        cli.finetune, expected, cli_only={"out", "report", "config_file"}, passed=passed
    )


def test_audit_defaults_are_audit_defaults():
    from guardtune.enforce.audit import audit

    library = _defaults(audit)
    expected = {"base": library["base"], "model_config": library["model_config"]}
    expected |= {"policy": library["policy_path"], "trusted": library["trusted_files"]}
    expected |= {"strict": library["strict"]}
    _assert_defaults(cli.audit, expected)


def test_evaluate_defaults_are_the_evaluations_and_its_configs_defaults():
    from guardtune.evaluate.attack import AttackConfig
    from guardtune.evaluate.imma import ImmaConfig
    from guardtune.evaluate.persguard import PersGuardConfig
    from guardtune.evaluate.run import EvaluateConfig, evaluate

    library = _defaults(evaluate)
    config = library["config"]
    assert config == EvaluateConfig()
    defenses = (config.attack, config.imma, config.persguard)
    assert defenses == (AttackConfig(), ImmaConfig(), PersGuardConfig())
    expected = {name: library[name] for name in ("model", "model_config", "policy", "trusted")}
    expected |= {"combined_model": library["combined"]}
    expected |= {name: getattr(config, name) for name in ("methods", "ratio", "steps", "seeds")}
    expected |= {"samples": config.samples, "scorer": config.scorer}
    expected |= {"lr": config.attack.lr, "batch_size": config.attack.batch_size}
    assert config.imma.steps == config.persguard.steps  # one --defense-steps sets both
    expected |= {"defense_steps": config.imma.steps}

    def as_list(text: str) -> tuple[str, ...]:
        return tuple(text.split(","))

    passed = {"methods": as_list, "steps": lambda text: tuple(map(int, as_list(text)))}
    # The command plots and journals under runs/evaluate/; the library only when asked.
    _assert_defaults(
        cli.evaluate, expected, cli_only={"plot", "work_dir", "config_file"}, passed=passed
    )


def test_export_has_no_defaults_of_its_own():
    from guardtune.export import export

    assert _defaults(export) == {}
    _assert_defaults(cli.export, {})


def test_demo_defaults_are_run_demo_defaults():
    from guardtune.digits.demo import run_demo

    library = _defaults(run_demo)
    expected = {"samples": library["samples_per_digit"], "steps": library["finetune_steps"]}
    _assert_defaults(cli.demo, expected, cli_only={"out"})


# ----------------------------------------------------------------------------- option hygiene


def _commands(command, path=()):
    subcommands = getattr(command, "commands", None)
    if subcommands:
        for name, sub in subcommands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), command


def test_every_option_says_what_it_does_and_only_flags_that_default_on_can_be_negated():
    import typer.main

    for name, command in _commands(typer.main.get_command(cli.app)):
        for parameter in command.params:
            assert getattr(parameter, "help", None), f"{name} {parameter.opts} has no help"
            negations = getattr(parameter, "secondary_opts", [])
            assert not negations or parameter.default is True, f"{name} {negations}"


def test_bad_choices_are_usage_errors_before_anything_loads(runner, tmp_path):
    # The data folder is empty: reaching it would be exit 3, so exit 2 shows the order.
    for option, value in (("--lr-scheduler", "bogus"), ("--mixed-precision", "fp8"),
                          ("--optimizer", "sgd")):  # fmt: skip
        result = runner.invoke(cli.app, ["finetune", str(tmp_path), option, value])
        assert result.exit_code == 2, combined_output(result)
        assert f"{option} must be one of" in combined_output(result)
        assert "Traceback" not in combined_output(result)


def test_the_lr_schedules_are_diffusers_own():
    from diffusers.optimization import SchedulerType

    from guardtune.training.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
