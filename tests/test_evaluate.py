"""Evaluation: full-resolution scoring by hand, the CLI's JSON and table, option errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import CLASSES, make_tiny_dataset, save_tiny_checkpoint
from torch import nn

from msattn.data.datasets import SegmentationFolder
from msattn.infer.forward import predict_batch
from msattn.infer.options import InferenceOptions
from msattn.infer.scoring import evaluate_model
from msattn.models.scale import build_model
from msattn.runtime.checkpoint import make_checkpoint, save_checkpoint
from msattn.runtime.distributed import DistInfo


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=2, num_val=4)


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", tiny_data,
                                mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])  # fmt: skip


class ColourModel(nn.Module):
    """Predicts by colour at output stride 8: red-ish -> 1, green-ish -> 2, else 0 (a known answer)."""

    def forward(self, images: torch.Tensor, scales=None) -> dict:
        small = nn.functional.avg_pool2d(images, 8, ceil_mode=True)  # [N, 3, h, w]
        r, g = small[:, 0], small[:, 1]
        logits = torch.stack([torch.full_like(r, 0.5), r - g, g - r], dim=1) * 10
        return {"out": logits}


class ConstantModel(nn.Module):
    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, images: torch.Tensor, scales=None) -> dict:
        n, _, h, w = images.shape
        logits = torch.zeros(n, 3, (h + 7) // 8, (w + 7) // 8)
        logits[:, self.cls] = 1.0
        return {"out": logits}


def test_constant_prediction_scores_as_computed_by_hand(tiny_data: Path) -> None:
    dataset = SegmentationFolder(tiny_data, "val")
    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    valid = labels != 255
    metrics = evaluate_model(ConstantModel(1), dataset, num_classes=3, class_names=CLASSES, progress=False)
    red = ((labels == 1) & valid).sum().item()
    assert metrics["pixel_accuracy"] == pytest.approx(red / valid.sum().item())
    assert metrics["per_class"]["red"] == pytest.approx(red / valid.sum().item())
    assert metrics["per_class"]["background"] == 0.0 and metrics["per_class"]["green"] == 0.0
    assert metrics["miou"] == pytest.approx(metrics["per_class"]["red"] / 3)
    assert metrics["num_images"] == 4 and metrics["pixels"] == valid.sum().item()


def test_full_resolution_batching_flip_and_limit(tiny_data: Path) -> None:
    dataset = SegmentationFolder(tiny_data, "val")
    one = evaluate_model(ColourModel(), dataset, num_classes=3, progress=False)
    assert one["miou"] > 0.5  # the colour rule is right away from rectangle borders
    batched = evaluate_model(ColourModel(), dataset, num_classes=3, options=InferenceOptions(batch_size=3), progress=False)
    assert batched["per_class"] == one["per_class"]
    flipped = evaluate_model(ColourModel(), dataset, num_classes=3, options=InferenceOptions(flip=True), progress=False)
    assert flipped["pixels"] == one["pixels"] and flipped["miou"] > 0.5
    limited = evaluate_model(ColourModel(), dataset, num_classes=3, limit=2, progress=False)
    assert limited["num_images"] == 2 and limited["pixels"] < one["pixels"]
    # two "ranks" see disjoint halves whose pixel counts add up
    halves = [
        evaluate_model(ColourModel(), dataset, num_classes=3, dist=DistInfo(rank=r, world_size=2), progress=False) for r in (0, 1)
    ]
    assert halves[0]["pixels"] + halves[1]["pixels"] == one["pixels"]


def test_predict_probs_are_full_size_distributions() -> None:
    images = torch.randn(2, 3, 37, 45)
    probs, _ = predict_batch(ColourModel(), images, flip=True)
    assert probs.shape == (2, 3, 37, 45)
    assert torch.allclose(probs.sum(1), torch.ones(2, 37, 45), atol=1e-5)


def test_cli_evaluate_writes_json_and_prints_the_table(tiny_checkpoint: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "scores.json"
    code, stdout, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--json", out, "--flip")
    assert code == 0, err
    result = json.loads(out.read_text())
    assert set(result) >= {"miou", "pixel_accuracy", "per_class", "num_images", "checkpoint", "scales", "flip"}
    assert list(result["per_class"]) == CLASSES and result["num_images"] == 4
    assert result["scales"] == [1.0, 0.5] and result["flip"] is True
    assert 0.0 <= result["miou"] <= 1.0
    assert "mean IoU" in stdout and "green" in stdout


def test_cli_evaluate_options(tiny_checkpoint: Path, tiny_data: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "s.json"
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--data", tiny_data, "--split", "train",
                           "--limit", "1", "--json", out)
    assert code == 0, err
    assert json.loads(out.read_text())["num_images"] == 1
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--scales", "1", "--scales", "0.75",
                           "--scales", "0.5")
    assert code == 2 and "trained on 2 scales" in err
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--data", tmp_path / "none")
    assert code == 2 and "dataset folder not found" in err
    code, _, err = run_cli("evaluate", "--checkpoint", tmp_path / "missing.pt")
    assert code == 2 and "checkpoint not found" in err


def test_cli_evaluate_batch_size_workers_and_amp_do_not_change_the_scores(
    tiny_checkpoint: Path, tmp_path: Path, run_cli, monkeypatch
) -> None:
    import msattn.infer.evaluate as evaluate_module

    seen = []
    real = evaluate_module.evaluate_model

    def spy(model, dataset, num_classes, names, ignore_index, options, **kwargs):
        seen.append((options.batch_size, kwargs["workers"], options.amp_dtype(torch.device("cpu"))))
        return real(model, dataset, num_classes, names, ignore_index, options, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_model", spy)
    results = []
    for options in ([], ["--batch-size", "3", "--workers", "1", "--no-amp"]):
        out = tmp_path / f"s{len(results)}.json"
        code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--json", out, "--device", "cpu", *options)
        assert code == 0, err
        results.append(json.loads(out.read_text()))
    assert seen == [(1, 0, None), (3, 1, None)]  # defaults (this checkpoint has no recipe), then the CLI's
    assert results[0]["miou"] == pytest.approx(results[1]["miou"], abs=1e-12)
    assert results[0]["per_class"] == pytest.approx(results[1]["per_class"], abs=1e-12, nan_ok=True)
    assert results[0]["amp"] == results[1]["amp"] == "off"  # bf16 autocast is CUDA-only
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--batch-size", "0")
    assert code == 2 and "batch-size" in err


def test_cli_evaluate_with_crf(tiny_checkpoint: Path, tmp_path: Path, run_cli) -> None:
    import pydensecrf.densecrf  # noqa: F401  (a required dependency: missing is a failure, not a skip)
    out = tmp_path / "crf.json"
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--crf", "--limit", "2", "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["crf"] is True and result["num_images"] == 2


def test_an_architecture_1_checkpoint_loads_without_pool5a_and_warns(tiny_data: Path, tmp_path: Path, run_cli) -> None:
    torch.manual_seed(0)
    old = build_model(3, scales=(1.0, 0.5), merge="attention", width=0.0625, pool5a=False)
    meta = {"name": "tiny", "classes": CLASSES, "palette": [[0, 0, 0], [128, 0, 0], [0, 128, 0]],
            "ignore_index": 255, "root": str(tiny_data), "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    state = make_checkpoint(old, meta, config={}, iteration=0)
    del state["arch_version"]  # what msattn 0.1 wrote: no architecture version, no pool5a argument
    for key in ("pool5a", "attention_dropout"):
        del state["model_args"][key]
    path = tmp_path / "old.pt"
    save_checkpoint(path, state)
    from msattn.runtime.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(path))
    assert "pool5a" not in model.backbone.features._modules
    out = tmp_path / "s.json"
    code, _, err = run_cli("evaluate", "--checkpoint", path, "--json", out)
    assert code == 0, err
    assert "architecture 1" in err and "pool5a" in err
    assert json.loads(out.read_text())["arch_version"] == 1
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint_path(tiny_data, tmp_path), "--json", out)
    assert code == 0 and "architecture 1" not in err and json.loads(out.read_text())["arch_version"] == 2


def tiny_checkpoint_path(tiny_data: Path, tmp_path: Path) -> Path:
    model = build_model(3, scales=(1.0,), width=0.0625)
    meta = {"name": "tiny", "classes": CLASSES, "ignore_index": 255, "root": str(tiny_data)}
    path = tmp_path / "new.pt"
    save_checkpoint(path, make_checkpoint(model, meta, config={}, iteration=0))
    return path


def test_cli_evaluate_pad_to_is_deeplabs_protocol(tiny_checkpoint: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "s.json"
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--pad-to", "65", "--json", out)
    assert code == 0, err
    padded = json.loads(out.read_text())
    assert padded["pad_to"] == 65
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--json", out)
    assert code == 0 and json.loads(out.read_text())["pad_to"] is None
    code, _, err = run_cli("evaluate", "--checkpoint", tiny_checkpoint, "--pad-to", "64")
    assert code == 2 and "8k+1" in err
