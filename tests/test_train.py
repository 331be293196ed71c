"""Training engine on CPU with tiny models: loss goes down, resume is bit-for-bit, NaN stops cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import make_tiny_dataset, write_recipe

import msattn.train.loop
from msattn.config.recipe import load_recipe
from msattn.errors import ConfigError, TrainingError
from msattn.runtime.checkpoint import load_checkpoint
from msattn.train.loop import train
from msattn.train.step import lr_factor, optimizer_kernels
from msattn.train.stream import StreamSampler, epoch_order, split_batch


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_lowers_the_loss_and_writes_the_run_folder(tiny_data: Path, tmp_path: Path) -> None:
    recipe = load_recipe(
        write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 40, "log_every": 5, "val_every": 20,
                                                             "checkpoint_every": 10}),
        ["model.scales=[1.0]", "model.width=0.125", "optim.optimizer=adamw", "optim.lr=0.002"],
    )
    last = train(recipe, tmp_path / "run", device="cpu")
    run = tmp_path / "run"
    assert last == run / "last.pt"
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 8
    assert min(losses[-2:]) < 0.75 * losses[0], losses
    vals = [r for r in read_metrics(run) if "val_miou" in r]
    assert [r["iteration"] for r in vals] == [20, 40]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["scales"] == [1.0] and Path(config["data"]["root"]).is_absolute()
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["iteration"] == 40 and ckpt["dataset"]["classes"] == ["background", "red", "green"]
    assert ckpt["config"] == config
    assert not (run / "best.pt").exists()  # the paper reports the last iteration: no selection on val
    # the lr followed the poly schedule in every parameter group (x lr_mult)
    group = next(g for g in ckpt["optimizer"]["param_groups"] if g["name"] == "head_bias")
    assert group["lr"] == pytest.approx(0.002 * 20 * lr_factor(recipe)(40))
    assert not list(run.glob(".tmp-*"))


def test_best_checkpoint_is_chosen_on_a_held_out_split_and_last_is_scored(tiny_data: Path, tmp_path: Path) -> None:
    (tiny_data / "holdout.txt").write_text("train_000\ntrain_001\n")
    recipe = load_recipe(
        write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 8, "log_every": 4, "val_every": 4,
                                                             "eval_at_end": True}),
        ["model.scales=[1.0]", "data.select_split=holdout"],
    )
    run = tmp_path / "run"
    train(recipe, run, device="cpu")
    records = read_metrics(run)
    selects = [r for r in records if "select_miou" in r]
    vals = [r for r in records if "val_miou" in r]
    assert [r["iteration"] for r in selects] == [4, 8] and [r["iteration"] for r in vals] == [4, 8]
    best = load_checkpoint(run / "best.pt")
    assert best["best_miou"] == max(r["select_miou"] for r in selects)
    report = json.loads((run / "eval.json").read_text())
    assert report["checkpoint"].endswith("last.pt") and report["split"] == "val"
    assert report["best_checkpoint_selected_on"] == "holdout"
    assert report["miou"] == vals[-1]["val_miou"]


def test_select_split_must_differ_from_the_scored_split(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="held-out"):
        load_recipe(write_recipe(tmp_path / "r.toml", tiny_data), ["data.select_split=val"])


def test_refuses_to_overwrite_a_run_without_resume(tiny_data: Path, tmp_path: Path, run_cli) -> None:
    recipe = write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 1, "batch_size": 2},
                          model={"scales": [1.0]})
    assert run_cli("train", recipe, "--out", tmp_path / "run")[0] == 0
    code, _, err = run_cli("train", recipe, "--out", tmp_path / "run")
    assert code == 2 and "--resume" in err
    code, out, err = run_cli("train", recipe, "--out", tmp_path / "run", "--resume")
    assert code == 0, err
    assert "nothing to train" in out


class Interrupt(Exception):
    pass


def test_resume_after_interrupt_is_bit_for_bit(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """Kill a run after its checkpoint at iteration 3 (mid-way to 4), resume: same weights as an unbroken run.

    Dropout, random scaling, flips and two scales exercise every RNG the checkpoint must restore.
    """
    overrides = ["model.dropout=0.5", "data.scale_range=[0.7, 1.3]", "data.flip=true", "optim.schedule=step",
                 "optim.step_size=2", "optim.gamma=0.5"]
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 6,
                                                                             "checkpoint_every": 3}), overrides)
    full = train(recipe, tmp_path / "full", device="cpu")

    real_loss = msattn.train.loop.segmentation_loss
    calls = {"n": 0}

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 2 + 2:  # second micro-batch of iteration 4
            raise Interrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", dying_loss)
    with pytest.raises(TrainingError, match="last.pt holds iteration 3") as stopped:
        train(recipe, tmp_path / "broken", device="cpu")
    assert isinstance(stopped.value.__cause__, Interrupt)
    assert load_checkpoint(tmp_path / "broken" / "last.pt")["iteration"] == 3
    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", real_loss)
    resumed = train(recipe, tmp_path / "broken", resume=True, device="cpu")

    a, b = load_checkpoint(full), load_checkpoint(resumed)
    assert b["iteration"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    assert torch.equal(a["rng"]["per_rank"][0]["torch"], b["rng"]["per_rank"][0]["torch"])
    # metrics.jsonl of the resumed run has each iteration once
    iterations = [r["iteration"] for r in read_metrics(tmp_path / "broken") if "loss" in r]
    assert iterations == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r]
    assert losses == [r["loss"] for r in read_metrics(tmp_path / "broken") if "loss" in r]


def test_resume_takes_the_optimizer_kernels_of_this_device(tiny_data: Path, tmp_path: Path) -> None:
    """A checkpoint written on a GPU (fused optimizer groups) resumes on CPU with the CPU kernels, and back."""
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 2}), ["model.scales=[1.0]"])
    last = train(recipe, tmp_path / "run", device="cpu")
    ckpt = load_checkpoint(last)
    assert all(g["fused"] is None for g in ckpt["optimizer"]["param_groups"])
    for group in ckpt["optimizer"]["param_groups"]:
        group.update(optimizer_kernels(torch.device("cuda")))
    torch.save(ckpt, last)
    longer = load_recipe(write_recipe(tmp_path / "r4.toml", tiny_data, train={"iterations": 4}), ["model.scales=[1.0]"])
    resumed = load_checkpoint(train(longer, tmp_path / "run", resume=True, device="cpu"))
    assert resumed["iteration"] == 4
    assert all(g["fused"] is None and g["foreach"] is None for g in resumed["optimizer"]["param_groups"])
    assert optimizer_kernels(torch.device("cuda")) == {"fused": True, "foreach": None}


def test_nan_loss_saves_a_checkpoint_and_stops_with_a_clear_error(
    tiny_data: Path, tmp_path: Path, monkeypatch, run_cli
) -> None:
    real_loss = msattn.train.loop.segmentation_loss
    calls = {"n": 0}

    def nan_loss(*args, **kwargs):
        calls["n"] += 1
        total, terms = real_loss(*args, **kwargs)
        return (total * float("nan"), terms) if calls["n"] > 4 else (total, terms)

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", nan_loss)
    recipe = write_recipe(tmp_path / "r.toml", tiny_data, model={"scales": [1.0]})
    code, _, err = run_cli("train", recipe, "--out", tmp_path / "run")
    assert code == 1
    assert "loss became nan at iteration 3;" in err and "failed.pt" in err and "Traceback" not in err
    assert "optimizer state before that step" in err
    failed = load_checkpoint(tmp_path / "run" / "failed.pt")
    assert failed["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in failed["model"].values())


def test_nan_is_caught_at_the_next_log_point_with_the_state_before_the_bad_step(
    tiny_data: Path, tmp_path: Path, monkeypatch
) -> None:
    """The host looks at the loss only every log_every steps; updates after the bad step are skipped on the device."""
    overrides = ["model.scales=[1.0]", "optim.schedule=step", "optim.step_size=1000"]
    clean = load_recipe(write_recipe(tmp_path / "clean.toml", tiny_data, train={"iterations": 2}), overrides)
    train(clean, tmp_path / "clean", device="cpu")

    real_loss = msattn.train.loop.segmentation_loss
    calls = {"n": 0}

    def nan_from_iteration_3(*args, **kwargs):
        calls["n"] += 1
        total, terms = real_loss(*args, **kwargs)
        return (total * float("nan"), terms) if calls["n"] in (5, 6) else (total, terms)  # iteration 3 only

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", nan_from_iteration_3)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 8, "log_every": 5}),
                         overrides)
    with pytest.raises(TrainingError, match="loss became nan at iteration 3;"):
        train(recipe, tmp_path / "run", device="cpu")
    assert calls["n"] == 10  # it trained on to the log point at iteration 5, then stopped
    failed, reference = load_checkpoint(tmp_path / "run" / "failed.pt"), load_checkpoint(tmp_path / "clean" / "last.pt")
    assert failed["iteration"] == 2
    for key, value in reference["model"].items():
        assert torch.equal(value, failed["model"][key]), key
    for sa, sb in zip(reference["optimizer"]["state"].values(), failed["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing non-finite became a checkpoint


def test_train_compile_wraps_the_training_model_only(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """train.compile=true compiles the model used by the step (torch.compile is stubbed: no compile time in tests)."""
    compiled = []

    def fake_compile(module, *args, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 2}),
                         ["model.scales=[1.0]", "train.compile=true"])
    train(recipe, tmp_path / "run", device="cpu")
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "ScaleNet"
    assert all(not k.startswith("_orig_mod") for k in load_checkpoint(tmp_path / "run" / "last.pt")["model"])


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is an optional extra)."""

    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def test_tensorboard_gets_every_logged_scalar_and_purges_on_resume(tiny_data: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    import sys
    import types

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeSummaryWriter.instances.clear()
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 4, "log_every": 2,
                                                                             "checkpoint_every": 2}),
                         ["model.scales=[1.0]"])
    train(recipe, tmp_path / "run", device="cpu")
    first = FakeSummaryWriter.instances[0]
    assert first.log_dir == str(tmp_path / "run" / "tensorboard") and first.purge_step is None and first.closed
    losses = [(value, step) for tag, value, step in first.scalars if tag == "loss"]
    assert losses == [(r["loss"], r["iteration"]) for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert {"lr", "images_per_s", "memory_mb", "merged", "val_miou"} <= {tag for tag, _, _ in first.scalars}

    longer = load_recipe(write_recipe(tmp_path / "r6.toml", tiny_data, train={"iterations": 6, "log_every": 2}),
                         ["model.scales=[1.0]"])
    train(longer, tmp_path / "run", resume=True, device="cpu")
    second = FakeSummaryWriter.instances[1]
    assert second.purge_step == 4  # events a killed run wrote after the checkpoint are dropped
    assert [step for tag, _, step in second.scalars if tag == "loss"] == [6]


def test_stream_is_a_pure_function_of_seed_and_splits_across_ranks() -> None:
    def keys(world: int = 1, rank: int = 0, **kw):
        return [key for micro in StreamSampler(7, split_batch(4, 2, world), 3, rank=rank, **kw) for key in micro]

    whole = keys(start=0, stop=5)
    assert len(whole) == 20 and [k for k, _ in whole] == list(range(20))
    # every epoch visits each image once, in a seeded order
    assert sorted(i for k, i in whole if k < 7) == list(range(7))
    assert [i for k, i in whole if k < 7] == epoch_order(3, 0, 7).tolist()
    # a resumed stream is the suffix of the full one
    assert keys(start=2, stop=5) == whole[8:]
    # two ranks split each iteration's micro-batches between them
    rank0, rank1 = keys(start=0, stop=5, rank=0, world=2), keys(start=0, stop=5, rank=1, world=2)
    assert sorted(rank0 + rank1) == sorted(whole)
    assert rank0[:2] == whole[0:2] and rank1[:2] == whole[2:4]
    assert not np.array_equal(epoch_order(3, 0, 50), epoch_order(3, 1, 50))


def test_cli_train_runs_and_evaluate_at_end_prints_the_table(tiny_data: Path, tmp_path: Path, run_cli) -> None:
    recipe = write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 2, "eval_at_end": True},
                          model={"scales": [1.0]})
    code, out, err = run_cli("train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    assert "mean IoU" in out and "green" in out and "outputs:" in out
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(report["per_class"]) == {"background", "red", "green"} and report["num_images"] == 4


def test_init_checkpoint_and_bad_device(tiny_data: Path, tmp_path: Path, run_cli) -> None:
    recipe = write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 1, "batch_size": 2},
                          model={"scales": [1.0]})
    assert run_cli("train", recipe, "--out", tmp_path / "a")[0] == 0
    code, out, err = run_cli("train", recipe, "--out", tmp_path / "b", "--set",
                             f"model.init_checkpoint={json.dumps(str(tmp_path / 'a' / 'last.pt'))}")
    assert code == 0, err
    assert "initialised" in out
    if not torch.cuda.is_available():
        code, _, err = run_cli("train", recipe, "--out", tmp_path / "c", "--device", "cuda")
        assert code == 2 and "CUDA is not available" in err


