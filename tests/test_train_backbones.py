"""Training learns about backbones: initial weights of every backbone, their input normalisation, the Caffe
ResNet layout kept on resume, BatchNorm modes (frozen with random weights, sync under torchrun), weight names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _timm_helpers import FakeTimm
from engine_helpers import make_tiny_dataset, write_recipe
from rich.console import Console

from msattn.config.recipe import load_recipe
from msattn.errors import ConfigError, UsageError
from msattn.models.caffe import FORMAT as CONVERTED_FORMAT
from msattn.models.resnet import ResNetTrunk
from msattn.runtime.checkpoint import load_checkpoint
from msattn.runtime.distributed import DistInfo
from msattn.train.loop import train
from msattn.train.setup import check_sync_batchnorm, dry_run_report, resolve_paths, wrap_for_training
from msattn.train.weights import load_initial_weights, resolve_input_norm

TINY_RESNET = {"backbone": "resnet50", "aspp_dilations": [1, 2], "scales": [1.0]}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=4, num_val=2)


def caffe_resnet_file(path: Path) -> Path:
    """An ``msattn convert-weights`` file of a DeepLab-v2 ResNet-50 (Caffe layout) at width 1/16."""
    torch.manual_seed(5)
    trunk = ResNetTrunk("resnet50", 1 / 16, "frozen", stride_in_1x1=True)
    with torch.no_grad():
        for name, tensor in trunk.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
    state = {f"trunk.{k}": v for k, v in trunk.state_dict().items()}
    torch.save({"format": CONVERTED_FORMAT, "format_version": 1, "backbone": "resnet50", "input_norm": "caffe",
                "stride_in_1x1": True, "state_dict": state}, path)  # fmt: skip
    return path


def test_a_resumed_run_keeps_the_caffe_stride_layout_of_its_weights(data: Path, tmp_path: Path) -> None:
    """Converted DeepLab-v2 weights put a block's stride in its 1x1 convolution: the run builds that layout, and
    so must --resume (built from the recipe alone it took torchvision's layout, same shapes, other numbers)."""
    weights = caffe_resnet_file(tmp_path / "init.pt")
    step = {"schedule": "step"}  # the lr of a step does not depend on the run's length
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, model={**TINY_RESNET, "pretrained": str(weights)},
                                      train={"iterations": 2, "checkpoint_every": 1}, optim=step))  # fmt: skip
    full = load_checkpoint(train(recipe, tmp_path / "full", device="cpu"))
    assert full["model_args"]["stride_in_1x1"] is True and full["dataset"]["input_norm"] == "caffe"
    short = load_recipe(write_recipe(tmp_path / "s.toml", data, model={**TINY_RESNET, "pretrained": str(weights)},
                                     train={"iterations": 1, "checkpoint_every": 1}, optim=step))  # fmt: skip
    train(short, tmp_path / "run", device="cpu")
    resumed = load_checkpoint(train(recipe, tmp_path / "run", resume=True, device="cpu"))
    assert resumed["model_args"]["stride_in_1x1"] is True
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_pretrained_names_of_another_backbone_are_refused(data: Path, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, model={**TINY_RESNET, "pretrained": "efficientnet_lite0"}))
    with pytest.raises(UsageError, match='model.pretrained = "efficientnet_lite0" names weights for another backbone '
                                         'than resnet50; for resnet50 use "torchvision" or "imagenet"'):  # fmt: skip
        load_initial_weights(recipe)


def test_timm_weights_bring_their_own_mean_and_std(data: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", FakeTimm())
    model = {"backbone": "timm:small", "aspp_dilations": [1, 2], "scales": [1.0], "pretrained": "timm", "width": 1.0}
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, model=model))
    initial = load_initial_weights(recipe)
    norm = resolve_input_norm(recipe, initial, warn=pytest.fail)
    assert (norm.name, norm.mean, norm.std) == ("custom", (0.5,) * 3, (0.5,) * 3)
    warnings: list[str] = []
    explicit = load_recipe(write_recipe(tmp_path / "e.toml", data, model={**model, "input_norm": "torchvision"}))
    assert resolve_input_norm(explicit, initial, warn=warnings.append).name == "torchvision"
    assert warnings == ["warning: model.input_norm = 'torchvision', but the initial weights expect mean [0.5, 0.5, "
                        "0.5] / std [0.5, 0.5, 0.5] inputs"]  # fmt: skip
    state = load_checkpoint(train(recipe, tmp_path / "run", device="cpu"))
    assert state["dataset"]["mean"] == [0.5] * 3 and state["dataset"]["input_norm"] == "custom"


