"""evaluate / predict with CUDA graphs switched on, on CPU: the policy is forced on and capture is a stand-in.

This runs the real commands through their CUDA-graph path (size buckets, batching of one
bucket's images, cropping back, the one-line report), without a GPU and without torch.compile.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _graph_helpers import static_capture
from engine_helpers import make_tiny_dataset, save_tiny_checkpoint
from PIL import Image

import msattn.infer.graphs as graphs_module


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", num_train=2, num_val=4)


@pytest.fixture(scope="module")
def checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", tiny_data,
                                mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])  # fmt: skip


@pytest.fixture
def graphs_on(monkeypatch: pytest.MonkeyPatch) -> list:
    """Force the graph policy on (as on CUDA) and capture with the CPU stand-in; returns the captured keys."""
    keys: list = []
    real_policy = graphs_module.graph_policy

    def policy(device, compile_graphs=True, bucket=None):
        return real_policy(torch.device("cuda"), compile_graphs, bucket)  # as on CUDA (and --bucket checked)

    def capture(self, key, example):
        return static_capture(self, keys)(key, example)

    monkeypatch.setattr(graphs_module, "graph_policy", policy)
    monkeypatch.setattr(graphs_module.InferenceRunner, "_capture_cuda", capture)
    return keys


def test_evaluate_with_graphs_scores_like_eager_on_the_bucket(
    checkpoint: Path, tmp_path: Path, run_cli, graphs_on: list
) -> None:
    code, out, err = run_cli("evaluate", "--checkpoint", checkpoint, "--batch-size", "2", "--json", tmp_path / "g.json")
    assert code == 0, err
    graphed = json.loads((tmp_path / "g.json").read_text())
    assert graphs_on == [(2, 65, 65)]  # 32x32 images: grid 33, bucket 65; captured at the second batch
    assert graphed["cuda_graphs"] is True and graphed["bucket"] == 64 and graphed["batch_size"] == 2
    assert "CUDA graphs: 1 shape(s) captured" in out and "img/s" in out
    code, out, err = run_cli("evaluate", "--checkpoint", checkpoint, "--no-compile", "--pad-to", "65", "--json",
                             tmp_path / "e.json")
    assert code == 0, err
    eager = json.loads((tmp_path / "e.json").read_text())
    assert eager["cuda_graphs"] is False and eager["bucket"] is None and "CUDA graphs" not in out
    assert graphed["pixels"] == eager["pixels"]
    assert graphed["miou"] == pytest.approx(eager["miou"], abs=1e-3)


def test_evaluate_batches_at_least_eight_with_graphs(checkpoint: Path, tmp_path: Path, run_cli, graphs_on) -> None:
    code, out, err = run_cli("evaluate", "--checkpoint", checkpoint, "--json", tmp_path / "g.json")
    assert code == 0, err
    assert json.loads((tmp_path / "g.json").read_text())["batch_size"] == 8
    assert "no shape seen twice: nothing captured" in out  # 4 images: one batch, run eager


def test_predict_batches_mixed_sizes_of_one_bucket(checkpoint: Path, tmp_path: Path, run_cli, graphs_on) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    sizes = {"a": (30, 40), "b": (33, 50), "c": (40, 21), "d": (30, 40)}  # (h, w): all in bucket 65 x 65
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    results = {}
    for label, options in (("graphs", ["--batch-size", "2"]), ("eager", ["--no-compile", "--pad-to", "65"])):
        out = tmp_path / label
        code, stdout, err = run_cli("predict", folder, "--checkpoint", checkpoint, "--out", out, "--save-probs",
                                    "--no-overlay", *options)
        assert code == 0, err
        assert "predicted 4 image(s)" in stdout and "img/s" in stdout
        results[label] = {n: np.load(out / f"{n}.npz")["probs"].astype(np.float32) for n in sizes}
        for name, (h, w) in sizes.items():
            assert Image.open(out / f"{name}.png").size == (w, h)
    assert graphs_on == [(2, 65, 65)]
    for name in sizes:
        assert results["graphs"][name].shape == results["eager"][name].shape
        assert np.allclose(results["graphs"][name], results["eager"][name], atol=2e-3)


def test_bad_bucket_is_a_usage_error(checkpoint: Path, tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("evaluate", "--checkpoint", checkpoint, "--bucket", "12")
    assert code == 2 and "--bucket" in err and "multiple of 8" in err and "Traceback" not in err
