"""Shared test helpers: the real-format fixtures folder and a CLI runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    """Tests use tiny tensors: more threads only add overhead on CI's 2 cores."""
    torch.set_num_threads(1)


@pytest.fixture
def fixtures_dir() -> Path:
    """The real-format fixtures (../shared/fixtures from the project root); skips when absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"real-format fixtures not found at {FIXTURES} (they live beside the checkout in shared/)")
    return FIXTURES


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run ``msattn ARGS...`` in-process; returns (exit_code, stdout, stderr)."""

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