def test_init_from_keeps_a_checkpoints_own_mean_and_std(data: Path, tmp_path: Path) -> None:
    """A checkpoint trained with data.mean/std ("custom") hands them on (before: auto fell back to torchvision)."""
    first = load_recipe(write_recipe(tmp_path / "a.toml", data, model={"scales": [1.0]},
                                     data={"mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3]},
                                     train={"iterations": 1}))  # fmt: skip
    ckpt = train(first, tmp_path / "a", device="cpu")
    second = load_recipe(write_recipe(tmp_path / "b.toml", data, model={"scales": [1.0], "init_from": str(ckpt)}))
    norm = resolve_input_norm(second, load_initial_weights(second), warn=pytest.fail)
    assert (norm.name, norm.mean, norm.std) == ("custom", (0.4,) * 3, (0.3,) * 3)


def test_frozen_batchnorm_with_random_weights_warns(data: Path, tmp_path: Path, run_cli) -> None:
    path = write_recipe(tmp_path / "r.toml", data, model=TINY_RESNET, train={"iterations": 1})
    warnings = dry_run_report(load_recipe(path), tmp_path / "run", console=Console(file=open("/dev/null", "w")))
    assert any('set model.batchnorm = "train"' in w for w in warnings), warnings
    code, out, err = run_cli("train", path, "--out", tmp_path / "run", "--device", "cpu")
    assert code == 0, err
    assert "BatchNorm layers stay the identity" in " ".join(out.split())
    trained = load_recipe(path, ["model.batchnorm=train"])
    assert not any("BatchNorm" in w for w in dry_run_report(trained, tmp_path / "r2", console=Console(file=open("/dev/null", "w"))))


def test_weight_names_are_not_paths(data: Path, tmp_path: Path) -> None:
    for backbone, name in (("efficientnet_lite0", "efficientnet_lite0"), ("timm:small", "timm"),
                           ("resnet50", "imagenet"), ("vgg16_largefov", "torchvision")):  # fmt: skip
        model = {"backbone": backbone, "pretrained": name, **({"width": 1.0} if backbone.startswith("timm") else {})}
        recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, model=model))
        assert resolve_paths(recipe).model.pretrained == name
        warnings = dry_run_report(recipe, tmp_path / "run", console=Console(file=open("/dev/null", "w")))
        assert not any("not found" in w for w in warnings), (backbone, warnings)


def test_sync_batchnorm_needs_cuda_ranks_and_is_converted_before_ddp(data: Path, tmp_path: Path, monkeypatch) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, model={**TINY_RESNET, "batchnorm": "sync"}))
    with pytest.raises(ConfigError, match='model.batchnorm = "sync": SyncBatchNorm runs on CUDA GPUs only, this run '
                                          'has 2 processes on cpu; use model.batchnorm = "train"'):  # fmt: skip
        check_sync_batchnorm(recipe, DistInfo(world_size=2))
    check_sync_batchnorm(recipe, DistInfo())  # one process: plain BatchNorm, nothing to synchronise
    from msattn.models.scale import build_model

    model = build_model(3, backbone="resnet50", width=1 / 16, batchnorm="sync")
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda module, device_ids=None: ("ddp", module))
    kind, wrapped = wrap_for_training(model, recipe.train, DistInfo(world_size=2))
    assert kind == "ddp" and any(isinstance(m, torch.nn.SyncBatchNorm) for m in wrapped.modules())
    assert set(wrapped.state_dict()) == set(build_model(3, backbone="resnet50", width=1 / 16, batchnorm="train").state_dict())
    plain = build_model(3, backbone="resnet50", width=1 / 16, batchnorm="train")
    _, unchanged = wrap_for_training(plain, recipe.train, DistInfo(world_size=2))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in unchanged.modules())


def test_config_json_records_the_backbone(data: Path, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.toml", data, model={**TINY_RESNET, "batchnorm": "train"},
                                      train={"iterations": 1}))  # fmt: skip
    train(recipe, tmp_path / "run", device="cpu")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["backbone"] == "resnet50" and config["model"]["batchnorm"] == "train"
