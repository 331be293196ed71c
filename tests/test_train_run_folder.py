"""The run folder: one writer, no accidental reuse, outputs never over inputs, nothing written by a failed start.

Also: paths and names print verbatim (no Rich markup), and TensorBoard is optional and lazy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from engine_helpers import make_tiny_dataset, write_recipe

import msattn.train.loop
import msattn.train.run_folder
from msattn.config.recipe import load_recipe
from msattn.errors import UsageError
from msattn.locks import LOCK_NAME, OWNER_NAME
from msattn.runtime.checkpoint import load_checkpoint
from msattn.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=4, num_val=2)


@pytest.fixture
def recipe(data: Path, tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "r.toml", data, model={"scales": [1.0]}, train={"iterations": 2, "batch_size": 2})


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- no reuse by accident


@pytest.mark.parametrize("leftover", ["best.pt", "failed.pt", "metrics.jsonl"])
def test_a_folder_with_another_runs_files_is_refused_without_resume(leftover: str, recipe: Path, tmp_path: Path,
                                                                    run_cli) -> None:  # fmt: skip
    """Before the fix only last.pt counted: a folder left by a NaN run (failed.pt) was written over."""
    run = tmp_path / "run"
    run.mkdir()
    (run / leftover).write_bytes(b"the earlier run's")
    before = listing(run)
    code, _, err = run_cli("train", recipe, "--out", run, "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"msattn: error: {run}: holds another run's") and leftover in line
    assert "--resume" in line and "--overwrite" in line and "another --out" in line
    assert listing(run) == before and (run / leftover).read_bytes() == b"the earlier run's"


def test_overwrite_moves_the_old_run_aside_and_keeps_foreign_files(recipe: Path, tmp_path: Path, run_cli) -> None:
    run = tmp_path / "run"
    assert run_cli("train", recipe, "--out", run, "--device", "cpu")[0] == 0
    old_last = (run / "last.pt").read_bytes()
    (run / "notes.txt").write_text("mine")
    code, out, err = run_cli("train", recipe, "--out", run, "--device", "cpu", "--overwrite",
                             "--set", "train.iterations=3")  # fmt: skip
    assert code == 0, err
    replaced = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(replaced) == 1 and f"moved to {replaced[0]}" in out
    assert (replaced[0] / "last.pt").read_bytes() == old_last
    moved = {p.name for p in replaced[0].iterdir()} - {"tensorboard"}  # there too where tensorboard is installed
    assert moved == {"last.pt", "config.json", "metrics.jsonl"}
    assert load_checkpoint(run / "last.pt")["iteration"] == 3 and (run / "notes.txt").read_text() == "mine"


def test_overwrite_that_fails_at_start_up_leaves_the_old_run_in_place(recipe: Path, tmp_path: Path, run_cli) -> None:
    run = tmp_path / "run"
    assert run_cli("train", recipe, "--out", run, "--device", "cpu")[0] == 0
    before = listing(run)
    code, _, err = run_cli("train", recipe, "--out", run, "--device", "cpu", "--overwrite",
                           "--set", "data.val_split=nowhere", "--set", "data.select_split=missing")  # fmt: skip
    assert code == 2 and "missing.txt" in err
    assert listing(run) == before


def test_resume_and_overwrite_exclude_each_other(recipe: Path, tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("train", recipe, "--out", tmp_path / "run", "--resume", "--overwrite")
    assert code == 2 and "give one of them" in err and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- outputs never over inputs


def test_a_run_folder_inside_the_dataset_folder_is_refused(recipe: Path, data: Path, run_cli) -> None:
    before = listing(data)
    for out in (data, data / "runs" / "a"):
        code, _, err = run_cli("train", recipe, "--out", out, "--device", "cpu")
        assert code == 2 and "dataset folder" in err and f"{out}: the run folder is" in err, err
    assert listing(data) == before


def test_initial_weights_that_training_would_replace_are_refused(recipe: Path, tmp_path: Path, run_cli) -> None:
    run = tmp_path / "run"
    assert run_cli("train", recipe, "--out", run, "--device", "cpu")[0] == 0
    before = (run / "last.pt").read_bytes()
    code, _, err = run_cli("train", recipe, "--out", run, "--device", "cpu", "--overwrite",
                           "--set", f"model.init_from={json.dumps(str(run / 'last.pt'))}")  # fmt: skip
    assert code == 2 and f"{run / 'last.pt'}: model.init_from is a file of the run folder" in err
    assert (run / "last.pt").read_bytes() == before and not [p for p in run.iterdir() if "replaced" in p.name]


# ----------------------------------------------------------------------------- one writer per folder


HOLD = """
import sys, time
marker = sys.argv[1]
import msattn.train.loop
real_loss = msattn.train.loop.segmentation_loss
def loss(*args, **kwargs):
    open(marker, "w").close()
    time.sleep(300)
