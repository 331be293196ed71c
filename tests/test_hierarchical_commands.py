"""Hierarchical attention through the commands: scales, evaluate, predict, analyze, export, bench, training set-up.

The model itself (the chain, its hand-made cases) is tests/test_hierarchical.py; here a tiny
hierarchical model trained on {1, 0.5} is run by every command on other scale lists, and each
result is checked against the model called directly on those scales.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from engine_helpers import CLASSES, make_tiny_dataset, save_tiny_checkpoint
from PIL import Image
from torch import nn

from msattn.analysis import run as analysis_run
from msattn.analysis.costs import method_flops
from msattn.analysis.methods import build_methods, forward_maps, own_method
from msattn.bench.measure import count_flops
from msattn.data.datasets import SegmentationFolder
from msattn.data.transforms import EvalTransform, normalize_image
from msattn.errors import UsageError
from msattn.export.graph import DeployGraph
from msattn.infer.forward import predict_batch, predict_probs
from msattn.infer.scales import resolve_scales
from msattn.models.scale import build_model
from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint
from msattn.runtime.distributed import DistInfo

TINY = 0.0625
THREE = (2.0, 1.0, 0.5)


def tiny(seed: int = 0, classes: int = 3, **kw) -> nn.Module:
    """A hierarchical model trained on {1, 0.5} whose gates spread over (0, 1) (not all near 0.5)."""
    torch.manual_seed(seed)
    model = build_model(classes, scales=(1.0, 0.5), merge="hierarchical", width=TINY, dropout=0.0, **kw).eval()
    with torch.no_grad():
        for p in model.gate.parameters():
            p.normal_(0, 1)
    return model


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=2, num_val=3, size=40)


@pytest.fixture(scope="module")
def checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "h.pt", tiny_data, merge="hierarchical",
                                mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])  # fmt: skip


# ----------------------------------------------------------------------------- --scales


def test_scales_need_one_and_are_kept_in_any_order() -> None:
    model = tiny()
    assert resolve_scales(None, model) == ((1.0, 0.5), None)  # the trained ones
    for given in ((2.0, 1.0, 0.5), (0.5, 2.0, 1.0), (1.0,), (1.0, 0.75, 0.5, 0.25)):
        assert resolve_scales(given, model) == (given, None)  # the weights come back in this order
    with pytest.raises(UsageError, match=r"--scales: a hierarchical model needs scale 1.0 among its scales .* add 1.0"):
        resolve_scales((2.0, 0.5), model)


def test_evaluate_takes_any_scales_with_one_and_refuses_others_in_one_line(checkpoint: Path, tmp_path: Path,
                                                                           run_cli) -> None:
    out = tmp_path / "e.json"
    code, _, err = run_cli("evaluate", "--checkpoint", checkpoint, "--scales", "2", "--scales", "1", "--scales",
                           "0.5", "--json", out, "--device", "cpu")  # fmt: skip
    assert code == 0, err
    assert json.loads(out.read_text())["scales"] == [2.0, 1.0, 0.5]
    code, _, err = run_cli("evaluate", "--checkpoint", checkpoint, "--scales", "2", "--scales", "0.5")
    assert code == 2 and "needs scale 1.0" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evaluate_scores_what_the_model_predicts_on_those_scales(checkpoint: Path, tiny_data: Path) -> None:
    from msattn.infer.options import InferenceOptions
    from msattn.infer.scoring import evaluate_model
    from msattn.runtime.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint).eval()
    dataset = SegmentationFolder(tiny_data, "val", transform=EvalTransform(mean=[0.5] * 3, std=[0.25] * 3))
    metrics = evaluate_model(model, dataset, num_classes=3, class_names=CLASSES, progress=False,
                             options=InferenceOptions(scales=THREE, batch_size=1))  # fmt: skip
    hits = total = 0
    for item in dataset:
        probs, _ = predict_probs(model, item["image"], scales=THREE)
        valid = item["label"] != 255
        hits += int(((probs.argmax(0) == item["label"]) & valid).sum())
        total += int(valid.sum())
    assert metrics["pixel_accuracy"] == pytest.approx(hits / total)


def test_predict_saves_the_chains_effective_weights_for_any_scales(checkpoint: Path, tmp_path: Path, run_cli) -> None:
    image = np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    (tmp_path / "in").mkdir()
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    code, _, err = run_cli("predict", tmp_path / "in", "--checkpoint", checkpoint, "--out", tmp_path / "o",
                           "--scales", "0.5", "--scales", "2", "--scales", "1", "--save-probs", "--save-attention",
                           "--device", "cpu")  # fmt: skip
    assert code == 0, err
    npz = np.load(tmp_path / "o" / "a.npz")
    np.testing.assert_allclose(npz["scales"], (0.5, 2.0, 1.0))
    attention = npz["attention"].astype(np.float32)
    assert attention.shape == (3, 37, 45) and attention.min() >= 0
    np.testing.assert_allclose(attention.sum(0), 1.0, atol=5e-3)  # the chain's weights sum to 1
    model = tiny_from(checkpoint)
    probs, weights = predict_probs(model, normalize_image(image, (0.5,) * 3, (0.25,) * 3), scales=(0.5, 2.0, 1.0))
    np.testing.assert_allclose(attention, weights.numpy(), atol=2e-3)  # in the order given
    np.testing.assert_allclose(npz["probs"].astype(np.float32), probs.numpy(), atol=2e-3)
    assert weights.std() > 0.01  # the map is not flat: the picture shows something
    for scale in ("0.5", "2.0", "1.0"):
        assert (tmp_path / "o" / f"a_attention_{scale}.png").is_file()
    assert (tmp_path / "o" / "a_attention.png").is_file()


def tiny_from(checkpoint: Path) -> nn.Module:
    from msattn.runtime.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(checkpoint), checkpoint).eval()


# ----------------------------------------------------------------------------- analyze


def test_every_subset_holding_one_is_a_method() -> None:
    keys = [m.key for m in build_methods((2.0, 1.0, 0.5), "hierarchical")]
    assert [k for k in keys if k.startswith("hierarchical")] == [
        "hierarchical:2+1", "hierarchical:1+0.5", "hierarchical:2+1+0.5"
    ]  # fmt: skip
    assert "hierarchical:2+0.5" not in keys and "attention:2+1+0.5" not in keys
    assert {"max:2+0.5", "avg:2+1+0.5", "oracle:2+1+0.5", "scale:0.5"} <= set(keys)


def test_each_subset_is_what_the_model_predicts_on_it_from_one_forward() -> None:
    model = tiny(seed=1)
    images, labels = torch.randn(2, 3, 41, 50), torch.randint(0, 3, (2, 41, 50))
    scales = (2.0, 1.0, 0.5, 0.25)
    methods = build_methods(scales, "hierarchical")
    own = own_method(scales, "hierarchical")
    calls = []
    model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    maps = forward_maps(model, images, labels, scales, methods, own)
    assert len(calls) == 1  # one forward for every subset
    subsets = [m for m in methods if m.merge == "hierarchical"]
    assert len(subsets) == 7 and own in subsets
    for method in subsets:
        probs, _ = predict_batch(model, images, scales=method.scales)
        assert torch.equal(maps.preds[method.key], probs.argmax(1)), method.key
    _, weights = predict_batch(model, images, scales=scales)
    torch.testing.assert_close(maps.weights, weights)  # the effective weights, at image size
    assert maps.score_gap is None  # a softmax head's statistic: none here


def test_analyze_reports_a_hierarchical_model_and_its_costs(tmp_path: Path) -> None:
    model = tiny(seed=2)
    items = [{"image": torch.randn(3, 33, 33), "label": torch.randint(0, 3, (33, 33)), "id": f"i{i}"} for i in range(3)]
    settings = analysis_run.Settings(batch_size=2, gallery=1, scales=THREE)
    args = model.model_args
    job = analysis_run.job_for_model(model, items, list(CLASSES), settings, torch.device("cpu"), model_args=args)
    state = analysis_run.run_pass(job, tmp_path, _quiet())  # was a KeyError in the calibration sums
    report = analysis_run.build_report(job, state, None)
    assert report["model"] == "hierarchical:2+1+0.5" and report["calibration"]["maps"]["hierarchical:2+1+0.5"]
    rows = {r["key"]: r for r in report["methods"]}
    assert rows["hierarchical:2+1+0.5"]["is_model"] and report["attention_by_class"] is not None
    assert report["size_bins"]["bins"] and report["attention_entropy"] is not None
    flops = {k: r["gflops"] for k, r in rows.items() if r["gflops"] is not None}
    assert flops["hierarchical:1+0.5"] < flops["hierarchical:2+1"] < flops["hierarchical:2+1+0.5"]
    x = torch.zeros(1, 3, 33, 33, device="meta")
    with torch.device("meta"):
        meta = build_model(model.spec).eval()
    with torch.inference_mode():
        expected = count_flops(lambda: meta(x, scales=THREE)) / 1e9
    assert method_flops(args, [job.own], {"33x33": 1})["hierarchical:2+1+0.5"] == pytest.approx(expected)


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


def test_analyze_cli_runs_on_the_recipes_eval_scales_and_refuses_lists_without_one(
    tiny_data: Path, tmp_path: Path, run_cli
) -> None:
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = build_model(3, scales=(1.0, 0.5), merge="hierarchical", width=TINY)
    meta = {"name": "tiny", "classes": CLASSES, "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0]], "ignore_index": 255,
            "root": str(tiny_data)}  # fmt: skip
    config = {"data": {"root": str(tiny_data)}, "model": {"scales": [1.0, 0.5], "merge": "hierarchical"},
              "eval": {"scales": [2.0, 1.0, 0.5]}}  # fmt: skip
    save_checkpoint(tmp_path / "h.pt", make_checkpoint(model, meta, config=config))
    code, _, err = run_cli("analyze", "--checkpoint", tmp_path / "h.pt", "--out", tmp_path / "rep", "--gallery", "1",
                           "--device", "cpu")  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["scales"] == [2.0, 1.0, 0.5] and report["model"] == "hierarchical:2+1+0.5"
    assert report["provenance"]["trained_scales"] == [1.0, 0.5]
    code, _, err = run_cli("analyze", "--checkpoint", tmp_path / "h.pt", "--out", tmp_path / "r2", "--scales", "2",
                           "--scales", "0.5")  # fmt: skip
    assert code == 2 and "needs scale 1.0" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("scales", [THREE, (1.0, 0.5), (0.5, 1.0, 0.75), (1.0,)])
def test_the_deploy_graph_is_the_chain(scales: tuple[float, ...]) -> None:
    model = tiny(seed=3, classes=5)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    graph = DeployGraph(model, scales, mean, std).eval()
    assert graph.merge == ("hierarchical" if len(scales) > 1 else "none")
    for h, w in ((1, 1), (17, 9), (61, 75)):
        images = np.random.default_rng(h + w).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        batch = torch.stack([normalize_image(img, mean, std) for img in images])
        probs, attention = predict_batch(model, batch, scales=scales)
        with torch.no_grad():
            outputs = graph(torch.from_numpy(images))
        torch.testing.assert_close(outputs[0], probs, rtol=0, atol=1e-5)
        if attention is not None:
            torch.testing.assert_close(outputs[1], attention, rtol=0, atol=1e-4)


def test_the_deploy_graph_refuses_scales_without_one() -> None:
    with pytest.raises(UsageError, match="needs scale 1.0"):
        DeployGraph(tiny(), (2.0, 0.5), (0.5,) * 3, (0.25,) * 3)


onnx_extra = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="optional extra msattn[export] (onnx, onnxscript, onnxruntime) is not installed",
)


@onnx_extra
@pytest.mark.slow
def test_onnx_export_with_the_inference_scales_built_in(tmp_path: Path, run_cli) -> None:
    from msattn.export.runtime import OnnxSession

    model = tiny(seed=4, classes=5)
    meta = {"name": "toy", "classes": list("abcde"), "palette": [[0, 0, 0]] * 5, "ignore_index": 255, "root": "",
            "mean": [0.5] * 3, "std": [0.25] * 3}  # fmt: skip
    save_checkpoint(tmp_path / "h.pt", make_checkpoint(model, meta, config={}))
    code, _, err = run_cli("export", "--checkpoint", tmp_path / "h.pt", "--out", tmp_path / "h.onnx", "--scales", "2",
                           "--scales", "0.5")  # fmt: skip
    assert code == 2 and "needs scale 1.0" in err and not (tmp_path / "h.onnx").exists()
    code, out, err = run_cli("export", "--checkpoint", tmp_path / "h.pt", "--out", tmp_path / "h.onnx", "--scales",
                             "2", "--scales", "1", "--scales", "0.5")  # fmt: skip
    assert code == 0, err
    assert "argmax agreement 100.00%" in out
    session = OnnxSession(tmp_path / "h.onnx")
    assert session.meta["msattn.merge"] == "hierarchical" and json.loads(session.meta["msattn.scales"]) == list(THREE)
    for i, (h, w) in enumerate(((1, 1), (33, 17), (70, 61))):
        images = np.random.default_rng(i).integers(0, 256, (1 + i % 2, h, w, 3), dtype=np.uint8)
        batch = torch.stack([normalize_image(img, (0.5,) * 3, (0.25,) * 3) for img in images])
        probs, attention = predict_batch(model, batch, scales=THREE)
        result = session.run(images)
        assert np.abs(result["probs"] - probs.numpy()).max() <= 1e-3
        assert (result["probs"].argmax(1) == probs.numpy().argmax(1)).mean() >= 0.999
        assert np.abs(result["attention"] - attention.numpy()).max() <= 1e-3


# ----------------------------------------------------------------------------- bench


def test_bench_cases_name_hierarchical_and_train_it_on_two_scales_only() -> None:
    from msattn.bench.cases import check_cases, parse_case, scale_merge_pairs

    assert parse_case("1,0.5:hierarchical") == ((1.0, 0.5), "hierarchical")
    assert parse_case("2,1,0.5:hierarchical") == ((2.0, 1.0, 0.5), "hierarchical")
    with pytest.raises(UsageError, match="needs scale 1.0"):
        parse_case("2,0.5:hierarchical")
    inference, train = scale_merge_pairs("inference"), scale_merge_pairs("train")
    assert ((1.0, 0.75, 0.5), "hierarchical") in inference and ((1.0, 0.75, 0.5), "hierarchical") not in train
    assert ((1.0, 0.5), "hierarchical") in train
    check_cases([((1.0, 0.75, 0.5), "hierarchical")], ["inference", "train"])  # inference runs it
    with pytest.raises(UsageError, match="trains on exactly two scales"):
        check_cases([((1.0, 0.75, 0.5), "hierarchical")], ["train"])


def test_bench_runs_hierarchical_inference_on_any_scales_and_training_on_its_pair(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code, stdout, err = run_cli("bench", "--width", "0.0625", "--iters", "1", "--warmup", "0", "--size", "33",
                                "--mode", "inference", "--mode", "train", "--case", "1", "--case", "1,0.5:hierarchical",
                                "--case", "2,1,0.5:hierarchical", "--case", "1,0.75,0.5:attention", "--json", out)
    assert code == 0, err
    records = json.loads(out.read_text())
    got = [(r["mode"], r["scales"], r["merge"], r.get("trained_scales")) for r in records]
    assert got == [
        ("inference", [1.0], None, None), ("inference", [1.0, 0.5], "hierarchical", [1.0, 0.5]),
        ("inference", [1.0, 0.75, 0.5], "attention", None),  # the standard cases first, in their order,
        ("inference", [2.0, 1.0, 0.5], "hierarchical", [1.0, 0.5]),  # then the others as given
        ("train", [1.0], None, None), ("train", [1.0, 0.5], "hierarchical", None),
        ("train", [1.0, 0.75, 0.5], "attention", None),
    ]  # fmt: skip
    flops = {(r["mode"], tuple(r["scales"])): r["gflops"] for r in records}
    assert flops[("inference", (1.0, 0.5))] < flops[("inference", (2.0, 1.0, 0.5))]  # the case's scales ran
    assert "hierarchical" in stdout


# ----------------------------------------------------------------------------- training set-up


@pytest.mark.parametrize(("batchnorm", "expected"), [("sync", nn.SyncBatchNorm), ("train", nn.BatchNorm2d)])
def test_under_torchrun_the_gates_batchnorm_is_synchronised_when_asked(monkeypatch, batchnorm, expected) -> None:
    from msattn.train import setup

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", lambda model, device_ids=None: model)
    model = build_model(3, scales=(1.0, 0.5), merge="hierarchical", width=TINY, backbone="resnet50",
                        batchnorm=batchnorm, aspp_dilations=(1, 2))  # fmt: skip
    before = {id(p) for p in model.parameters()}
    cfg = SimpleNamespace(compile=False)
    wrapped = setup.wrap_for_training(model, cfg, DistInfo(rank=0, world_size=2))
    assert wrapped is model and {id(p) for p in model.parameters()} == before  # the optimizer's parameters
    assert type(model.gate.bn1) is expected and type(model.gate.bn2) is expected
    single = build_model(3, scales=(1.0, 0.5), merge="hierarchical", width=TINY, backbone="resnet50",
                         batchnorm=batchnorm, aspp_dilations=(1, 2))  # fmt: skip
    setup.wrap_for_training(single, cfg, DistInfo())
    assert type(single.gate.bn1) is nn.BatchNorm2d  # one process: plain BatchNorm


@pytest.mark.parametrize("backbone", ["resnet50", "efficientnet_lite0"])
def test_every_backbone_chains_any_scales(backbone: str) -> None:
    kw = {"aspp_dilations": (1, 2)} if backbone == "resnet50" else {}
    model = tiny(backbone=backbone, **kw)
    out = model(torch.randn(1, 3, 41, 41), scales=THREE)
    assert out["out"].shape[-2:] == out["per_scale"][1].shape[-2:]  # the 1.0 grid
    torch.testing.assert_close(out["attention"].sum(1), torch.ones_like(out["attention"][:, 0]))
    assert model.gate.conv1.in_channels == model.backbone.feature_channels
