"""The package as users install it: a wheel in a fresh environment, and a library import that
leaves the importing process as it was.

The wheel test builds guardtune from a copy of its sources (the checkout stays clean), installs
it without dependencies into a new virtual environment that sees this one's packages through a
`.pth` line (the editable install's own hook is not processed there, so `import guardtune`
finds the wheel), then verifies and fine-tunes the embedded model through the installed
console script. A key dropped into the installation is not trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from guardtune.contract import POLICY_FILE, PROVENANCE_FILE
from guardtune.digits.dataset import export_digits
from guardtune.runtime import PROCESS_DEFAULTS
from guardtune.trust.build import sign_mask
from guardtune.trust.keys import BUILTIN_KEYS, builtin_key
from guardtune.trust.signing import create_keypair

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("guardtune", "pyproject.toml", "README.md", "LICENSE")


def _run(command: list[str], **options) -> subprocess.CompletedProcess:
    # Never from the checkout: `python -c` puts the working folder first on sys.path.
    options.setdefault("cwd", Path(sys.executable).anchor)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **options)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding guardtune's wheel; returns its bin folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (REPO / name).is_dir() else {}))  # fmt: skip
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--quiet", "-w", str(work / "dist"), str(source)])  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("guardtune-*.whl")
    venv = work / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_run([str(venv / "bin" / "python"), "-c", where]).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                 "--no-deps", "--no-index", "--quiet", str(wheel)])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return venv / "bin"


def test_the_wheel_ships_the_trusted_key_and_schema_and_imports_from_the_install(installed):
    probe = _run([str(installed / "python"), "-c", (
        "import guardtune, json; from guardtune.trust.policy import json_schema; "
        "from guardtune.trust.keys import builtin_key; "
        "print(json.dumps([guardtune.__file__, json_schema()['title'], "
        "builtin_key('guardtune-digits.pub').keyid]))")])  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    location, title, keyid = json.loads(probe.stdout)
    assert Path(location).is_relative_to(installed.parent)
    assert title and keyid == builtin_key(BUILTIN_KEYS[0]).keyid


def test_the_installed_tool_verifies_and_fine_tunes_the_embedded_model(installed, tmp_path):
    data = tmp_path / "data"
    export_digits(data, (7,), "test")
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_DEFAULTS}
    env["GUARDTUNE_TRUSTED_DIR"] = str(tmp_path / "no-user-keys")
    run, result = tmp_path / "run", tmp_path / "result.json"
    done = _run([str(installed / "guardtune"), "finetune", str(data), "--out", str(run),
                 "--steps", "2", "--no-compare", "--json", str(result)], env=env)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(result.read_text())["signer_keyid"] == builtin_key(BUILTIN_KEYS[0]).keyid
    assert (run / "model" / PROVENANCE_FILE).is_file()


def test_a_key_dropped_into_the_installation_is_not_trusted(installed, tmp_path):
    from guardtune.resolve import EMBEDDED_DIR

    keys = create_keypair(tmp_path / "attacker")
    site = Path(_run([str(installed / "python"), "-c",
                      "import guardtune, pathlib; print(pathlib.Path(guardtune.__file__).parent)"]
                     ).stdout.strip())  # fmt: skip
    for folder in (site / "assets" / "trusted", site.parent / "policies" / "trusted"):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(keys.public_key, folder / "attacker.pub")
    mask = tmp_path / "mask.txt"
    mask.write_text("unet.conv_in.weight\n")
    policy = tmp_path / POLICY_FILE
    sign_mask(mask, [keys.private_key], model=str(EMBEDDED_DIR), out=policy)
    env = {**os.environ, "GUARDTUNE_TRUSTED_DIR": str(tmp_path / "no-user-keys")}
    done = _run([str(installed / "guardtune"), "policy", "verify", "--policy", str(policy)],
                env=env)  # fmt: skip
    assert done.returncode == 5, done.stdout + done.stderr
    assert "not trusted" in done.stderr
