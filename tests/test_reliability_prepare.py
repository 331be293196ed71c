"""prepare-data survives SIGKILL: a re-run resumes and its output is byte-identical to a clean run.

The killed runs are real separate processes (``python -m msattn.cli prepare-data ...``) killed with
SIGKILL, once at a chosen moment inside a file write (a hook makes ``os.fsync`` signal and wait,
so the temporary file exists and the final name does not) and once at an arbitrary moment while
worker processes write in parallel (the whole process group is killed). After each kill every file
under its final name must be complete; the re-run must clean the temporaries and finish the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _data_helpers import tree_bytes

from msattn.images import open_image
from msattn.locks import LOCK_NAME, OWNER_NAME

LOCK_FILES = (LOCK_NAME, OWNER_NAME)  # the lock's holder (process id, time) differs run to run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ("--num-train", "100", "--num-val", "30", "--image-size", "32", "--seed", "3")
TOTAL = 130

#: Runs msattn's CLI with os.fsync patched: the Nth call touches MARKER and sleeps (the process is killed there).
HOOKED_CLI = """
import os, sys, time
marker, stop_at = sys.argv[1], int(sys.argv[2])
real_fsync, calls = os.fsync, [0]
def fsync(fd):
    calls[0] += 1
    if calls[0] == stop_at:
        open(marker, "w").close()
        time.sleep(120)
    real_fsync(fd)
os.fsync = fsync
from msattn.cli.app import main
main(sys.argv[3:])
"""


def start(args: list[str], hook: tuple[Path, int] | None = None) -> subprocess.Popen:
    """``msattn ARGS`` as a new process group (so a kill reaches its workers too)."""
    prefix = ["-c", HOOKED_CLI, str(hook[0]), str(hook[1])] if hook else ["-m", "msattn.cli"]
    return subprocess.Popen(
        [sys.executable, *prefix, *args], cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    """SIGKILL ``proc``'s whole process group as soon as ``ready()``; fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed: {proc.stderr.read()!r}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the kill point was never reached")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def assert_final_files_complete(out: Path) -> None:
    """Every image and label under its final name decodes fully (nothing truncated)."""
    for path in [*out.glob("images/*.jpg"), *out.glob("labels/*.png")]:
        open_image(path, mode=None)  # raises DataError on a truncated or corrupt file


def run_to_completion(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "msattn.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_demo_killed_twice_then_resumed_is_identical_to_a_clean_run(tmp_path: Path, run_cli) -> None:
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    code, _, err = run_cli("prepare-data", "demo", "--out", clean, *DEMO, "-j", "0")
    assert code == 0, err
    expected = tree_bytes(clean, skip=LOCK_FILES)
    assert len([name for name in expected if name.startswith("labels/")]) == TOTAL

    # 1. killed inside a write: the 41st fsync is in the middle of writing some file
    marker = tmp_path / "in-write"
    proc = start(["prepare-data", "demo", "--out", str(broken), *DEMO, "-j", "0"], hook=(marker, 41))
    kill_when(proc, marker.exists)
    left = temporaries(broken)
    assert len(left) == 1, left  # the file being written when the process died, under its temporary name
    final_name = left[0].parent / left[0].name[len(".tmp-") :].rsplit(".", 1)[0]
    assert not final_name.exists()
    assert_final_files_complete(broken)
    assert not (broken / "dataset.json").exists()

    # 2. killed at an arbitrary moment while two worker processes write
    def some_progress() -> bool:
        return len(list((broken / "labels").glob("*.png"))) >= 60

    proc = start(["prepare-data", "demo", "--out", str(broken), *DEMO, "-j", "2"])
    kill_when(proc, some_progress)
    assert_final_files_complete(broken)
    assert len(list((broken / "labels").glob("*.png"))) < TOTAL or not (broken / "dataset.json").exists()

    # 3. the re-run finishes the job: identical bytes, no temporary left
    run_to_completion(["prepare-data", "demo", "--out", str(broken), *DEMO, "-j", "2"])
    assert not temporaries(broken)
    assert tree_bytes(broken, skip=LOCK_FILES) == expected


def test_person_part_killed_in_a_write_then_resumed_is_identical(tmp_path: Path, run_cli, fixtures_dir: Path) -> None:
    source = fixtures_dir / "pascal_part"
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    code, _, err = run_cli("prepare-data", "person-part", "--source", source, "--out", clean, "-j", "0")
    assert code == 0, err
    expected = tree_bytes(clean, skip=LOCK_FILES)
    assert len([name for name in expected if name.startswith("labels/")]) >= 6

    # fsync 1 is the settings marker, then labels (and image copies when the source is on another file system)
    marker = tmp_path / "in-write"
    proc = start(["prepare-data", "person-part", "--source", str(source), "--out", str(broken), "-j", "0"],
                 hook=(marker, 4))  # fmt: skip
    kill_when(proc, marker.exists)
    assert len(temporaries(broken)) == 1
    assert 1 <= len(list((broken / "labels").glob("*.png"))) <= 2
    assert not (broken / "dataset.json").exists()
    assert_final_files_complete(broken)

    run_to_completion(["prepare-data", "person-part", "--source", str(source), "--out", str(broken), "-j", "0"])
    assert not temporaries(broken)
    assert tree_bytes(broken, skip=LOCK_FILES) == expected
