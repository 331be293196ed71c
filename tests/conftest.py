"""Shared test helpers: the real-format fixtures folder and a CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from _data_helpers import fixtures_dir as shared_fixtures
from _data_helpers import run_cli as run_cli_captured


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Tests use tiny tensors: more threads only add overhead on CI's 2 cores."""
    torch.set_num_threads(1)


@pytest.fixture
def fixtures_dir() -> Path:
    """The real-format fixtures (tests/fixtures, or $MSATTN_FIXTURES); skips when absent."""
    return shared_fixtures()


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``msattn ARGS...`` in-process; returns (exit_code, stdout, stderr)."""
    return partial(run_cli_captured, capsys)