msattn.train.loop.segmentation_loss = loss
from msattn.cli.app import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_second_train_into_the_same_folder_stops_at_once(recipe: Path, tmp_path: Path) -> None:
    run, marker = tmp_path / "run", tmp_path / "holding"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(marker), "train", str(recipe), "--out", str(run),
                              "--device", "cpu"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first train never started its first step"
            time.sleep(0.02)
        began = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "msattn.cli", "train", str(recipe), "--out", str(run),
                                 "--device", "cpu", "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert second.returncode == 2, second.stderr
        lines = second.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"msattn: error: {run}: another command is writing this folder: msattn train {recipe} --out {run} "
            f"(process {first.pid} on "
        ), lines
        assert time.monotonic() - began < 30  # no data read, no model built
    finally:
        os.killpg(first.pid, 9)
        first.wait(30)
        first.stderr.close()


# ----------------------------------------------------------------------------- a failed start writes nothing


def test_an_unwritable_run_folder_fails_before_the_first_step(recipe: Path, tmp_path: Path, run_cli,
                                                              monkeypatch) -> None:  # fmt: skip
    """The probe meets what a full disk or a quota gives (the lock file alone could still be made)."""
    steps = {"n": 0}
    real_loss = msattn.train.loop.segmentation_loss

    def counting(*args, **kwargs):
        steps["n"] += 1
        return real_loss(*args, **kwargs)

    def full(folder: Path) -> None:
        raise OSError(28, "No space left on device", str(folder / "probe"))

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", counting)
    monkeypatch.setattr(msattn.train.run_folder, "write_probe", full)
    code, _, err = run_cli("train", recipe, "--out", tmp_path / "new", "--device", "cpu")
    assert code == 2 and f"{tmp_path / 'new'}: the run folder is not writable (No space left on device)" in err
    assert steps["n"] == 0 and not (tmp_path / "new").exists()
    monkeypatch.undo()
    run = tmp_path / "run"
    run.mkdir()
    msattn.train.run_folder.write_probe(run)  # the real probe leaves nothing behind
    assert list(run.iterdir()) == []


class FakeSummaryWriter:
    made: list[str] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)  # like the real one
        FakeSummaryWriter.made.append(log_dir)

    def add_scalar(self, *args: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_train_that_fails_in_its_first_step_leaves_no_trace(recipe: Path, tmp_path: Path, monkeypatch) -> None:
    """No tensorboard/ folder, config.json, metrics.jsonl or lock files: the folder it created is gone."""
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeSummaryWriter.made.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("first step fails")

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", broken)
    with pytest.raises(RuntimeError, match="first step fails"):
        train(load_recipe(recipe), tmp_path / "new" / "run", device="cpu")
    assert not (tmp_path / "new" / "run").exists() and FakeSummaryWriter.made == []
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    train(load_recipe(recipe), tmp_path / "ok", device="cpu")
    assert FakeSummaryWriter.made == [str(tmp_path / "ok" / "tensorboard")]


def test_with_or_without_tensorboard_installed_the_folder_holds_the_run(recipe: Path, tmp_path: Path) -> None:
    """Passes either way: tensorboard/ exists exactly when tensorboard is importable."""
    try:
        import torch.utils.tensorboard  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    train(load_recipe(recipe), tmp_path / "run", device="cpu")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names - {"tensorboard"} == {"config.json", "last.pt", "metrics.jsonl", LOCK_NAME, OWNER_NAME}
    assert ("tensorboard" in names) == installed


# ----------------------------------------------------------------------------- paths print verbatim


@pytest.mark.parametrize("name", ["run[lr=0.01]", "a[/x]", "[bold]b[/bold]"])
def test_markup_like_run_folders_print_verbatim(name: str, data: Path, tmp_path: Path, run_cli) -> None:
    recipe = write_recipe(tmp_path / "r.toml", data, model={"scales": [1.0]},
                          train={"iterations": 2, "batch_size": 2, "eval_at_end": True})  # fmt: skip
    run = tmp_path / name
    code, out, err = run_cli("train", recipe, "--out", run, "--device", "cpu")
    assert code == 0, err
    assert f"run folder {run}" in out and f"outputs: {run}/ (last.pt" in out
    assert "mIoU " in out and "% on 2 val images (last.pt)" in out  # one score format: 66.64%
    code, _, err = run_cli("train", recipe, "--out", run, "--device", "cpu")
    assert code == 2 and f"msattn: error: {run}: holds another run's checkpoints" in err


def test_markup_like_dataset_and_class_names_print_verbatim(tmp_path: Path, run_cli) -> None:
    data = make_tiny_dataset(tmp_path / "d[/x]", num_train=2, num_val=2)
    meta = json.loads((data / "dataset.json").read_text())
    meta["name"], meta["classes"] = "tiny[/b]", ["background", "red[x]", "[bold]green"]
    (data / "dataset.json").write_text(json.dumps(meta))
    recipe = write_recipe(tmp_path / "r.toml", data, model={"scales": [1.0]},
                          train={"iterations": 1, "batch_size": 2, "eval_at_end": True})  # fmt: skip
    code, out, err = run_cli("train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    assert "tiny[/b] val: last.pt" in out and "red[x]" in out and "[bold]green" in out, out


def test_refusing_inputs_happens_before_the_lock_is_taken(recipe: Path, data: Path) -> None:
    with pytest.raises(UsageError, match="dataset folder"):
        train(load_recipe(recipe), data / "inside", device="cpu")
    assert not (data / "inside").exists()
