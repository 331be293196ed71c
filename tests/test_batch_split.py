"""The global batch over processes and micro-batches (issue 27): how it is split, what each rank reads, and a
step's loss that does not depend on the split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_helpers import make_tiny_dataset, write_recipe

from msattn.errors import ConfigError
from msattn.models.loss import segmentation_loss
from msattn.models.scale import build_model
from msattn.runtime.distributed import DistInfo
from msattn.train.step import NonFiniteGuard, train_step
from msattn.train.stream import StreamSampler, split_batch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("batch", "cap", "world", "sizes"),
    [
        (10, 10, 1, [[10]]),
        (10, 10, 2, [[5], [5]]),  # the demo over 2 processes
        (10, 10, 3, [[4], [3], [3]]),  # ... over 3: the first batch % world ranks take one more
        (30, 10, 1, [[10, 10, 10]]),  # the paper's 3 x 10
        (30, 10, 3, [[10], [10], [10]]),
        (30, 10, 4, [[8], [8], [7], [7]]),  # README's voc.toml line on 4 GPUs
        (30, 10, 6, [[5]] * 6),
        (30, 10, 2, [[8, 7], [8, 7]]),  # the fewest passes within the cap, as even as possible
        (30, 5, 2, [[5, 5, 5], [5, 5, 5]]),
        (30, 8, 1, [[8, 8, 7, 7]]),
        (7, 2, 2, [[2, 2], [2, 1]]),
    ],
)
def test_the_batch_is_dealt_out_evenly_in_the_same_number_of_passes_per_rank(
    batch: int, cap: int, world: int, sizes: list[list[int]]
) -> None:
    split = split_batch(batch, cap, world)
    assert [list(s) for s in split.sizes] == sizes
    assert split.accumulation == len(sizes[0]) and split.world == world


def test_the_split_is_described_in_one_line() -> None:
    assert split_batch(30, 10, 4).describe() == (
        "batch 30 over 4 processes, 1 micro-batch each: ranks 0-1 take 8 images, ranks 2-3 take 7 images"
    )
    assert split_batch(30, 10, 1).describe() == (
        "batch 30 over 1 process, 3 micro-batches (train.micro_batch: at most 10 images per pass): 10+10+10 images"
    )
    assert split_batch(7, 5, 2).describe().endswith(": rank 0 takes 4 images, rank 1 takes 3 images")


@pytest.mark.parametrize(
    ("batch", "cap", "world", "message"),
    [
        (2, 2, 3, "train.batch_size (2) is smaller than the number of processes (3): every process needs at least "
                  "one image per step; use train.batch_size >= 3 or fewer processes"),
        (5, 1, 4, "train.batch_size (5) does not split evenly over 4 processes, and with train.micro_batch = 1 the "
                  "processes with fewer images would run fewer forward passes; use train.batch_size = 4 or 8, or "
                  "train.micro_batch >= 2"),
    ],
)
def test_a_batch_that_cannot_be_dealt_out_is_refused_naming_what_can(batch, cap, world, message) -> None:
    with pytest.raises(ConfigError) as info:
        split_batch(batch, cap, world)
    assert str(info.value) == message


@pytest.mark.parametrize(("world", "cap"), [(2, 10), (3, 10), (4, 3), (3, 1), (1, 4)])
def test_every_split_reads_the_same_samples_in_each_iteration(world: int, cap: int) -> None:
    """The stream is a function of the iteration: the ranks' micro-batches together are the one-process batch."""
    whole = [micro for micro in StreamSampler(7, split_batch(12, 12, 1), seed=3, start=0, stop=4)]
    split = split_batch(12, cap, world)
    ranks = [list(StreamSampler(7, split, seed=3, start=0, stop=4, rank=r)) for r in range(world)]
    for t in range(4):
        mine = [micro for r in range(world) for micro in ranks[r][t * split.accumulation:(t + 1) * split.accumulation]]
        assert all(len(micro) <= cap for micro in mine)
        assert sorted(key for micro in mine for key in micro) == whole[t]
    # a resumed stream is the suffix of the full one, on every rank
    assert list(StreamSampler(7, split, seed=3, start=2, stop=4, rank=world - 1)) == \
        ranks[world - 1][2 * split.accumulation:]  # fmt: skip


