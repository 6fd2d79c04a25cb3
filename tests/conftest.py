"""Shared fixtures: the CLI runner and the embedded model, loaded once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(2)


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
