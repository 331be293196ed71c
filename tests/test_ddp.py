"""DDP on CPU: two gloo processes with the same global batch match one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from engine_helpers import make_tiny_dataset, write_recipe

from msattn.config.recipe import load_recipe
from msattn.infer.files import Outputs
from msattn.infer.options import InferenceOptions
from msattn.locks import LOCK_NAME, OWNER_NAME, FolderBusyError, folder_lock
from msattn.runtime.checkpoint import load_checkpoint
from msattn.train.loop import train

CPU = InferenceOptions(device="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, *args, world: int = 2, timeout: float = 180.0) -> None:
    """Run ``fn(rank, world, port, *args)`` in ``world`` spawned processes; fail (not hang) after ``timeout`` s."""
    import time

    context = mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} ranks did not finish within {timeout:.0f} s (a collective waiting forever?)")


def _worker(rank: int, world: int, port: int, recipe_path: str, out: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    train(load_recipe(recipe_path), Path(out), device="cpu")


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "tiny", num_train=8, num_val=4)
    recipe_path = write_recipe(
        tmp_path / "r.toml", data,
        train={"iterations": 4, "batch_size": 4, "micro_batch": 2, "val_every": 2, "checkpoint_every": 2},
        model={"scales": [1.0, 0.5], "dropout": 0.0},
        data={"scale_range": [0.8, 1.2], "flip": True},
    )
    single = train(load_recipe(recipe_path), tmp_path / "single", device="cpu")
    spawn_ranks(_worker, str(recipe_path), str(tmp_path / "ddp"))
    a, b = load_checkpoint(single), load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert b["iteration"] == 4
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], rtol=1e-4, atol=1e-6), key
    assert not torch.equal(a["model"]["backbone.fc8.weight"], torch.zeros_like(a["model"]["backbone.fc8.weight"]))
    # one RNG state per rank, validation metrics reduced over both ranks' halves
    assert len(b["rng"]["per_rank"]) == 2
    assert b["metrics"]["num_images"] == 4
    assert b["metrics"]["pixels"] == a["metrics"]["pixels"]
    assert b["metrics"]["miou"] == pytest.approx(a["metrics"]["miou"], abs=1e-6)
    # only rank 0 wrote the run folder (tensorboard/ too where tensorboard is installed) and held its lock;
    # no best.pt without data.select_split
    written = {p.name for p in (tmp_path / "ddp").iterdir()} - {"tensorboard"}
    assert written == {"config.json", "last.pt", "metrics.jsonl", LOCK_NAME, OWNER_NAME}
    assert json.loads((tmp_path / "ddp" / OWNER_NAME).read_text())["command"] == "msattn.train.loop.train()"


def _busy_worker(rank: int, world: int, port: int, recipe_path: str, out: str) -> None:
    try:
        _worker(rank, world, port, recipe_path, out)
        message = "no error"
    except FolderBusyError as exc:
        message = str(exc)
    Path(out).parent.joinpath(f"busy{rank}.txt").write_text(message)


@pytest.mark.slow
def test_a_busy_run_folder_stops_every_rank_at_once(tmp_path: Path) -> None:
    """Rank 0 alone takes the lock; when it is held elsewhere every rank stops (none waits in a collective)."""
    data = make_tiny_dataset(tmp_path / "tiny", num_train=4, num_val=2)
    recipe_path = write_recipe(tmp_path / "r.toml", data, train={"iterations": 2, "batch_size": 4, "micro_batch": 2})
    with folder_lock(tmp_path / "run", "msattn train other.toml"):
        spawn_ranks(_busy_worker, str(recipe_path), str(tmp_path / "run"), timeout=120)
    messages = [(tmp_path / f"busy{r}.txt").read_text() for r in range(2)]
    assert all(f"{tmp_path / 'run'}: another command is writing this folder" in m for m in messages), messages
    assert all("msattn train other.toml" in m and f"process {os.getpid()}" in m for m in messages)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME, OWNER_NAME]


def _nan_worker(rank: int, world: int, port: int, recipe_path: str, out: str) -> None:
    """Rank 1 alone sees a NaN loss at iteration 2; every rank must stop with the same message."""
    import msattn.train.loop
    from msattn.errors import TrainingError

    real_loss = msattn.train.loop.segmentation_loss
    calls = {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        total, terms = real_loss(*args, **kwargs)
        return (total * float("nan"), terms) if rank == 1 and calls["n"] == 2 else (total, terms)

    msattn.train.loop.segmentation_loss = loss
    try:
        _worker(rank, world, port, recipe_path, out)
        message = "no error"
    except TrainingError as exc:
        message = str(exc)
    Path(out, f"rank{rank}.txt").write_text(message)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_state_before_it(tmp_path: Path) -> None:
    data = make_tiny_dataset(tmp_path / "tiny", num_train=8, num_val=4)
    recipe_path = write_recipe(
        tmp_path / "r.toml", data,
        train={"iterations": 4, "batch_size": 4, "micro_batch": 2, "log_every": 3},
        model={"scales": [1.0], "dropout": 0.0},
    )
    out = tmp_path / "ddp"
    out.mkdir()
    spawn_ranks(_nan_worker, str(recipe_path), str(out))
    messages = [(out / f"rank{r}.txt").read_text() for r in range(2)]
    assert all(m.startswith("loss became nan at iteration 2;") for m in messages), messages
    failed = load_checkpoint(out / "failed.pt")
    assert failed["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in failed["model"].values())
    assert not (out / "last.pt").exists()


def _eval_worker(rank: int, world: int, port: int, checkpoint: str, out: str) -> None:
    from msattn.infer.evaluate import evaluate_checkpoint

    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    evaluate_checkpoint(Path(checkpoint), CPU, json_path=Path(out))


@pytest.mark.slow
def test_evaluate_under_two_ranks_shards_the_images_and_matches_one_process(tmp_path: Path) -> None:
    import json

    data = make_tiny_dataset(tmp_path / "tiny", num_train=4, num_val=5)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, train={"iterations": 3}), ["eval.batch_size=1"])
    checkpoint = train(recipe, tmp_path / "run", device="cpu")
    from msattn.infer.evaluate import evaluate_checkpoint

    single = evaluate_checkpoint(checkpoint, CPU, json_path=tmp_path / "single.json")
    spawn_ranks(_eval_worker, str(checkpoint), str(tmp_path / "ddp.json"))
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["num_images"] == single["num_images"] == 5
    assert ddp["pixels"] == single["pixels"]  # both ranks' halves were counted, once each
    assert ddp["miou"] == pytest.approx(single["miou"], abs=1e-12)
    assert not list(tmp_path.glob(".tmp-*"))


def _predict_worker(rank: int, world: int, port: int, images: str, checkpoint: str, out: str) -> None:
    from msattn.infer.predict import predict_images

    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    counts = predict_images([Path(images)], Path(out), CPU, checkpoint=Path(checkpoint), resume=True,
                            outputs=Outputs(save_probs=True, save_attention=True))
    Path(out).parent.joinpath(f"counts{rank}.txt").write_text(str(counts))


@pytest.mark.slow
def test_predict_under_two_ranks_splits_the_images_and_writes_what_one_process_writes(tmp_path: Path) -> None:
    from msattn.infer.predict import predict_images

    data = make_tiny_dataset(tmp_path / "tiny", num_train=4, num_val=5)
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, train={"iterations": 2}))
    checkpoint = train(recipe, tmp_path / "run", device="cpu")
    images = data / "images"  # 9 images: 5 on rank 0, 4 on rank 1
    single = predict_images([images], tmp_path / "single", CPU, checkpoint=checkpoint,
                            outputs=Outputs(save_probs=True, save_attention=True))
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    for done in (tmp_path / "single").glob("val_000*"):  # every output of one image: resume skips it
        (ddp / done.name).write_bytes(done.read_bytes())
    (ddp / ".tmp-val_001.png.abc").write_bytes(b"left by a killed run")
    spawn_ranks(_predict_worker, str(images), str(checkpoint), str(ddp))
    assert single == {"written": 9, "failed": 0, "done": 0}
    expected = str({"written": 8, "failed": 0, "done": 1})  # totals over both ranks, on both ranks
    assert (tmp_path / "counts0.txt").read_text() == (tmp_path / "counts1.txt").read_text() == expected
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert sorted(p.name for p in ddp.iterdir()) == files  # every output once, no temporaries left
    for name in files:
        if name.endswith(".png") and "attention" not in name:
            assert (ddp / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


# ----------------------------------------------------------------------------- issue 27: the demo recipe as written

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.toml"


def demo_overrides(data: Path, iterations: int) -> list[str]:
    """recipes/demo.toml as written (batch 10, no micro_batch, AdamW, poly, eval at the end), tiny and short."""
    return [f"data.root={data}", "data.auto_prepare=none", "data.crop_size=33", "model.width=0.0625",
            f"train.iterations={iterations}", "train.log_every=1"]  # fmt: skip


def _demo_worker(rank: int, world: int, port: int, overrides: list[str], outs: list[str], resume: bool) -> None:
    """Rank r trains into outs[r]: ranks other than 0 may be given a folder of their own (another machine's view)."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    train(load_recipe(DEMO, overrides), Path(outs[min(rank, len(outs) - 1)]), resume=resume, device="cpu")


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _assert_same_weights(a: dict, b: dict) -> None:
    """Equal but for float rounding: the ranks' gradients are summed in another order than one process's, and
    AdamW's update of a near-zero gradient magnifies that (to a few 1e-6 here: under 1% of one step of lr 1e-3)."""
    for key, value in a["model"].items():
        assert torch.allclose(value, b["model"][key], rtol=1e-4, atol=2e-5), key


@pytest.mark.slow
def test_the_demo_recipe_on_two_then_three_processes_matches_one_process(tmp_path: Path) -> None:
    """Batch 10 over 2 processes (5 + 5), then resumed over 3 (4 + 3 + 3: it does not divide) from the 2-process
    last.pt: the same global batches, the same loss (a mean over each whole batch) and the same weights as one
    process. Ranks 1 and 2 of the resumed run see no run folder (as on machines without a shared file system)."""
    data = make_tiny_dataset(tmp_path / "tiny", num_train=12, num_val=4)
    single = tmp_path / "single"
    train(load_recipe(DEMO, demo_overrides(data, 2)), single, device="cpu")
    at_two = load_checkpoint(single / "last.pt")
    train(load_recipe(DEMO, demo_overrides(data, 4)), single, resume=True, device="cpu")

    ddp = tmp_path / "ddp"
    spawn_ranks(_demo_worker, demo_overrides(data, 2), [str(ddp)], False, world=2)
    two = load_checkpoint(ddp / "last.pt")
    assert two["iteration"] == 2 and len(two["rng"]["per_rank"]) == 2
    _assert_same_weights(at_two, two)

    elsewhere = [str(tmp_path / f"rank{r}-machine") for r in (1, 2)]
    spawn_ranks(_demo_worker, demo_overrides(data, 4), [str(ddp), *elsewhere], True, world=3)
    three = load_checkpoint(ddp / "last.pt")
    assert three["iteration"] == 4 and len(three["rng"]["per_rank"]) == 3
    _assert_same_weights(load_checkpoint(single / "last.pt"), three)
    assert _losses(ddp) == pytest.approx(_losses(single), rel=1e-5)  # iterations 1-4, reduced over the ranks
    assert three["metrics"]["miou"] == pytest.approx(load_checkpoint(single / "last.pt")["metrics"]["miou"], abs=1e-6)
    written = {p.name for p in ddp.iterdir()} - {"tensorboard"}
    assert written == {"config.json", "last.pt", "metrics.jsonl", "eval.json", LOCK_NAME, OWNER_NAME}
    assert not any(Path(p).exists() for p in elsewhere)  # ranks 1 and 2 neither read nor wrote a run folder


def _data_worker(rank: int, world: int, port: int, overrides: list[str], roots: list[str], out: str) -> None:
    from msattn.errors import DataError

    try:
        _demo_worker(rank, world, port, [*overrides, f"data.root={roots[rank]}"], [out], False)
        message = "no error"
    except DataError as exc:
        message = str(exc)
    Path(out).parent.joinpath(f"data{rank}.txt").write_text(message)


@pytest.mark.slow
def test_a_machine_without_the_dataset_folder_stops_every_rank_with_one_line(tmp_path: Path) -> None:
    """Rank 1 (another machine) lacks data.root's folder that rank 0 has: every rank stops before the first step."""
    data = make_tiny_dataset(tmp_path / "tiny", num_train=4, num_val=2)
    spawn_ranks(_data_worker, demo_overrides(data, 2), [str(data), str(tmp_path / "missing")], str(tmp_path / "run"),
                timeout=120)  # fmt: skip
    for rank in range(2):  # each names its own data.root: on real machines the same path
        message = (tmp_path / f"data{rank}.txt").read_text()
        assert f"no dataset folder on {socket.gethostname()} (rank(s) 1), though rank 0 has one" in message
        assert "every machine of a run reads data.root at the same path" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_readmes_torchrun_line_trains_the_demo_on_two_processes(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 -m msattn.cli train recipes/demo.toml` (torch's own launcher, gloo on CPU),
    made tiny with --set; a free port instead of torchrun's default 29500, which a parallel run may hold."""
    import subprocess
    import sys

    data = make_tiny_dataset(tmp_path / "tiny", num_train=10, num_val=2)
    sets = [word for o in demo_overrides(data, 2) for word in ("--set", o)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
               "-m", "msattn.cli", "train", "recipes/demo.toml", *sets, "--out", str(tmp_path / "run"),
               "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, cwd=DEMO.parents[1], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("batch 10 over 2 processes, 1 micro-batch each: ranks 0-1 take 5 images") == 1
    assert "Traceback" not in done.stderr
    assert load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 2
    assert (tmp_path / "run" / "eval.json").is_file()
