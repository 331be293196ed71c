"""The command line itself: version, help, and that --help stays instant (no heavy imports)."""

from __future__ import annotations

import os
import subprocess
import sys

from msattn import __version__


def test_version(run_cli) -> None:
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"msattn {__version__}"


def test_help_lists_every_command(run_cli) -> None:
    code, out, _ = run_cli("--help")
    assert code == 0
    for command in ("prepare-data", "train", "evaluate", "predict", "crf-refine", "bench", "recipes"):
        assert command in out


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys; from msattn.cli.app import main\n"
        "for args in (['--help'], ['recipes']):\n"
        "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'scipy', 'pycocotools') if m in sys.modules)\n"
        "print('HEAVY', heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout, result.stdout[-300:]


def test_unknown_command_is_a_usage_error(run_cli) -> None:
    code, _, err = run_cli("frobnicate")
    assert code == 2 and "Traceback" not in err


def _commands() -> list[tuple[str, ...]]:
    """Every command of the app, groups' subcommands included, as argv prefixes."""
    import typer

    from msattn.cli.app import app

    root = typer.main.get_command(app)
    found = []
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", None)
        if subcommands:
            found += [(name, sub) for sub in subcommands]
        found.append((name,))
    return found


def test_every_command_has_one_help_style_read_whole_at_80_columns() -> None:
    """Plain help everywhere (no Rich boxes that cut option names), no ``<bool>``, nothing shortened."""
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    commands = _commands()
    assert ("prepare-data", "cityscapes") in commands and ("bench",) in commands and len(commands) >= 19
    for argv in [(), *commands]:
        result = subprocess.run([sys.executable, "-m", "msattn.cli", *argv, "--help"], capture_output=True,
                                text=True, env=env, check=False)  # fmt: skip
        out = result.stdout
        assert result.returncode == 0 and out.startswith("Usage: msattn "), (argv, result.stderr[-300:])
        assert "<bool>" not in out and "…" not in out and "╭" not in out, (argv, out)
        assert not [line for line in out.splitlines()[1:] if line.endswith("...")], (argv, out)  # a cut summary
        assert max(len(line) for line in out.splitlines()) <= 80, (argv, out)
