"""Process-wide settings belong to guardtune's own processes, never to a process importing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from guardtune.cli import app
from guardtune.errors import ExitCode
from guardtune.runtime import PROCESS_DEFAULTS

LIBRARY = ("guardtune", "guardtune.models", "guardtune.enforce.audit", "guardtune.trust.verify",
           "guardtune.training.finetune", "guardtune.publish")  # fmt: skip


def test_importing_the_library_changes_nothing_in_the_environment(tmp_path):
    code = (
        "import importlib, json, logging, os, sys; before = dict(os.environ); "
        f"[importlib.import_module(name) for name in {LIBRARY!r}]; "
        "changed = sorted(k for k in set(before) | set(os.environ) "
        "if before.get(k) != os.environ.get(k)); "
        "print(json.dumps([changed, logging.getLogger('bitsandbytes').level]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_DEFAULTS}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    changed, level = json.loads(done.stdout.splitlines()[-1])
    assert changed == [] and level == 0


def test_the_command_line_applies_the_process_defaults(runner, monkeypatch, tmp_path):
    for name in PROCESS_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["data", "check", str(tmp_path / "missing")])
    assert result.exit_code == ExitCode.BAD_DATA
    assert {name: os.environ.get(name) for name in PROCESS_DEFAULTS} == PROCESS_DEFAULTS


def test_a_user_setting_wins_over_the_defaults(runner, monkeypatch, tmp_path):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    runner.invoke(app, ["data", "check", str(tmp_path / "missing")])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
