"""Shared fixtures: the CLI runner and the embedded model, loaded once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _encoding_cache(tmp_path_factory):
    """Encodings are cached in one folder per test session, never in the user's own cache."""
    from guardtune.training.encode import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("encoding-cache"))


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def embedded_pipeline():
    from guardtune.models import load_pipeline

    return load_pipeline("digits", device=torch.device("cpu"))


def combined_output(result) -> str:
    """stdout and stderr of a CliRunner result, whichever Click version captured them."""
    stderr = getattr(result, "stderr", "") if result.stderr_bytes is not None else ""
    return result.stdout + stderr


@pytest.fixture
def scenario(tmp_path, monkeypatch):
    """What the end-to-end tests of a model family share: a few real 7s to teach (illegal), bold
    1s (legal), a publisher key pair, and `tmp_path` as the working folder."""
    from types import SimpleNamespace

    from guardtune.digits.dataset import export_digits
    from guardtune.trust.signing import create_keypair

    monkeypatch.chdir(tmp_path)
    keys = create_keypair(tmp_path / "k")
    return SimpleNamespace(
        data=export_digits(tmp_path / "sevens", (7,), "test").out,
        legal=export_digits(tmp_path / "bold", (1,), "test", "bold").out,
        key=keys.private_key,
        public=keys.public_key,
    )
