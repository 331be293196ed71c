"""Fault injection on a real training process: SIGKILL anywhere, ``--resume``, same final weights.

A tiny run (width 1/16, 32-px crops, dropout, random scaling and flips, two scales, 24 iterations,
``last.pt`` every 4) is killed with SIGKILL three times and resumed each time with ``--resume``:

1. during a training step (a hook in the child blocks inside the loss of iteration 10);
2. during a checkpoint write (the child's ``torch.save`` writes half the bytes, then blocks);
3. at a seeded random moment (start-up, a step, a save or validation: wherever it lands).

The resumed run must finish with exactly the weights, momentum buffers and logged losses of an
uninterrupted run, keep an intact ``last.pt`` at every kill, and leave no temporary file behind.
In-process tests below cover a full disk during a checkpoint write and out-of-memory hints.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import make_tiny_dataset, write_recipe

import msattn.train.loop
from msattn.runtime.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS, EVERY = 24, 4
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # the same threads in every run

#: ``python -c HOOKED marker kind n ARGS``: msattn's CLI with a hook that blocks at the n-th call of
#: the loss (kind "loss") or of torch.save (kind "save": after writing half of the checkpoint).
HOOKED = """
import io, sys, time
marker, kind, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]
def block():
    open(marker, "w").close()
    time.sleep(300)
if kind == "loss":
    import msattn.train.loop
    real_loss = msattn.train.loop.segmentation_loss
    def loss(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            block()
        return real_loss(*args, **kwargs)
    msattn.train.loop.segmentation_loss = loss
else:
    import torch
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            block()
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
from msattn.cli.app import main
main(sys.argv[4:])
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("train-faults")
    data = make_tiny_dataset(folder / "data", num_train=8, num_val=2)
    return write_recipe(
        folder / "faults.toml", data,
        model={"dropout": 0.5}, data={"scale_range": [0.7, 1.3], "flip": True},
        train={"iterations": ITERATIONS, "batch_size": 4, "micro_batch": 2, "checkpoint_every": EVERY,
               "log_every": 1, "val_every": 0},
    )  # fmt: skip


def train_args(recipe: Path, run: Path, resume: bool = False) -> list[str]:
    return ["train", str(recipe), "--out", str(run), "--device", "cpu", *(["--resume"] if resume else [])]


def start(args: list[str], hook: tuple[Path, str, int] | None = None) -> subprocess.Popen:
    prefix = ["-c", HOOKED, str(hook[0]), hook[1], str(hook[2])] if hook else ["-m", "msattn.cli"]
    return subprocess.Popen([sys.executable, *prefix, *args], cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def kill_at_marker(proc: subprocess.Popen, marker: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail("the kill point was never reached")
        time.sleep(0.01)
    kill(proc)
    assert proc.returncode == -signal.SIGKILL


def run_to_completion(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "msattn.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def iteration_of(run: Path) -> int:
    return load_checkpoint(run / "last.pt")["iteration"]  # loads: the file is intact


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if p.name.startswith(".tmp-")]


def losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in records if "loss" in r]


def test_sigkill_anywhere_then_resume_matches_an_uninterrupted_run(recipe: Path, tmp_path: Path) -> None:
    reference, broken = tmp_path / "reference", tmp_path / "broken"
    run_to_completion(train_args(recipe, reference))

    # 1. during a step: the loss of iteration 10 (2 micro-batches an iteration) never returns
    marker = tmp_path / "kill-1"
    kill_at_marker(start(train_args(recipe, broken), hook=(marker, "loss", 9 * 2 + 1)), marker)
    assert iteration_of(broken) == 8
    assert not temporaries(broken)

    # 2. during a checkpoint write: resumed at 8, it saves 12, then dies half-way through writing 16
    marker = tmp_path / "kill-2"
    kill_at_marker(start(train_args(recipe, broken, resume=True), hook=(marker, "save", 2)), marker)
    assert iteration_of(broken) == 12  # the previous checkpoint, intact
    partial = temporaries(broken)
    assert len(partial) == 1 and partial[0].name.startswith(".tmp-last.pt.") and partial[0].stat().st_size > 0

    # 3. at a seeded random moment (if the run beats the clock, nothing is lost either)
    proc = start(train_args(recipe, broken, resume=True))
    time.sleep(random.Random(7).uniform(0.5, 4.0))
    kill(proc)
    assert iteration_of(broken) >= 12

    out = run_to_completion(train_args(recipe, broken, resume=True))
    assert "resumed from iteration" in out

    a, b = load_checkpoint(reference / "last.pt"), load_checkpoint(broken / "last.pt")
    assert a["iteration"] == b["iteration"] == ITERATIONS
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert losses(broken) == losses(reference)  # each iteration logged once, with the same loss
    assert [i for i, _ in losses(broken)] == list(range(1, ITERATIONS + 1))
    assert not temporaries(broken)


# ----------------------------------------------------------------------------- in-process faults


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(recipe: Path, tmp_path: Path, run_cli,
                                                              monkeypatch) -> None:  # fmt: skip
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # from the checkpoint at iteration 8 on, the disk stays full
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    code, _, err = run_cli(*train_args(recipe, run))
    assert code == 1, err
    assert "msattn: error:" in err and "last.pt: no space left on device" in err and "Traceback" not in err
    assert f"saving {run / 'last.pt'} failed too" in err and f"{run / 'last.pt'} holds iteration 4;" in err
    assert calls["n"] == 3  # the scheduled save and the one after the failure
    monkeypatch.undo()
    assert iteration_of(run) == 4
    assert not temporaries(run)


def test_a_checkpoint_write_that_fails_once_is_retried_before_exiting(recipe: Path, tmp_path: Path, run_cli,
                                                                      monkeypatch) -> None:  # fmt: skip
    """The save at iteration 8 fails (disk briefly full): the failure path writes iteration 8 after all."""
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    code, _, err = run_cli(*train_args(recipe, run))
    monkeypatch.undo()
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("msattn: error: training stopped after iteration 8 of 24: ")
    assert f"{run / 'last.pt'} holds iteration 8; to continue: msattn train" in line and line.endswith("--resume")
    assert iteration_of(run) == 8


def test_out_of_memory_in_a_step_names_the_knobs(recipe: Path, tmp_path: Path, run_cli, monkeypatch) -> None:
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", oom)
    code, _, err = run_cli(*train_args(recipe, tmp_path / "run"))
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("msattn: error: out of GPU memory")
    for knob in ("train.micro_batch", "data.crop_size", "scales", "train.amp"):
        assert knob in line, knob
