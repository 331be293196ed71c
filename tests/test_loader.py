"""The loader that keeps up: "auto" workers, uint8 batches normalised on the device (bit for bit), data wait."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

import msattn.data.transforms as transforms_module
from engine_helpers import make_tiny_dataset, write_recipe
from msattn.config import load_recipe
from msattn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CAFFE_MEAN, CAFFE_STD, TrainTransform, normalize_image
from msattn.engine.checkpoint import load_checkpoint
from msattn.engine.loader import (
    MAX_AUTO_WORKERS,
    DeviceBatches,
    measure_decode_rate,
    normalize_table,
    normalize_uint8,
    resolve_workers,
    train_workers,
)
from msattn.engine.train import train
from msattn.errors import ConfigError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


# ----------------------------------------------------------------------------- worker counts


def test_an_integer_is_taken_as_given() -> None:
    assert resolve_workers(3, CUDA, cpus=64).count == 3 and resolve_workers(0, CPU).count == 0


def test_auto_on_cpu_is_one_worker_when_a_cpu_is_spare() -> None:
    assert resolve_workers("auto", CPU, cpus=2, ranks=1).count == 1
    assert resolve_workers("auto", CPU, cpus=1, ranks=1).count == 0
    assert resolve_workers("auto", CPU, cpus=64, ranks=1).count == 1


def test_auto_on_cuda_uses_the_spare_cpus_of_this_rank_up_to_a_cap() -> None:
    assert resolve_workers("auto", CUDA, cpus=16, ranks=1).count == 15
    assert resolve_workers("auto", CUDA, cpus=16, ranks=2).count == 7  # CPUs shared by the node's ranks
    assert resolve_workers("auto", CUDA, cpus=1, ranks=1).count == 1
    assert resolve_workers("auto", CUDA, cpus=256, ranks=1).count == MAX_AUTO_WORKERS
    assert "15 loader worker(s) (16 CPUs)" in resolve_workers("auto", CUDA, cpus=16, ranks=1).reason


def test_auto_on_cuda_starts_no_more_workers_than_the_decode_rate_needs() -> None:
    slow = resolve_workers("auto", CUDA, cpus=16, ranks=1, decode_rate=lambda: 130.0, target=1000.0)
    assert slow.count == 8 and "one decodes + augments 130 img/s, 8 feed about 1040 img/s" in slow.reason
    fast = resolve_workers("auto", CUDA, cpus=16, ranks=1, decode_rate=lambda: 5000.0, target=1000.0)
    assert fast.count == 1
    starved = resolve_workers("auto", CUDA, cpus=4, ranks=1, decode_rate=lambda: 50.0, target=1000.0)
    assert starved.count == 3  # needs 20, has 3 spare CPUs
    unknown = resolve_workers("auto", CUDA, cpus=4, ranks=1, decode_rate=lambda: None)
    assert unknown.count == 3


def test_local_world_size_comes_from_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_workers("auto", CUDA, cpus=16).count == 3


@pytest.mark.parametrize("value", ["Auto", "8", True, -1.5, None])
def test_anything_else_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match='integer >= 0 or "auto"'):
        resolve_workers(value, CPU)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowDataset:
    """read_pair + transform that advance a fake clock by 10 ms per item."""

    def __init__(self, clock: FakeClock, n: int = 10) -> None:
        self.clock, self.n, self.seen = clock, n, []

    def __len__(self) -> int:
        return self.n

    def read_pair(self, index: int) -> tuple[int, int]:
        self.seen.append(index)
        return index, index

    def transform(self, image: int, label: int, rng: np.random.Generator) -> None:
        self.clock.now += 0.01


def test_the_decode_rate_is_timed_on_a_few_items() -> None:
    clock = FakeClock()
    data = SlowDataset(clock)
    assert measure_decode_rate(data, items=4, clock=clock) == pytest.approx(100.0)
    assert data.seen == [0, 1, 2, 3]
    assert measure_decode_rate(SlowDataset(clock, n=0), clock=clock) is None


def test_train_workers_measure_only_for_auto_on_cuda() -> None:
    data = SlowDataset(FakeClock())
    assert train_workers(2, data, CUDA).count == 2 and train_workers("auto", data, CPU).count <= 1
    assert data.seen == []  # nothing decoded: an integer, or CPU


# ----------------------------------------------------------------------------- uint8 batches


@pytest.mark.parametrize(("mean", "std"), [(IMAGENET_MEAN, IMAGENET_STD), (CAFFE_MEAN, CAFFE_STD)])
def test_the_table_normalises_exactly_like_normalize_image(mean: tuple, std: tuple) -> None:
    rng = np.random.default_rng(0)
    table = normalize_table(mean, std)
    assert table.shape == (3, 256) and table.dtype == torch.float32
    for h, w in ((1, 1), (7, 13), (33, 33), (61, 50)):
        images = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        expected = torch.stack([normalize_image(img, mean, std) for img in images])
        u8 = torch.from_numpy(images).permute(0, 3, 1, 2)
        assert torch.equal(normalize_uint8(u8, table), expected)


def _pair(seed: int, h: int, w: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    label = Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8), mode="L")
    return image, label


def test_uint8_batches_on_the_device_equal_the_float_batches_bit_for_bit() -> None:
    kwargs = {"crop_size": 33, "scale_range": (0.5, 1.5), "flip": True}
    floats, compact = TrainTransform(**kwargs), TrainTransform(**kwargs, output="uint8")
    pairs = [_pair(i, 40 + 3 * i, 29 + 5 * i) for i in range(4)]
    old = default_collate([dict(zip(("image", "label"), floats(*p, np.random.default_rng(k)))) for k, p in
                           enumerate(pairs)])
    new = default_collate([dict(zip(("image", "label"), compact(*p, np.random.default_rng(k)))) for k, p in
                           enumerate(pairs)])
    assert new["image"].dtype == torch.uint8 and new["label"].dtype == torch.uint8
    assert new["image"].element_size() * new["image"].numel() * 4 == old["image"].element_size() * old["image"].numel()
    moved = DeviceBatches([new], CPU, floats.mean, floats.std).__next__()
    assert torch.equal(moved["image"], old["image"]) and moved["image"].dtype == torch.float32
    assert torch.equal(moved["label"], old["label"]) and moved["label"].dtype == torch.int64
    assert "output='uint8'" in repr(compact)
    with pytest.raises(ValueError, match="output"):
        TrainTransform(crop_size=9, output="half")


def test_float_batches_pass_through_and_waits_are_counted() -> None:
    clock = FakeClock()
    batch = {"image": torch.zeros(1, 3, 2, 2), "label": torch.zeros(1, 2, 2, dtype=torch.int64), "id": ["a"]}

    def slow_loader():
        for wait in (0.5, 0.25):
            clock.now += wait
            yield batch

    batches = DeviceBatches(slow_loader(), CPU, IMAGENET_MEAN, IMAGENET_STD, clock=clock)
    first = next(batches)
    assert first["image"] is batch["image"] and first["id"] == ["a"]
    assert batches.take_wait() == pytest.approx(0.5) and batches.take_wait() == 0.0
    next(batches)
    with pytest.raises(StopIteration):
        next(batches)
    assert batches.take_wait() == pytest.approx(0.25)


def test_pinned_batches_from_a_loader_with_workers_arrive_intact(tmp_path: Path) -> None:
    from msattn.data.datasets import SegmentationFolder

    root = make_tiny_dataset(tmp_path / "d", num_train=4, num_val=1)
    data = SegmentationFolder(root, "train", transform=TrainTransform(25, None, flip=False, output="uint8"))
    loader = DataLoader(data, batch_size=2, num_workers=1)
    batch = next(DeviceBatches(loader, CPU, IMAGENET_MEAN, IMAGENET_STD))
    plain = SegmentationFolder(root, "train", transform=TrainTransform(25, None, flip=False))
    assert torch.equal(batch["image"][1], plain[1]["image"]) and torch.equal(batch["label"][1], plain[1]["label"])


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def test_training_logs_the_data_wait_share(tiny_data: Path, tmp_path: Path, run_cli) -> None:
    recipe = write_recipe(tmp_path / "r.toml", tiny_data, train={"iterations": 4, "log_every": 2},
                          model={"scales": [1.0]}, data={"workers": "auto"})
    code, out, err = run_cli("train", recipe, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    assert "data.workers = auto:" in out and "data wait" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait"] for r in records if "loss" in r]
    assert len(waits) == 2 and all(0.0 <= w <= 1.0 for w in waits)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["workers"] == "auto"


def test_training_weights_are_those_of_float_batches_bit_for_bit(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uint8 transport changes nothing: the same run with the workers normalising gives the same weights."""
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", tiny_data, data={"scale_range": [0.7, 1.3]}))
    compact = load_checkpoint(train(recipe, tmp_path / "uint8", device="cpu"))["model"]

    real = transforms_module.TrainTransform

    class FloatTransform(real):  # the data path before issue 18: normalised in the worker
        def __init__(self, *args, **kwargs) -> None:
            kwargs["output"] = "float"
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(transforms_module, "TrainTransform", FloatTransform)
    floats = load_checkpoint(train(recipe, tmp_path / "float", device="cpu"))["model"]
    assert compact.keys() == floats.keys()
    assert all(torch.equal(compact[k], floats[k]) for k in compact)
