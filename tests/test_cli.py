"""The command line itself: version, help, and that --help stays instant (no heavy imports)."""

from __future__ import annotations

import subprocess
import sys

from msattn import __version__


def test_version(run_cli) -> None:
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"msattn {__version__}"


def test_help_lists_every_command(run_cli) -> None:
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in ("prepare-data", "train", "evaluate", "predict", "crf-refine", "bench"):
        assert command in out


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys; from msattn.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'scipy', 'pycocotools') if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout, result.stdout[-300:]


def test_unknown_command_is_a_usage_error(run_cli) -> None:
    code, _, err = run_cli("frobnicate")
    assert code == 2 and "Traceback" not in err