def test_pool5a_can_be_switched_off_for_ablations(tiny_data: Path, tmp_path: Path) -> None:
    from msattn.runtime.checkpoint import model_from_checkpoint

    recipe = write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 1, "batch_size": 2},
                          model={"scales": [1.0], "pool5a": False})
    state = load_checkpoint(train(load_recipe(recipe), tmp_path / "run", device="cpu"))
    assert state["model_args"]["pool5a"] is False and state["arch_version"] == 2
    assert "pool5a" not in model_from_checkpoint(state).backbone.features._modules
    assert load_recipe(write_recipe(tmp_path / "d.toml", tiny_data)).model.pool5a is True


def test_extra_supervision_weight_reaches_the_training_loss(tiny_data: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 2, "batch_size": 2, "log_every": 1},
                          model={"scales": [1.0, 0.5], "extra_supervision_weight": 0.0})
    train(load_recipe(recipe), tmp_path / "run", device="cpu")
    logged = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(logged) == 2 and all(r["scale_0.5"] > 0 for r in logged)
    assert all(r["loss"] == pytest.approx(r["merged"]) for r in logged)  # per-scale terms logged, not added


def test_a_sample_of_every_split_is_checked_before_the_first_step(tmp_path: Path, run_cli) -> None:
    from PIL import Image

    data = make_tiny_dataset(tmp_path / "tiny")
    bad = np.array(Image.open(data / "labels" / "val_001.png"))
    bad[5, 5] = 7  # a class index the 3-class dataset does not have
    Image.fromarray(bad).save(data / "labels" / "val_001.png")
    recipe = write_recipe(tmp_path / "r.toml", data, train={"iterations": 2, "batch_size": 2})
    code, _, err = run_cli("train", recipe, "--out", tmp_path / "run")
    assert code == 2 and "check-data" in err and "val_001" in err
    assert not (tmp_path / "run").exists()  # stopped before writing anything
    code, _, err = run_cli("train", recipe, "--out", tmp_path / "run2", "--set", "data.check=off")
    assert code != 0 and "val_001" in err  # found only when validation reads it, after training