def _step(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    terms = train_step(
        model, micro_batches, optimizer=optimizer, scaler=torch.amp.GradScaler("cuda", enabled=False),
        guard=NonFiniteGuard(torch.device("cpu")), device=torch.device("cpu"), amp_dtype=None, channels_last=False,
        loss_fn=segmentation_loss, loss_options={"extra_supervision": True, "label_mode": "downsample",
                                                 "ignore_index": 255},
        scales=(1.0, 0.5), info=DistInfo(),
    )  # fmt: skip
    return {name: float(value) for name, value in terms.items()}


def _batch(sizes: list[int], images: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]]:
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [{"image": images[a:b], "label": labels[a:b]} for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("sizes", [[2, 2], [3, 1], [1, 1, 1, 1]])
def test_a_steps_loss_and_update_are_those_of_one_pass_over_the_whole_batch(sizes: list[int]) -> None:
    """However the batch is split into micro-batches, each loss term is its mean over the batch's valid pixels.

    The images ignore very different numbers of pixels, so a mean of the micro-batches' means (the
    earlier normalisation: each micro-batch / accumulation) would weigh them differently.
    """
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 33, 33, generator=generator)
    labels = torch.randint(0, 3, (4, 33, 33), generator=generator)
    labels[0, :28] = 255  # image 0: most pixels ignored
    labels[3, :, :10] = 255

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(3, scales=(1.0, 0.5), merge="attention", width=0.0625, dropout=0.0).train()

    one_pass, split = fresh(), fresh()
    expected = _step(one_pass, _batch([4], images, labels))
    got = _step(split, _batch(sizes, images, labels))
    for name in ("loss", "merged", "scale_1", "scale_0.5"):
        assert got[name] == pytest.approx(expected[name], rel=1e-5), name
    for name, value in one_pass.state_dict().items():
        torch.testing.assert_close(split.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_dry_run_under_torchrun_splits_the_batch_over_its_processes(tmp_path: Path, run_cli, monkeypatch) -> None:
    """WORLD_SIZE from torchrun: the same split and the same refusal as a real start; rank 0 alone prints."""
    data = make_tiny_dataset(tmp_path / "tiny", num_train=4, num_val=2)
    demo = ROOT / "recipes" / "demo.toml"
    args = ["train", demo, "--dry-run", "--out", tmp_path / "run", "--set", f"data.root={data}"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "batch 10 over 4 processes, 1 micro-batch each: ranks 0-1 take 3 images, ranks 2-3 take 2 images" in err
    monkeypatch.setenv("RANK", "3")
    code, out, err = run_cli(*args)
    assert code == 0 and out == "" and err == ""
    monkeypatch.setenv("WORLD_SIZE", "12")
    code, _, err = run_cli(*args)
    assert code == 2 and "train.batch_size (10) is smaller than the number of processes (12)" in err


def test_micro_batch_is_a_cap_not_a_divisor(tmp_path: Path, run_cli) -> None:
    """train.micro_batch no longer has to divide train.batch_size: 7 images in passes of at most 5 are 4 + 3."""
    recipe = write_recipe(tmp_path / "r.toml", tmp_path / "none", train={"batch_size": 7, "micro_batch": 5})
    code, out, err = run_cli("train", recipe, "--dry-run", "--out", tmp_path / "run")
    assert code == 0, err
    assert "batch 7 over 1 process, 2 micro-batches (train.micro_batch: at most 5 images per pass): 4+3 images" in err


def test_a_run_resumed_with_another_micro_batch_continues_as_the_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped after iteration 2 of batch 4 in passes of 2, resumed in passes of 1: the same batches and loss."""
    import msattn.train.loop
    from msattn.config.recipe import load_recipe
    from msattn.runtime.checkpoint import load_checkpoint
    from msattn.train.loop import train

    data = make_tiny_dataset(tmp_path / "tiny", num_train=6, num_val=2)
    path = write_recipe(tmp_path / "r.toml", data, train={"iterations": 4, "checkpoint_every": 2})
    full = load_checkpoint(train(load_recipe(path), tmp_path / "full", device="cpu"))

    real_loss, calls = msattn.train.loop.segmentation_loss, {"n": 0}

    def stop_in_iteration_3(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 1:
            raise RuntimeError("stopped for the test")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", stop_in_iteration_3)
    with pytest.raises(Exception, match="stopped for the test"):
        train(load_recipe(path), tmp_path / "run", device="cpu")
    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", real_loss)
    capsys.readouterr()
    resumed = load_checkpoint(train(load_recipe(path, ["train.micro_batch=1"]), tmp_path / "run", resume=True,
                                    device="cpu"))  # fmt: skip
    out = capsys.readouterr().out
    assert "with changed keys: train.micro_batch (2 -> 1); the batches are only split into other forward passes" in out
    assert "4 micro-batches (train.micro_batch: at most 1 image per pass): 1+1+1+1 images" in out
    assert resumed["iteration"] == 4
    for key, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
