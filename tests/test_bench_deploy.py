"""msattn bench --mode tiled / --mode onnx through the CLI on tiny models (never asserts speed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TINY = ["--width", "0.0625", "--iters", "1", "--warmup", "0"]


def test_tiled_mode_times_tiles_and_the_whole_image(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code, stdout, err = run_cli("bench", *TINY, "--mode", "tiled", "--image", "300x400", "--tile", "129",
                                "--json", out)  # fmt: skip
    assert code == 0, err
    records = json.loads(out.read_text())
    tiles, whole = records
    assert tiles["case"] == "tiles" and tiles["tile"] == 129 and tiles["tiles"] > 1 and tiles["image"] == [300, 400]
    assert tiles["seconds"] > 0 and tiles["estimate_mb"] > 0 and tiles["device"] == "cpu"
    assert whole["case"] == "whole" and whole["seconds"] > 0 and 0 <= whole["agreement"] <= 1
    assert "tiled vs whole" in stdout


def test_tiled_mode_skips_the_whole_image_over_the_budget(run_cli, tmp_path: Path, monkeypatch) -> None:
    import msattn.tiling.run as run

    monkeypatch.setattr(run, "default_budget", lambda device="cpu": 30 * 2**20)
    out = tmp_path / "b.json"
    code, _, err = run_cli("bench", *TINY, "--mode", "tiled", "--image", "600x700", "--tile", "129", "--json", out)
    assert code == 0, err
    whole = json.loads(out.read_text())[1]
    assert "over the budget" in whole["skipped"] and "seconds" not in whole


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="optional extra msattn[export] is not installed",
)
@pytest.mark.slow
def test_onnx_mode_compares_onnxruntime_with_torch(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    code, stdout, err = run_cli("bench", *TINY, "--mode", "onnx", "--size", "33", "--json", out)
    assert code == 0, err
    records = json.loads(out.read_text())
    assert [(r["model"], r["runtime"]) for r in records] == [
        ("demo", "torch"), ("demo", "onnxruntime"), ("full", "torch"), ("full", "onnxruntime")
    ]
    assert records[0]["size"] == 96 and records[2]["size"] == 33 and records[2]["width"] == 0.0625
    for r in records:
        assert r["latency_ms"] > 0 and r["onnx_over_torch"] > 0
    assert "PyTorch vs onnxruntime" in stdout
