"""Training never throws away finished steps, and a resumed run is the run that was interrupted.

Whatever stops a run after a step has finished (unreadable validation data, a full disk on
metrics.jsonl, an exception in the final validation, Ctrl-C or SIGTERM), ``last.pt`` holds the
latest finished step before the command exits non-zero with one line that says what failed,
which iteration ``last.pt`` holds and how to resume; and ``--resume`` from that ``last.pt``
ends with exactly the weights of an uninterrupted run. The exactness tests run on CPU and,
where a GPU is present, again on CUDA.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import make_tiny_dataset, write_recipe

import msattn.train.loop
import msattn.train.report
from msattn.config.recipe import load_recipe
from msattn.errors import CheckpointError, TrainingError
from msattn.runtime.checkpoint import load_checkpoint
from msattn.train.loop import train
from msattn.train.report import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
#: dropout, random scaling, flips and two scales: every RNG a checkpoint must carry is used
NOISY = ["model.dropout=0.5", "data.scale_range=[0.7, 1.3]", "data.flip=true", "optim.schedule=step",
         "optim.step_size=3", "optim.gamma=0.5"]  # fmt: skip


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "data", num_train=8, num_val=2)


def noisy_recipe(path: Path, data: Path, **train_keys: object):
    keys = {"iterations": 8, "checkpoint_every": 0, "log_every": 2, **train_keys}
    return load_recipe(write_recipe(path, data, train=keys), NOISY)


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["iteration"] == sb["iteration"]
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for ma, mb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert torch.equal(ma["momentum_buffer"], mb["momentum_buffer"])


# ----------------------------------------------------------------------------- failures after training began


def test_unreadable_validation_image_saves_last_pt_and_resume_is_exact(data: Path, tmp_path: Path, run_cli) -> None:
    """The val image breaks during the run: the 4 finished iterations are kept, and resuming loses nothing."""
    recipe_path = write_recipe(tmp_path / "r.toml", data, model={"dropout": 0.5},
                               data={"scale_range": [0.7, 1.3], "flip": True, "check": "off"},  # no image pre-check
                               train={"iterations": 8, "checkpoint_every": 0, "val_every": 4, "log_every": 2})  # fmt: skip
    reference = train(load_recipe(recipe_path), tmp_path / "reference", device="cpu")
    image = data / "images" / "val_001.jpg"
    good = image.read_bytes()
    image.write_bytes(b"not a jpeg")  # exists (the start-up check passes), unreadable at validation
    run = tmp_path / "run"
    code, _, err = run_cli("train", recipe_path, "--out", run, "--device", "cpu")
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("msattn: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("msattn: error: training stopped after iteration 4 of 8: ")
    assert f"{image}: cannot read image" in lines[0]
    assert f"{run / 'last.pt'} holds iteration 4; to continue: msattn train {recipe_path}" in lines[0]
    assert lines[0].endswith(f"--out {run} --resume")
    assert load_checkpoint(run / "last.pt")["iteration"] == 4

    image.write_bytes(good)
    code, out, err = run_cli("train", recipe_path, "--out", run, "--device", "cpu", "--resume")
    assert code == 0, err
    assert "resumed from iteration 4" in out and "warning" not in out + err
    assert_same_weights(reference, run / "last.pt")


def test_a_full_disk_on_metrics_jsonl_keeps_the_finished_steps(data: Path, tmp_path: Path, run_cli,
                                                               monkeypatch) -> None:  # fmt: skip
    real_write = MetricsLog.write
    records = {"n": 0}

    def write(self, record):
        records["n"] += 1
        if records["n"] == 3:  # the log point at iteration 6
            raise OSError(28, "No space left on device", str(self.out_dir / "metrics.jsonl"))
        return real_write(self, record)

    monkeypatch.setattr(MetricsLog, "write", write)
    recipe = write_recipe(tmp_path / "r.toml", data, model={"scales": [1.0]},
                          train={"iterations": 8, "log_every": 2, "checkpoint_every": 4})  # fmt: skip
    run = tmp_path / "run"
    code, _, err = run_cli("train", recipe, "--out", run, "--device", "cpu")
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("msattn: error: training stopped after iteration 6 of 8: ")
    assert f"{run / 'metrics.jsonl'}: no space left on device; {run / 'last.pt'} holds iteration 6" in line
    assert load_checkpoint(run / "last.pt")["iteration"] == 6


def test_an_exception_in_the_final_validation_keeps_every_step(data: Path, tmp_path: Path, monkeypatch) -> None:
    """Before the fix the validation at the last iteration ran before its checkpoint: all 6 steps were lost."""

    def broken(*args, **kwargs):
        raise ValueError("prediction shape (1, 32, 32) != label shape (1, 30, 32)")

    monkeypatch.setattr(msattn.train.report, "evaluate_model", broken)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, train={"iterations": 6, "eval_at_end": True}),
                         ["model.scales=[1.0]"])  # fmt: skip
    with pytest.raises(TrainingError, match=r"after iteration 6 of 6: ValueError: prediction shape") as stopped:
        train(recipe, tmp_path / "run", device="cpu")
    assert isinstance(stopped.value.__cause__, ValueError) and stopped.value.exit_code == 1
    assert "last.pt holds iteration 6" in str(stopped.value)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 6


def test_keyboard_interrupt_saves_last_pt_and_says_how_to_resume(data: Path, tmp_path: Path, run_cli,
                                                                 monkeypatch) -> None:  # fmt: skip
    real_loss = msattn.train.loop.segmentation_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5 * 2 + 1:  # first micro-batch of iteration 6
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", loss)
    recipe = write_recipe(tmp_path / "r.toml", data, train={"iterations": 8, "checkpoint_every": 4})
    run = tmp_path / "run"
    code, _, err = run_cli("train", recipe, "--out", run, "--device", "cpu")
    assert code == 130
    line = err.strip().splitlines()[-1]
    assert line.startswith("msattn: error: training stopped after iteration 5 of 8: interrupted; ")
    assert f"{run / 'last.pt'} holds iteration 5; to continue: msattn train" in line
    assert load_checkpoint(run / "last.pt")["iteration"] == 5


def test_a_failure_in_the_first_step_writes_nothing_and_wraps_nothing(data: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:  # fmt: skip
    def loss(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", loss)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data))
    with pytest.raises(RuntimeError, match="^boom$"):
        train(recipe, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


#: the CLI with a hook that creates ``marker`` at the n-th loss call and goes on
MARKED = """
import sys
marker, n = sys.argv[1], int(sys.argv[2])
import msattn.train.loop
real_loss, calls = msattn.train.loop.segmentation_loss, [0]
def loss(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        open(marker, "w").close()
    return real_loss(*args, **kwargs)
msattn.train.loop.segmentation_loss = loss
from msattn.cli.app import main
main(sys.argv[3:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_step_finishes_the_step_saves_it_and_resume_is_exact(sig, data: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.toml", data, model={"dropout": 0.5}, data={"flip": True},
                          optim={"schedule": "step"},  # the lr does not depend on train.iterations
                          train={"iterations": 400, "checkpoint_every": 0, "log_every": 50})  # fmt: skip
    args = ["train", str(recipe), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    marker, run = tmp_path / "marker", tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", MARKED, str(marker), "7", *args, "--out", str(run)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)  # during iteration 4 (loss call 7 of 2 a step) or a little later
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    saved = load_checkpoint(run / "last.pt")["iteration"]
    assert 4 <= saved < 400
    assert line.startswith(f"msattn: error: training stopped after iteration {saved} of 400: interrupted ({sig.name}); ")
    assert line.endswith(f"--out {run} --resume") and "Traceback" not in err

    # the rest of the run, resumed, against the same number of steps uninterrupted
    short = ["--set", f"train.iterations={saved + 2}"]
    for out, extra in ((tmp_path / "reference", []), (run, ["--resume"])):
        done = subprocess.run([sys.executable, "-m", "msattn.cli", *args, *short, "--out", str(out), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
    assert_same_weights(tmp_path / "reference" / "last.pt", run / "last.pt")


# ----------------------------------------------------------------------------- resume: exact, or refused by name


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_resume_after_a_failure_matches_an_uninterrupted_run(device: str, data: Path, tmp_path: Path,
                                                             monkeypatch) -> None:  # fmt: skip
    """Stopped mid-iteration 6 (no scheduled checkpoint since 0): the failure's last.pt resumes exactly."""
    recipe = noisy_recipe(tmp_path / "r.toml", data, deterministic=True)
    reference = train(recipe, tmp_path / "reference", device=device)
    real_loss = msattn.train.loop.segmentation_loss
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5 * 2 + 2:  # second micro-batch of iteration 6: the first one drew dropout masks
            raise OSError(5, "Input/output error")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", dying)
    with pytest.raises(TrainingError, match="after iteration 5 of 8: Input/output error"):
        train(recipe, tmp_path / "run", device=device)
    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", real_loss)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 5
    resumed = train(recipe, tmp_path / "run", resume=True, device=device)
    assert_same_weights(reference, resumed)


@pytest.mark.parametrize("device", DEVICES)
def test_a_short_run_extended_by_resume_matches_the_long_run(device: str, data: Path, tmp_path: Path) -> None:
    """4 iterations (validated and checkpointed at their end), then --resume to 8 == 8 at once.

    Before the fix the validation at the end of the short run advanced the RNG that draws dropout
    masks, so the continuation drew other masks than the 8-iteration run.
    """
    long = noisy_recipe(tmp_path / "long.toml", data, deterministic=True)
    reference = train(long, tmp_path / "reference", device=device)
    short = noisy_recipe(tmp_path / "short.toml", data, iterations=4, deterministic=True)
    train(short, tmp_path / "run", device=device)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["metrics"]["num_images"] == 2  # it did validate
    assert_same_weights(reference, train(long, tmp_path / "run", resume=True, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_checkpoints_carry_the_rng_of_every_cuda_device(data: Path, tmp_path: Path) -> None:
    recipe = noisy_recipe(tmp_path / "r.toml", data, iterations=2)
    state = load_checkpoint(train(recipe, tmp_path / "run", device="cuda"))
    rng = state["rng"]["per_rank"][0]
    assert len(rng["cuda_all"]) == torch.cuda.device_count()
    assert torch.equal(rng["cuda"], rng["cuda_all"][torch.cuda.current_device()])
    assert state["backends"]["device"] == "cuda"


def test_a_failed_resume_names_the_differing_keys_and_the_checkpoint(data: Path, tmp_path: Path, run_cli) -> None:
    recipe = write_recipe(tmp_path / "r.toml", data, train={"iterations": 2})
    run = tmp_path / "run"
    assert run_cli("train", recipe, "--out", run, "--device", "cpu")[0] == 0
    code, _, err = run_cli("train", recipe, "--out", run, "--device", "cpu", "--resume",
                           "--set", "model.scales=[1.0]", "--set", "model.merge=max")  # fmt: skip
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"msattn: error: {run / 'last.pt'}: cannot resume: the recipe differs from the checkpoint's")
    assert "model.scales ([1.0, 0.5] -> [1.0])" in line and 'model.merge ("attention" -> "max")' in line
    assert str(run / "config.json") in line


def test_resuming_with_more_iterations_under_poly_warns_about_the_schedule(data: Path, tmp_path: Path,
                                                                          capsys) -> None:  # fmt: skip
    short = load_recipe(write_recipe(tmp_path / "s.toml", data, train={"iterations": 2}, optim={"schedule": "poly"}))
    longer = load_recipe(write_recipe(tmp_path / "l.toml", data, train={"iterations": 4}, optim={"schedule": "poly"}))
    train(short, tmp_path / "run", device="cpu")
    capsys.readouterr()
    train(longer, tmp_path / "run", resume=True, device="cpu")
    out = capsys.readouterr().out
    assert f"warning: resuming {tmp_path / 'run' / 'last.pt'} with changed keys: train.iterations (2 -> 4); " in out
    assert "poly schedule now decays to 0 at iteration 4" in out


def test_a_checkpoint_that_is_not_a_run_state_is_refused_on_resume(data: Path, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, train={"iterations": 2}))
    last = train(recipe, tmp_path / "run", device="cpu")
    state = load_checkpoint(last)
    del state["optimizer"]
    torch.save(state, last)
    with pytest.raises(CheckpointError, match=r"last.pt: cannot resume: the checkpoint does not match this recipe"):
        train(recipe, tmp_path / "run", resume=True, device="cpu")


def test_a_checkpoint_without_this_ranks_rng_resumes_with_a_warning(data: Path, tmp_path: Path, capsys) -> None:
    """A DDP checkpoint saved on a failure holds rank 0's RNG only: the other ranks reseed and say so."""
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, train={"iterations": 2}))
    last = train(recipe, tmp_path / "run", device="cpu")
    state = load_checkpoint(last)
    state["rng"]["per_rank"] = [None]
    torch.save(state, last)
    longer = load_recipe(write_recipe(tmp_path / "l.toml", data, train={"iterations": 3}))
    capsys.readouterr()
    assert load_checkpoint(train(longer, tmp_path / "run", resume=True, device="cpu"))["iteration"] == 3
    assert "without rank 0's RNG state: data order is exact, this rank's dropout masks are not" in capsys.readouterr().out
